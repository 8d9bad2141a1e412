"""Fuzz protonet's readers: every input must give success or a located ProtonetError.

    python tools/fuzz.py --seconds 600 --seed 1 [--readers prototxt,hdf5] \
        [--crashes fuzz-crashes] [--conformance ../shared/conformance] [--json]
    python tools/fuzz.py --replay fuzz-crashes/<case>      # run one saved input again

Readers and what their inputs exercise:

  prototxt     net prototxt text -> read_net, upgrade, NetModule build, a forward
  solver       solver prototxt -> read_solver, get_solver, two iterations
  caffemodel   .caffemodel bytes -> read_weights, copy into the net it came from
  solverstate  .solverstate bytes -> Solver.restore (history and learned_net)
  binaryproto  mean .binaryproto bytes -> the DataTransformer's mean file
  datum        Datum record bytes -> parse, decode (raw, float, PNG, JPEG), transform;
               now and then an LMDB of such records -> compute-image-mean
  hdf5         HDF5Data files, .caffemodel.h5 and .solverstate.h5
  imagelist    image list text (and corrupted images) -> ImageData, convert-imageset

Seeds are inputs this script generates (so it runs anywhere) plus, when present,
the conformance fixtures (../shared/conformance or $PROTONET_CONFORMANCE). Each
input is a seed mutated at the byte, token or message level: truncation, bit
flips, spliced and swapped fields, huge, negative and NaN sizes, wrong enum values,
renamed bottoms (cycles, missing and duplicate blobs).

The outcomes: `ok` (read fine), `error` (a ProtonetError naming the file, record or
layer), `wrapped` (a layer's forward failed inside torch and NetModule named the
layer: fine for the user, a note for the layer's author), `known` (a failure listed
in KNOWN_ISSUES, already reported), and the failures: `unlocated` (a ProtonetError
naming nothing), `crash` (any other exception), `alloc` (a MemoryError, or over
1 GiB of new peak memory), `hang` (over --timeout seconds) and `died` (the
interpreter itself crashed). Inputs run in a worker process under small size limits
(protonet.limits) and an address space cap; the supervisor restarts a worker that
dies or hangs. Failing, wrapped and known inputs are saved under --crashes with
meta.json and the traceback, for --replay.

The summary (counts per reader and outcome) is printed at the end; --json prints
it as one JSON object (tests/test_fuzz.py reads that). The exit status is 1 when
any failure was seen.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_CONFORMANCE = Path(os.environ.get("PROTONET_CONFORMANCE",
                                          REPO.parent / "shared" / "conformance"))
READERS = ["prototxt", "solver", "caffemodel", "solverstate", "binaryproto", "datum",
           "hdf5", "imagelist"]
FAILURES = ("unlocated", "crash", "alloc", "hang", "died")
# `wrapped`: a located NetError that NetModule.forward made of a torch error inside a
# layer (a case the layer's setup did not rule out). Not a failure of the guarantee,
# but worth a look by the layer's author: such inputs are saved too.
PASSES = ("ok", "error", "wrapped", "known")
# Failures already reported to the owner of the code at fault, as (reason, test on
# the error text); they count as `known`, are saved, and show in the summary.
KNOWN_ISSUES = [
    ("protonet/layers/pooling.py pads the bottom to (out - 1) * stride + kernel per "
     "axis before AVE/MAX pooling, so a huge stride or kernel allocates gigabytes",
     lambda text: "(Pooling): forward failed" in text and any(
         w in text.lower() for w in _ALLOC_WORDS + ("overflow",))),
]
# Limits the worker runs under: small, so a lying size is refused, never allocated.
BLOB_LIMIT = 1 << 22
IMAGE_PIXEL_LIMIT = 1 << 22
ADDRESS_SPACE_HEADROOM = 6 << 30
PEAK_GROWTH_LIMIT_KB = 1 << 20          # 1 GiB of new peak RSS for one input


# =====================================================================================
# Mutations
# =====================================================================================

INTERESTING_INTS = [0, 1, -1, 2, 3, 7, 8, 16, 255, 256, 1000, 65535, 65536, 1 << 20,
                    (1 << 31) - 1, -(1 << 31), 1 << 31, (1 << 32) - 1, 1 << 32,
                    (1 << 63) - 1, -(1 << 63), 10 ** 9, 99999999999]
INTERESTING_FLOATS = ["0", "-0.0", "1", "-1", "0.5", "1e-45", "1e38", "3.5e38", "-3.5e38",
                      "1e300", "inf", "-inf", "nan", "1e10", "2.5"]
INTERESTING_BYTES = [0x00, 0x01, 0x7F, 0x80, 0xFF, 0x08, 0x10, 0x12, 0x1A, 0x22]

TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'|#[^\n]*|[A-Za-z_][\w.]*'
                   r'|[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)|\s+|.', re.S)
NUMBER = re.compile(r'[-+]?(?:\d|\.\d)')
IDENT = re.compile(r'[A-Za-z_]')


def _proto_vocabulary():
    """Enum value names, field names and layer type names, to mutate prototxt with."""
    from protonet.layers import registered_types
    from protonet.proto import caffe_pb2
    enums, fields = set(), set()
    for message in caffe_pb2.DESCRIPTOR.message_types_by_name.values():
        stack = [message]
        while stack:
            desc = stack.pop()
            fields.update(f.name for f in desc.fields)
            for enum in desc.enum_types:
                enums.update(v.name for v in enum.values)
            stack.extend(desc.nested_types)
    types = [t for t in registered_types() if t != "Python"]
    return sorted(enums), sorted(fields), types


def mutate_bytes(data: bytes, rng: random.Random, others: list[bytes] = ()) -> bytes:
    """1-4 byte-level edits: truncation, bit flips, interesting bytes and varints,
    inserted, deleted, duplicated or swapped ranges, and splices with other seeds."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        n = len(buf)
        op = rng.randrange(10)
        if n == 0:
            buf += bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
            continue
        at = rng.randrange(n)
        if op == 0:
            del buf[rng.randrange(n + 1):]
        elif op == 1:
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(n)
                buf[i] ^= 1 << rng.randrange(8)
        elif op == 2:
            buf[at] = rng.choice(INTERESTING_BYTES)
        elif op == 3:       # a varint with a huge value (a lying length or size)
            value = rng.choice([(1 << 31) - 1, 1 << 32, (1 << 63) - 1, (1 << 64) - 1,
                                1 << 28, 10 ** 9])
            buf[at:at] = _varint(value)
        elif op == 4:
            del buf[at:at + rng.randint(1, 64)]
        elif op == 5:
            piece = buf[at:at + rng.randint(1, 64)]
            where = rng.randrange(n + 1)
            buf[where:where] = piece
        elif op == 6 and n > 4:
            a, b = sorted(rng.sample(range(n), 2))
            size = rng.randint(1, max(1, min(32, b - a)))
            first, second = bytes(buf[a:a + size]), bytes(buf[b:b + size])
            buf[b:b + size] = first
            buf[a:a + size] = second
        elif op == 7 and others:
            other = rng.choice(others)
            cut = rng.randrange(len(other) + 1) if other else 0
            buf = buf[:at] + bytearray(other[cut:])
        elif op == 8:
            buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        else:
            i = rng.randrange(max(1, n - 3))
            buf[i:i + 4] = struct.pack("<i", rng.choice([-1, 0, 1 << 30, -(1 << 31)]))
    return bytes(buf)


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


class TextMutator:
    """Token-level prototxt edits that keep most of the text parseable."""

    def __init__(self):
        self.enums, self.fields, self.types = _proto_vocabulary()

    def __call__(self, text: str, rng: random.Random) -> str:
        for _ in range(rng.randint(1, 3)):
            text = self._once(text, rng)
        return text

    def _once(self, text: str, rng: random.Random) -> str:
        tokens = TOKEN.findall(text)
        if not tokens:
            return text + rng.choice(["{", "}", "layer {", "x: 1"])
        numbers = [i for i, t in enumerate(tokens) if NUMBER.match(t)]
        strings = [i for i, t in enumerate(tokens) if t[:1] in "\"'"]
        idents = [i for i, t in enumerate(tokens) if IDENT.match(t)]
        op = rng.randrange(12)
        if op <= 2 and numbers:                           # sizes: huge, negative, NaN
            i = rng.choice(numbers)
            tokens[i] = (str(rng.choice(INTERESTING_INTS)) if rng.random() < 0.6
                         else rng.choice(INTERESTING_FLOATS))
        elif op == 3 and idents:                          # enum values: wrong ones
            i = rng.choice(idents)
            tokens[i] = rng.choice(self.enums + ["BOGUS", "true", "false", "1"])
        elif op == 4 and strings:                         # blob names: cycles, missing
            i = rng.choice(strings)
            pool = [tokens[j] for j in strings]
            tokens[i] = rng.choice(pool + ['""', '"missing_blob"', '"a\\x00b"',
                                           '"' + "x" * 300 + '"'])
        elif op == 5 and strings:                         # layer types
            i = rng.choice(strings)
            tokens[i] = '"' + rng.choice(self.types) + '"'
        elif op == 6 and idents:                          # field names
            i = rng.choice(idents)
            tokens[i] = rng.choice(self.fields + ["top", "bottom", "layer", "layers"])
        elif op == 7:                                     # lines: drop, copy, swap
            lines = "".join(tokens).split("\n")
            a, b = rng.randrange(len(lines)), rng.randrange(len(lines))
            kind = rng.randrange(3)
            if kind == 0:
                del lines[a]
            elif kind == 1:
                lines.insert(b, lines[a])
            else:
                lines[a], lines[b] = lines[b], lines[a]
            return "\n".join(lines)
        elif op == 8:                                     # truncate
            joined = "".join(tokens)
            return joined[:rng.randrange(len(joined) + 1)]
        elif op == 9:                                     # delete or add a brace
            braces = [i for i, t in enumerate(tokens) if t in "{}"]
            if braces and rng.random() < 0.5:
                del tokens[rng.choice(braces)]
            else:
                tokens.insert(rng.randrange(len(tokens) + 1), rng.choice(["{", "}", ":"]))
        elif op == 10:                                    # swap top and bottom
            for i, t in enumerate(tokens):
                if t in ("top", "bottom") and rng.random() < 0.5:
                    tokens[i] = "bottom" if t == "top" else "top"
        else:                                             # raw bytes, decoded back
            raw = mutate_bytes("".join(tokens).encode(), rng)
            return raw.decode("utf-8", "replace")
        return "".join(tokens)


def mutate_message(message, rng: random.Random, steps: int | None = None):
    """Edit a protobuf message in place: 1-3 fields of random (sub)messages get
    extreme, empty, swapped or duplicated values."""
    from google.protobuf.descriptor import FieldDescriptor as F
    for _ in range(steps or rng.randint(1, 3)):
        found = list(_submessages(message))
        target = rng.choice(found)
        fields = target.DESCRIPTOR.fields
        if not fields:
            continue
        set_fields = [f for f, _ in target.ListFields()]
        f = rng.choice(set_fields) if set_fields and rng.random() < 0.7 else rng.choice(fields)
        strings = [s for m in found for d, v in m.ListFields()
                   if d.type == F.TYPE_STRING for s in (v if d.is_repeated else [v])]
        try:
            if f.is_repeated:
                _mutate_repeated(target, f, rng, strings)
            elif f.type == F.TYPE_MESSAGE:
                sub = getattr(target, f.name)
                if rng.random() < 0.3:
                    target.ClearField(f.name)
                else:
                    sub.SetInParent()
                    mutate_message(sub, rng, 1)
            else:
                setattr(target, f.name, _value(f, rng, strings))
        except (ValueError, TypeError, OverflowError):
            pass                       # a value the field's type refuses: skip it
    return message


def _submessages(message):
    from google.protobuf.descriptor import FieldDescriptor as F
    stack = [message]
    while stack:
        m = stack.pop()
        yield m
        for d, value in m.ListFields():
            if d.type == F.TYPE_MESSAGE:
                stack.extend(value if d.is_repeated else [value])


def _mutate_repeated(target, f, rng: random.Random, strings: list[str]) -> None:
    from google.protobuf.descriptor import FieldDescriptor as F
    container = getattr(target, f.name)
    op = rng.randrange(5)
    if f.type == F.TYPE_MESSAGE:
        if op == 0 and len(container):
            del container[rng.randrange(len(container))]
        elif op == 1 and len(container):
            container.add().CopyFrom(rng.choice(container))
        elif op == 2 and len(container) > 1:
            a, b = rng.sample(range(len(container)), 2)
            first = type(container[a])()
            first.CopyFrom(container[a])
            container[a].CopyFrom(container[b])
            container[b].CopyFrom(first)
        elif op == 3:
            mutate_message(container.add(), rng, 2)
        elif len(container):
            mutate_message(rng.choice(container), rng, 1)
        return
    if op == 0 and len(container):
        del container[rng.randrange(len(container)):]
    elif op == 1:
        container.extend(_value(f, rng, strings) for _ in range(rng.randint(1, 4)))
    elif op == 2 and len(container):
        container[rng.randrange(len(container))] = _value(f, rng, strings)
    elif op == 3 and len(container):
        del container[rng.randrange(len(container))]
    else:
        container.append(_value(f, rng, strings))


def _value(f, rng: random.Random, strings: list[str]):
    from google.protobuf.descriptor import FieldDescriptor as F
    t = f.type
    if t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
        return _clamp(rng.choice(INTERESTING_INTS + [rng.randint(-4, 64)]), -(1 << 31),
                      (1 << 31) - 1)
    if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
        return _clamp(rng.choice(INTERESTING_INTS + [rng.randint(0, 64)]), 0, (1 << 32) - 1)
    if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return _clamp(rng.choice(INTERESTING_INTS), -(1 << 63), (1 << 63) - 1)
    if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
        return _clamp(rng.choice(INTERESTING_INTS), 0, (1 << 64) - 1)
    if t in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return float(rng.choice(INTERESTING_FLOATS))
    if t == F.TYPE_BOOL:
        return rng.random() < 0.5
    if t == F.TYPE_ENUM:
        return rng.choice(f.enum_type.values).number
    if t == F.TYPE_BYTES:
        return bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 7, 64, 300])))
    pool = strings + ["", "x", "data", "missing_blob", "../outside", "\u00e9\u00e8" * 3]
    return rng.choice(pool)


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


# =====================================================================================
# Seeds this script makes itself (no fixtures needed)
# =====================================================================================

NETS = {
    "mix": """name: "mix"
input: "data"
input_shape { dim: 2 dim: 3 dim: 8 dim: 8 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "lrn" type: "LRN" bottom: "pool" top: "lrn" lrn_param { local_size: 3 } }
layer { name: "slice" type: "Slice" bottom: "lrn" top: "s1" top: "s2"
  slice_param { axis: 1 slice_point: 2 } }
layer { name: "sum" type: "Eltwise" bottom: "s1" bottom: "s2" top: "sum" }
layer { name: "cat" type: "Concat" bottom: "sum" bottom: "s1" top: "cat" }
layer { name: "reshape" type: "Reshape" bottom: "cat" top: "flat"
  reshape_param { shape { dim: 0 dim: -1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "flat" top: "ip"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "drop" type: "Dropout" bottom: "ip" top: "ip" }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
""",
    "train": """name: "train"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 4 dim: 6 } shape { dim: 4 }
    data_filler { type: "gaussian" } data_filler { type: "constant" value: 1 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1" param { name: "w" }
  inner_product_param { num_output: 6 } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" param { name: "w" }
  inner_product_param { num_output: 6 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss"
  loss_weight: 1 }
layer { name: "acc" type: "Accuracy" bottom: "ip2" bottom: "label" top: "acc"
  include { phase: TEST } }
layer { name: "silence" type: "Silence" bottom: "ip1" exclude { phase: TEST } }
""",
    "v1": """name: "v1"
input: "data"
input_dim: 1 input_dim: 2 input_dim: 6 input_dim: 6
layers { name: "conv" type: CONVOLUTION bottom: "data" top: "conv" blobs_lr: 1 blobs_lr: 2
  convolution_param { num_output: 3 kernel_size: 3 } }
layers { name: "pool" type: POOLING bottom: "conv" top: "pool"
  pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layers { name: "ip" type: INNER_PRODUCT bottom: "pool" top: "ip"
  inner_product_param { num_output: 4 } }
layers { name: "prob" type: SOFTMAX bottom: "ip" top: "prob" }
""",
    "v0": """name: "v0"
input: "data"
input_dim: 1 input_dim: 2 input_dim: 6 input_dim: 6
layers { layer { name: "pad" type: "padding" pad: 1 } bottom: "data" top: "pad" }
layers { layer { name: "conv" type: "conv" num_output: 3 kernelsize: 3 } bottom: "pad"
  top: "conv" }
layers { layer { name: "pool" type: "pool" pool: MAX kernelsize: 2 stride: 2 }
  bottom: "conv" top: "pool" }
layers { layer { name: "ip" type: "innerproduct" num_output: 4 } bottom: "pool" top: "ip" }
""",
    "shapes": """name: "shapes"
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer { name: "deconv" type: "Deconvolution" bottom: "x" top: "up"
  convolution_param { num_output: 2 kernel_size: 2 stride: 2 } }
layer { name: "crop" type: "Crop" bottom: "up" bottom: "x" top: "crop" crop_param { axis: 2 offset: 1 } }
layer { name: "flat" type: "Flatten" bottom: "crop" top: "flat" }
layer { name: "argmax" type: "ArgMax" bottom: "flat" top: "am" argmax_param { top_k: 2 } }
layer { name: "power" type: "Power" bottom: "flat" top: "pw" power_param { power: 2 scale: 0.5 } }
layer { name: "mvn" type: "MVN" bottom: "x" top: "mvn" }
layer { name: "prelu" type: "PReLU" bottom: "mvn" top: "mvn" }
layer { name: "red" type: "Reduction" bottom: "pw" top: "red"
  reduction_param { operation: SUMSQ axis: 1 } }
layer { name: "tile" type: "Tile" bottom: "red" top: "tiled" tile_param { tiles: 3 axis: 0 } }
layer { name: "emb_in" type: "Input" top: "ids" input_param { shape { dim: 4 } } }
layer { name: "embed" type: "Embed" bottom: "ids" top: "emb"
  embed_param { input_dim: 10 num_output: 3 } }
""",
    "hdf5": """name: "hdf5"
layer { name: "data" type: "HDF5Data" top: "data" top: "label"
  hdf5_data_param { source: "train_list.txt" batch_size: 4 } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc"
  include { phase: TEST } }
""",
}

SOLVERS = {
    "sgd": 'net: "hdf5.prototxt"\ntest_iter: 1\ntest_interval: 2\nbase_lr: 0.1\n'
           'momentum: 0.9\nlr_policy: "step"\ngamma: 0.5\nstepsize: 2\nmax_iter: 4\n'
           'weight_decay: 0.0005\ndisplay: 1\nrandom_seed: 3\n',
    "adam": 'net: "hdf5.prototxt"\ntype: "Adam"\nbase_lr: 0.01\nmomentum: 0.9\n'
            'momentum2: 0.999\nlr_policy: "inv"\ngamma: 0.1\npower: 0.75\nmax_iter: 3\n'
            'iter_size: 2\nclip_gradients: 1\nregularization_type: "L1"\n',
    "legacy": 'train_net: "hdf5.prototxt"\nsolver_type: NESTEROV\nbase_lr: 0.1\n'
              'momentum: 0.9\nlr_policy: "multistep"\nstepvalue: 1\nstepvalue: 3\n'
              'gamma: 0.1\nmax_iter: 4\naverage_loss: 2\n',
    "poly": 'net: "hdf5.prototxt"\ntype: "RMSProp"\nrms_decay: 0.98\nbase_lr: 0.01\n'
            'lr_policy: "poly"\npower: 2\nmax_iter: 5\nsnapshot_format: HDF5\n',
}


def _make_images(folder: Path) -> list[str]:
    """A few small color and gray PNG/JPEG files; returns their names."""
    import cv2
    import numpy as np
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i, (ext, channels, size) in enumerate([(".png", 3, (8, 8)), (".jpg", 3, (8, 8)),
                                               (".png", 1, (8, 8)), (".jpg", 3, (10, 6)),
                                               (".png", 3, (8, 8))]):
        shape = size if channels == 1 else size + (3,)
        image = rng.integers(0, 256, size=shape, dtype=np.uint8)
        name = f"img{i}{ext}"
        cv2.imwrite(str(folder / name), image)
        names.append(name)
    return names


# =====================================================================================
# The targets
# =====================================================================================

@dataclass
class Case:
    """One input: the files it consists of and what the target needs to run it."""
    reader: str
    seed: str
    paths: list[str]
    options: dict = field(default_factory=dict)


class Workspace:
    """The worker's scratch folder, seeds, and objects built once per seed."""

    def __init__(self, root: Path, conformance: Path | None):
        self.root = root
        self.conformance = conformance if conformance and conformance.is_dir() else None
        self.inputs = root / "inputs"
        self.inputs.mkdir(parents=True, exist_ok=True)
        self.text_mutator = TextMutator()
        self._cache: dict = {}
        self._counter = 0
        self._prepare()

    # -- scratch folders -------------------------------------------------------------
    def _prepare(self) -> None:
        import h5py
        import numpy as np
        work = self.root / "work"           # generated nets, data and solvers live here
        work.mkdir(exist_ok=True)
        rng = np.random.default_rng(0)
        with h5py.File(work / "train.h5", "w") as f:
            f["data"] = rng.normal(size=(12, 5)).astype(np.float32)
            f["label"] = (np.arange(12) % 3).astype(np.float32)
        (work / "train_list.txt").write_text("train.h5\n")
        for name, text in NETS.items():
            (work / f"{name}.prototxt").write_text(text)
        self.images = _make_images(work / "images")
        (work / "images" / "list.txt").write_text(
            "".join(f"{n} {i % 3}\n" for i, n in enumerate(self.images)))
        (work / "snap").mkdir(exist_ok=True)
        self.work = work
        self.conf_solvers = None
        if self.conformance is not None and (self.conformance / "solvers").is_dir():
            copy = self.root / "conf_solvers"
            if not copy.exists():
                shutil.copytree(self.conformance / "solvers", copy)
                for path in copy.rglob("*"):
                    path.chmod(0o755 if path.is_dir() else 0o644)
            self.conf_solvers = copy

    def fresh(self, reader: str, name: str) -> Path:
        """A new empty path for an input file or folder."""
        self._counter += 1
        folder = self.inputs / reader
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self._counter % 4}_{name}"
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        return path

    def portable(self, path) -> str:
        """`path` relative to the scratch folder when inside it, so that a saved
        input replays in another scratch folder (see `local`)."""
        path = Path(path)
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) \
            else str(path)

    def local(self, path: str) -> Path:
        return self.root / path if not os.path.isabs(path) else Path(path)

    def cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]


@contextlib.contextmanager
def _cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


class Reader:
    """A family of inputs: seeds, a mutation, and the code that reads them."""
    name = ""

    def seeds(self, ws: Workspace) -> list[tuple[str, object]]:
        raise NotImplementedError

    def make(self, ws: Workspace, seed: tuple[str, object], rng: random.Random,
             others: list) -> Case:
        raise NotImplementedError

    def run(self, ws: Workspace, case: Case) -> None:
        raise NotImplementedError

    def where(self, case: Case) -> list[str]:
        """Strings one of which a located error names."""
        tokens = []
        for p in case.paths + case.options.get("also", []):
            tokens += [p, os.path.basename(p)]
        return tokens + ["layer '"]


# -- prototxt ------------------------------------------------------------------------
def _net_seeds(ws: Workspace) -> list[tuple[str, object]]:
    seeds = [(f"gen/{name}", (text, ws.work)) for name, text in NETS.items()]
    lenet = REPO / "examples" / "mnist" / "lenet.prototxt"
    if lenet.exists():
        seeds.append(("repo/lenet", (lenet.read_text(), ws.work)))
    if ws.conformance is not None:
        for sub in ("nets", "layers"):
            for path in sorted((ws.conformance / sub).glob("*/net.prototxt")):
                seeds.append((f"{sub}/{path.parent.name}", (path.read_text(), ws.work)))
        for path in sorted((ws.conformance / "data").glob("*.prototxt")):
            seeds.append((f"data/{path.stem}", (path.read_text(), ws.conformance / "data")))
        if ws.conf_solvers is not None:
            for path in sorted(ws.conf_solvers.glob("net*.prototxt")):
                seeds.append((f"solvers/{path.stem}", (path.read_text(), ws.conf_solvers)))
    return seeds


def _has_python_layer(text: str) -> bool:
    return "Python" in text or "python_param" in text


class PrototxtReader(Reader):
    """Net text -> read_net (upgrades included) -> NetModule -> a forward pass."""
    name = "prototxt"

    def seeds(self, ws):
        return _net_seeds(ws)

    def make(self, ws, seed, rng, others):
        text, folder = seed[1]
        if rng.random() < 0.35:
            from protonet.io.text import parse_text, to_text
            from protonet.proto import caffe_pb2
            try:
                net = parse_text(text, caffe_pb2.NetParameter())
                text = to_text(mutate_message(net, rng))
            except Exception:
                text = ws.text_mutator(text, rng)
        else:
            text = ws.text_mutator(text, rng)
        path = ws.fresh(self.name, "net.prototxt")
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
        return Case(self.name, seed[0], [str(path)],
                    {"cwd": ws.portable(folder), "phase": rng.choice(["TRAIN", "TEST"]),
                     "forward": rng.random() < 0.5})

    def run(self, ws, case):
        from protonet.io.upgrade import read_net
        from protonet.proto import caffe_pb2
        with _cwd(ws.local(case.options["cwd"])):
            net = read_net(case.paths[0])
            if any(layer.type == "Python" for layer in net.layer):
                return                    # user code: not imported by the fuzzer
            phase = getattr(caffe_pb2, case.options["phase"])
            _build_and_run(net, phase, case.options["forward"])


def _build_and_run(net, phase: int, forward: bool) -> None:
    import torch
    from protonet.data.layers import close_data_layers
    from protonet.net.module import NetModule
    from protonet.pycaffe import Net
    module = NetModule(net, phase=phase)
    try:
        if forward and sum(math.prod(s) for s in module.blob_shapes) <= 1 << 20:
            with torch.no_grad():
                Net.from_module(module).forward()
    finally:
        close_data_layers(module)


# -- solver --------------------------------------------------------------------------
class SolverReader(Reader):
    """Solver text -> read_solver -> get_solver -> two iterations (and a test)."""
    name = "solver"

    def seeds(self, ws):
        seeds = [(f"gen/{name}", (text, ws.work)) for name, text in SOLVERS.items()]
        if ws.conf_solvers is not None:
            for path in sorted(ws.conf_solvers.glob("*.solver.prototxt")):
                seeds.append((f"solvers/{path.name}", (path.read_text(), ws.conf_solvers)))
        return seeds

    def make(self, ws, seed, rng, others):
        text, folder = seed[1]
        text = ws.text_mutator(text, rng)
        path = ws.fresh(self.name, "solver.prototxt")
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
        return Case(self.name, seed[0], [str(path)], {"cwd": ws.portable(folder)})

    def run(self, ws, case):
        from protonet.data.layers import close_data_layers
        from protonet.io.upgrade import read_solver
        from protonet.solver import get_solver
        with _cwd(ws.local(case.options["cwd"])):
            param = read_solver(case.paths[0])
            # Huge iteration counts are a request, not a reader bug: keep runs short,
            # and keep snapshots in the scratch folder.
            param.snapshot_prefix = str(ws.root / "snapout" / "fuzz")
            (ws.root / "snapout").mkdir(exist_ok=True)
            param.snapshot = 0
            param.snapshot_after_train = False
            param.max_iter = min(param.max_iter, 2)
            param.iter_size = max(-1, min(param.iter_size, 2))
            for i, value in enumerate(param.test_iter):
                param.test_iter[i] = min(value, 1)
            solver = get_solver(param, source=case.paths[0])
            try:
                solver.solve()
            finally:
                for module in [solver.train_module, *solver.test_modules]:
                    close_data_layers(module)


# -- caffemodel ----------------------------------------------------------------------
class CaffemodelReader(Reader):
    """Weights bytes -> read_weights (V0/V1 upgrade) -> copy into the seed's net."""
    name = "caffemodel"

    def seeds(self, ws):
        from protonet.io.upgrade import read_net
        from protonet.io.weights import net_to_proto
        from protonet.net.module import NetModule
        seeds = []
        for name in ("mix", "shapes", "v1", "train"):
            net_path = ws.work / f"{name}.prototxt"
            module = NetModule(read_net(str(net_path)))
            seeds.append((f"gen/{name}", (net_to_proto(module).SerializeToString(),
                                          str(net_path))))
        seeds.append(("gen/v1_legacy_blobs", (_v1_caffemodel(), str(ws.work / "v1.prototxt"))))
        if ws.conformance is not None:
            for path in sorted((ws.conformance / "layers").glob("*/weights.caffemodel")):
                seeds.append((f"layers/{path.parent.name}",
                              (path.read_bytes(), str(path.parent / "net.prototxt"))))
        return seeds

    def make(self, ws, seed, rng, others):
        data, net_path = seed[1]
        data = _mutate_proto_bytes(data, "NetParameter", rng, others)
        path = ws.fresh(self.name, "weights.caffemodel")
        path.write_bytes(data)
        return Case(self.name, seed[0], [str(path)], {"net": ws.portable(net_path)})

    def run(self, ws, case):
        from protonet.io.upgrade import read_net
        from protonet.io.weights import copy_trained_layers, read_weights
        from protonet.net.module import NetModule

        def build():
            module = NetModule(read_net(str(ws.local(case.options["net"]))))
            return module
        module = ws.cached(("net", case.options["net"]), build)
        copy_trained_layers(module.layers, read_weights(case.paths[0]), case.paths[0])


def _v1_caffemodel() -> bytes:
    """A V1 caffemodel (enum layer types, legacy 4-D blob shapes)."""
    from protonet.proto import caffe_pb2
    net = caffe_pb2.NetParameter(name="v1")
    V1 = caffe_pb2.V1LayerParameter
    conv = net.layers.add(name="conv", type=V1.CONVOLUTION, bottom=["data"], top=["conv"])
    conv.convolution_param.num_output = 3
    conv.convolution_param.kernel_size.append(3)
    w = conv.blobs.add(num=3, channels=2, height=3, width=3)
    w.data.extend([0.1] * 54)
    b = conv.blobs.add(num=1, channels=1, height=1, width=3)
    b.data.extend([0.0] * 3)
    ip = net.layers.add(name="ip", type=V1.INNER_PRODUCT, bottom=["pool"], top=["ip"])
    ip.inner_product_param.num_output = 4
    w = ip.blobs.add(num=1, channels=1, height=4, width=12)
    w.data.extend([0.5] * 48)
    b = ip.blobs.add(num=1, channels=1, height=1, width=4)
    b.data.extend([0.0] * 4)
    return net.SerializeToString()


def _mutate_proto_bytes(data: bytes, message_name: str, rng: random.Random,
                        others: list) -> bytes:
    """Half the time a message-level edit (then maybe bytes), else bytes only."""
    from protonet.proto import caffe_pb2
    if rng.random() < 0.5:
        message = getattr(caffe_pb2, message_name)()
        try:
            message.ParseFromString(data)
            data = mutate_message(message, rng).SerializeToString()
        except Exception:
            pass
        if rng.random() < 0.3:
            data = mutate_bytes(data, rng, [o[1][0] for o in others[:3]])
        return data
    return mutate_bytes(data, rng, [o[1][0] for o in others[:3]])


# -- solverstate ---------------------------------------------------------------------
class SolverstateReader(Reader):
    """State bytes -> Solver.restore: iteration, learned_net, history blobs."""
    name = "solverstate"

    def seeds(self, ws):
        seeds = []
        for kind, state in _generated_states(ws).items():
            if not state.endswith(".h5"):
                seeds.append((f"gen/{kind}", (Path(state).read_bytes(), kind)))
        if ws.conf_solvers is not None:
            for path in sorted((ws.conf_solvers / "snap").glob("*.solverstate")):
                seeds.append((f"solvers/snap/{path.name}", (path.read_bytes(), "conf")))
        return seeds

    def make(self, ws, seed, rng, others):
        data, kind = seed[1]
        data = _mutate_proto_bytes(data, "SolverState", rng, others)
        folder = ws.conf_solvers / "snap" if kind == "conf" else ws.work / "snap"
        path = folder / f"fuzz_{ws._counter % 4}.solverstate"
        ws._counter += 1
        path.write_bytes(data)
        return Case(self.name, seed[0], [str(path)], {"kind": kind})

    def run(self, ws, case):
        solver, folder = _state_solver(ws, case.options["kind"])
        with _cwd(folder):
            solver.restore(case.paths[0])


def _generated_states(ws: Workspace) -> dict[str, str]:
    """Snapshots of the generated solvers, made once: {kind: solverstate path}."""
    def make():
        from protonet.data.layers import close_data_layers
        from protonet.solver import get_solver
        states = {}
        with _cwd(ws.work):
            for kind, text in (("sgd", SOLVERS["sgd"]),
                               ("rmsprop_h5", SOLVERS["poly"])):
                path = ws.work / f"{kind}.solver.prototxt"
                path.write_text(text + f'snapshot_prefix: "snap/{kind}"\n')
                solver = get_solver(str(path))
                solver.step(2)
                states[kind] = str(Path(solver.snapshot()).resolve())
                for module in [solver.train_module, *solver.test_modules]:
                    close_data_layers(module)
        return states
    return ws.cached("states", make)


def _state_solver(ws: Workspace, kind: str):
    def make():
        from protonet.solver import get_solver
        if kind == "conf":
            folder = ws.conf_solvers
            path = folder / "sgd_resume.solver.prototxt"
        else:
            _generated_states(ws)
            folder = ws.work
            path = folder / f"{kind}.solver.prototxt"
        with _cwd(folder):
            return get_solver(str(path)), folder
    return ws.cached(("solver", kind), make)


# -- binaryproto ---------------------------------------------------------------------
class BinaryprotoReader(Reader):
    """Mean file bytes -> load_mean_file (Caffe's Blob::FromProto checks)."""
    name = "binaryproto"

    def seeds(self, ws):
        from protonet.proto import caffe_pb2
        legacy = caffe_pb2.BlobProto(num=1, channels=3, height=4, width=4)
        legacy.data.extend(float(i) for i in range(48))
        shaped = caffe_pb2.BlobProto()
        shaped.shape.dim.extend([1, 1, 4, 4])
        shaped.data.extend([0.5] * 16)
        doubles = caffe_pb2.BlobProto()
        doubles.shape.dim.extend([2, 2, 2])
        doubles.double_data.extend([1.0] * 8)
        seeds = [("gen/legacy", legacy.SerializeToString()),
                 ("gen/shape", shaped.SerializeToString()),
                 ("gen/double", doubles.SerializeToString())]
        if ws.conformance is not None:
            for path in sorted((ws.conformance / "data").glob("*.binaryproto")):
                seeds.append((f"data/{path.name}", path.read_bytes()))
        return seeds

    def make(self, ws, seed, rng, others):
        data = seed[1]
        others = [(name, (blob,)) for name, blob in others]
        data = _mutate_proto_bytes(data, "BlobProto", rng, others)
        path = ws.fresh(self.name, "mean.binaryproto")
        path.write_bytes(data)
        return Case(self.name, seed[0], [str(path)])

    def run(self, ws, case):
        from protonet.data.transformer import load_mean_file
        load_mean_file(case.paths[0])


# -- datum ---------------------------------------------------------------------------
class DatumReader(Reader):
    """Datum bytes -> parse, decode, transform; sometimes via an LMDB and
    compute-image-mean."""
    name = "datum"

    def seeds(self, ws):
        import cv2
        import numpy as np
        from protonet.data.datum import encoded_datum, raw_datum
        from protonet.proto import caffe_pb2
        rng = np.random.default_rng(1)
        color = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
        seeds = [("gen/raw", raw_datum(color, 1).SerializeToString()),
                 ("gen/raw_gray", raw_datum(color[:, :, 0], 2).SerializeToString())]
        floats = caffe_pb2.Datum(channels=2, height=3, width=2, label=4)
        floats.float_data.extend(float(v) for v in range(12))
        seeds.append(("gen/float", floats.SerializeToString()))
        for ext in (".png", ".jpg"):
            ok, buffer = cv2.imencode(ext, color)
            seeds.append((f"gen/encoded{ext}",
                          encoded_datum(buffer.tobytes(), 3).SerializeToString()))
        if ws.conformance is not None:
            import lmdb
            for db in sorted((ws.conformance / "data").glob("lmdb_*")):
                env = lmdb.open(str(db), readonly=True, lock=False)
                with env.begin() as txn:
                    for i, (key, value) in enumerate(txn.cursor()):
                        if i < 3:
                            seeds.append((f"data/{db.name}/{key.decode()}", bytes(value)))
                env.close()
        return seeds

    def make(self, ws, seed, rng, others):
        data = _mutate_datum(seed[1], rng, [o[1] for o in others[:3]])
        as_db = rng.random() < 0.1
        options = {"crop": rng.choice([0, 0, 2, 5]), "mirror": rng.random() < 0.5,
                   "mean_value": rng.choice([[], [1.0], [1.0, 2.0, 3.0]]),
                   "force": rng.choice(["", "color", "gray"]), "as_db": as_db}
        if as_db:
            path = ws.fresh(self.name, "db")
            records = [data] + [_mutate_datum(seed[1], rng, []) for _ in range(2)] + [seed[1]]
            _write_lmdb(path, records)
            if rng.random() < 0.3:                  # damage the B-tree pages themselves
                _damage_pages(path / "data.mdb", rng)
        else:
            path = ws.fresh(self.name, "record.datum")
            path.write_bytes(data)
        return Case(self.name, seed[0], [str(path)], options)

    def run(self, ws, case):
        import numpy as np
        from protonet.data.datum import decode_datum, parse_datum
        from protonet.data.imageset import compute_image_mean
        from protonet.data.transformer import DataTransformer
        from protonet.proto import caffe_pb2
        o = case.options
        if o["as_db"]:
            compute_image_mean(case.paths[0], workers=1, progress=False)
            return
        where = f"{case.paths[0]} record 'key'"
        datum = parse_datum(Path(case.paths[0]).read_bytes(), where)
        image = decode_datum(datum, where, o["force"] == "color", o["force"] == "gray")
        param = caffe_pb2.TransformationParameter(crop_size=o["crop"], mirror=o["mirror"])
        param.mean_value.extend(o["mean_value"])
        t = DataTransformer(param, caffe_pb2.TRAIN)
        t.output_shape(image.shape, where)
        crops = [t.crop(image, draw, where) for draw in t.draw(2)]
        t.normalize(t.collate(crops, [float(datum.label)] * 2, [where] * 2))
        assert np.isfinite(float(datum.label)) or True


def _mutate_datum(data: bytes, rng: random.Random, others: list[bytes]) -> bytes:
    from protonet.proto import caffe_pb2
    roll = rng.random()
    if roll < 0.45:
        datum = caffe_pb2.Datum()
        try:
            datum.ParseFromString(data)
        except Exception:
            return mutate_bytes(data, rng, others)
        if datum.encoded and rng.random() < 0.5:
            datum.data = _mutate_image(datum.data, rng)       # lying image headers
        else:
            mutate_message(datum, rng)
        return datum.SerializeToString()
    return mutate_bytes(data, rng, others)


def _mutate_image(data: bytes, rng: random.Random) -> bytes:
    """Image bytes with a lying size in the header (PNG IHDR, JPEG SOF) or mangled."""
    import zlib
    buf = bytearray(data)
    sizes = [(30000, 30000), (65535, 65535), (0, 8), (1 << 20, 2), (4000, 4000)]
    width, height = rng.choice(sizes)
    if buf[:8] == b"\x89PNG\r\n\x1a\n" and len(buf) >= 33:
        struct.pack_into(">II", buf, 16, width, height)
        struct.pack_into(">I", buf, 29, zlib.crc32(bytes(buf[12:29])) & 0xFFFFFFFF)
        return bytes(buf)
    sof = buf.find(b"\xff\xc0")
    if sof >= 0 and len(buf) >= sof + 9:
        struct.pack_into(">HH", buf, sof + 5, min(height, 65535), min(width, 65535))
        return bytes(buf)
    return mutate_bytes(bytes(buf), rng)


def _damage_pages(path: Path, rng: random.Random, page: int = 4096) -> None:
    """Flip bits in page headers (where liblmdb keeps its structure)."""
    data = bytearray(path.read_bytes())
    for _ in range(rng.randint(1, 6)):
        at = rng.randrange(max(1, len(data) // page)) * page + rng.randrange(64)
        if at < len(data):
            data[at] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def _write_lmdb(path: Path, records: list[bytes]) -> None:
    import lmdb
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, value in enumerate(records):
            txn.put(f"{i:08d}".encode(), value)
    env.close()


# -- hdf5 ----------------------------------------------------------------------------
class Hdf5Reader(Reader):
    """HDF5 bytes or structure -> HDF5Data batches, HDF5 weights, HDF5 solver states."""
    name = "hdf5"

    def seeds(self, ws):
        from protonet.io.upgrade import read_net
        from protonet.io.weights import save_hdf5
        from protonet.net.module import NetModule
        seeds = [("gen/data", ((ws.work / "train.h5").read_bytes(), "data"))]
        module = NetModule(read_net(str(ws.work / "mix.prototxt")))
        weights = ws.root / "mix.caffemodel.h5"
        save_hdf5(module, str(weights))
        seeds.append(("gen/weights", (weights.read_bytes(), "weights")))
        state = _generated_states(ws)["rmsprop_h5"]
        seeds.append(("gen/state", (Path(state).read_bytes(), "state")))
        if ws.conf_solvers is not None:
            seeds.append(("solvers/data.h5", ((ws.conf_solvers / "data.h5").read_bytes(),
                                              "data")))
        return seeds

    def make(self, ws, seed, rng, others):
        data, kind = seed[1]
        suffix = {"data": "data.h5", "weights": "weights.caffemodel.h5",
                  "state": "state.solverstate.h5"}[kind]
        path = ws.fresh(self.name, suffix)
        if rng.random() < 0.5:
            path.write_bytes(data)
            _mutate_hdf5_structure(path, rng)
        else:
            path.write_bytes(mutate_bytes(data, rng))
        options = {"kind": kind, "batch": rng.choice([1, 3, 4, 7]),
                   "shuffle": rng.random() < 0.3, "forwards": rng.randint(1, 3)}
        if kind == "state":
            folder = ws.work / "snap"
            state = folder / f"fuzz_{ws._counter % 4}.solverstate.h5"
            shutil.move(str(path), state)
            path = state
        return Case(self.name, seed[0], [str(path)], options)

    def run(self, ws, case):
        o = case.options
        path = case.paths[0]
        if o["kind"] == "data":
            from protonet.io.text import parse_text
            from protonet.proto import caffe_pb2
            listing = Path(path).with_suffix(".txt")
            listing.write_text(path + "\n")
            net = parse_text(f"""
                layer {{ name: "data" type: "HDF5Data" top: "data" top: "label"
                  hdf5_data_param {{ source: "{listing}" batch_size: {o['batch']}
                                     shuffle: {str(o['shuffle']).lower()} }} }}""",
                             caffe_pb2.NetParameter())
            import torch
            from protonet.net.module import NetModule
            module = NetModule(net, phase=caffe_pb2.TRAIN)
            with torch.no_grad():
                for _ in range(o["forwards"]):
                    module()
        elif o["kind"] == "weights":
            from protonet.io.upgrade import read_net
            from protonet.io.weights import copy_trained_layers, read_weights
            from protonet.net.module import NetModule
            module = ws.cached(("net", "mix"), lambda: NetModule(
                read_net(str(ws.work / "mix.prototxt"))))
            copy_trained_layers(module.layers, read_weights(path), path, partial=True)
        else:
            solver, folder = _state_solver(ws, "rmsprop_h5")
            with _cwd(folder):
                solver.restore(path)


def _mutate_hdf5_structure(path: Path, rng: random.Random) -> None:
    """Rewrite one dataset or group of the file: lying (huge, unallocated) shapes,
    other dtypes, scalars, groups for datasets, NaN, removed or extra entries."""
    import h5py
    import numpy as np
    with h5py.File(path, "r+") as f:
        names = []
        f.visit(names.append)
        if not names:
            return
        name = rng.choice(names)
        parent = name.rpartition("/")[0] or "/"
        base = name.rpartition("/")[2]
        op = rng.randrange(9)
        old = f[name]
        shape = old.shape if isinstance(old, h5py.Dataset) else (3,)
        del f[name]
        group = f[parent]
        if op == 0:                    # a huge shape that the file does not hold
            dims = tuple(rng.choice([1 << 20, 1 << 31, 1 << 40, 5]) for _ in range(
                max(1, len(shape or (1,)))))
            group.create_dataset(base, shape=dims, dtype="f4", chunks=True,
                                 maxshape=tuple(None for _ in dims))
        elif op == 1:
            group.create_dataset(base, data=np.array([b"text", b"more"]))
        elif op == 2:
            group.create_dataset(base, data=np.float32(3.5))
        elif op == 3:
            group.create_group(base).create_dataset("0", data=np.zeros(2, np.float32))
        elif op == 4:
            group.create_dataset(base, data=np.full(shape or (2,), np.nan, np.float32))
        elif op == 5:
            group.create_dataset(base, data=np.zeros((0,) + tuple(shape[1:]), np.float32))
        elif op == 6:
            group.create_dataset(base, data=np.zeros(tuple(shape) + (2,), np.complex64))
        elif op == 7:
            group.create_dataset(rng.choice(["999999999", "-1", "x", base + "_"]),
                                 data=np.zeros(3, np.float32))
        else:
            rows = rng.choice([1, 2, 1000])
            group.create_dataset(base, data=np.ones((rows,) + tuple(shape[1:]), np.int64))


# -- imagelist -----------------------------------------------------------------------
class ImagelistReader(Reader):
    """List text (and images) -> ImageData batches; sometimes convert-imageset."""
    name = "imagelist"

    def seeds(self, ws):
        folder = ws.work / "images"
        seeds = [("gen/list", ((folder / "list.txt").read_text(), str(folder)))]
        if ws.conformance is not None:
            images = ws.conformance / "data" / "images"
            if (images / "list.txt").exists():
                seeds.append(("data/images/list.txt",
                              ((images / "list.txt").read_text(), str(images))))
        return seeds

    def make(self, ws, seed, rng, others):
        text, folder = seed[1]
        lines = text.splitlines()
        op = rng.randrange(6)
        if op == 0 and lines:                         # a corrupted image in the list
            source = Path(folder) / lines[0].rpartition(" ")[0]
            bad = ws.fresh(self.name, "bad" + source.suffix)
            data = source.read_bytes()
            bad.write_bytes(_mutate_image(data, rng) if rng.random() < 0.5
                            else mutate_bytes(data, rng))
            lines.insert(rng.randrange(len(lines) + 1), f"{bad} 1")
            folder_for_list = ""
        else:
            folder_for_list = folder + "/"
        if op == 1:
            lines.insert(rng.randrange(len(lines) + 1), rng.choice(
                ["a\x00b.png 1", "../../etc/passwd 2", "/dev/null 0", "", " ",
                 "img0.png 99999999999999999999", "img0.png -5", "img0.png",
                 "x" * 5000 + " 1", "img0.png 1 2 3", "\udcff.png 1"]))
        joined = "\n".join(lines) + "\n"
        if op >= 2:
            joined = ws.text_mutator(joined, rng)
        path = ws.fresh(self.name, "list.txt")
        path.write_bytes(joined.encode("utf-8", "surrogateescape"))
        convert = rng.random() < 0.2
        db = ws.portable(ws.fresh(self.name, "db")) if convert else ""
        return Case(self.name, seed[0], [str(path)],
                    {"root": ws.portable(folder_for_list) + "/" if folder_for_list else "",
                     "batch": rng.choice([1, 2, 4]),
                     "resize": rng.choice([(0, 0), (5, 7), (3, 0)]),
                     "color": rng.random() < 0.8, "convert": convert, "db": db,
                     "also": [db] if db else []})

    def run(self, ws, case):
        import torch
        from protonet.data.imageset import compute_image_mean, convert_imageset
        from protonet.data.layers import close_data_layers
        from protonet.net.module import NetModule
        from protonet.proto import caffe_pb2
        o = case.options
        if o["convert"]:
            db = ws.local(o["db"])
            if db.exists():
                shutil.rmtree(db)
            root = str(ws.local(o["root"])) + "/" if o["root"] else ""
            convert_imageset(root, case.paths[0], str(db), resize_height=o["resize"][0],
                             resize_width=o["resize"][1], gray=not o["color"],
                             workers=1, progress=False)
            if db.exists():
                compute_image_mean(str(db), workers=1, progress=False)
            return
        net = caffe_pb2.NetParameter()
        layer = net.layer.add(name="images", type="ImageData", top=["data", "label"])
        p = layer.image_data_param
        root = str(ws.local(o["root"])) + "/" if o["root"] else ""
        p.source, p.root_folder, p.batch_size = case.paths[0], root, o["batch"]
        p.new_height, p.new_width = o["resize"]
        p.is_color = o["color"]
        module = NetModule(net, phase=caffe_pb2.TEST)
        try:
            for layer in module.layers:
                layer.configure(prefetch=False, workers=0)
            with torch.no_grad():
                module()
        finally:
            close_data_layers(module)


READER_CLASSES = {cls.name: cls for cls in (
    PrototxtReader, SolverReader, CaffemodelReader, SolverstateReader, BinaryprotoReader,
    DatumReader, Hdf5Reader, ImagelistReader)}


# =====================================================================================
# Running one input and judging the outcome
# =====================================================================================

class Timeout(BaseException):
    """Raised by the per-input alarm; a BaseException so that no reader catches it."""


def _on_alarm(signum, frame):
    raise Timeout()


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


_ALLOC_WORDS = ("can't allocate memory", "cannot allocate memory", "out of memory",
                "std::bad_alloc", "insufficient memory")


def judge(reader: Reader, case: Case, error: BaseException | None) -> str:
    from protonet.errors import NetError, ParseError, ProtonetError
    if error is None:
        return "ok"
    if any(test(str(error)) for _, test in KNOWN_ISSUES):
        return "known"
    if isinstance(error, Timeout):
        return "hang"
    for e in _chain(error):
        if isinstance(e, MemoryError) or any(w in str(e).lower() for w in _ALLOC_WORDS):
            return "alloc"
    if isinstance(error, NetError) and error.layer and \
            getattr(error, "detail", "").startswith("forward failed"):
        return "wrapped"
    if isinstance(error, ProtonetError):
        text = str(error)
        named = any(t and t in text for t in reader.where(case))
        named = named or (isinstance(error, ParseError) and bool(error.path))
        named = named or (isinstance(error, NetError) and bool(error.layer))
        return "error" if named else "unlocated"
    return "crash"


def run_case(reader: Reader, ws: Workspace, case: Case, timeout: float):
    """(outcome, traceback text or '') for one input."""
    import warnings
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    error = None
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reader.run(ws, case)
    except BaseException as e:      # noqa: BLE001 - judging every outcome is the point
        if isinstance(e, KeyboardInterrupt):
            raise
        error = e
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    outcome = judge(reader, case, error)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    if outcome in PASSES and grown > PEAK_GROWTH_LIMIT_KB:
        outcome = "alloc"
        return outcome, f"peak RSS grew by {grown // 1024} MiB\n"
    detail = "".join(traceback.format_exception(error)) if error is not None else ""
    return outcome, detail


def save_case(crashes: Path, case: Case, outcome: str, detail: str, meta: dict) -> Path:
    digest = hashlib.sha1()
    for p in case.paths:
        digest.update(_tree_bytes(Path(p)))
    target = crashes / f"{case.reader}-{outcome}-{digest.hexdigest()[:10]}"
    if target.exists():
        return target
    (target / "input").mkdir(parents=True)
    saved = []
    for p in case.paths:
        src = Path(p)
        dst = target / "input" / src.name
        if src.is_dir():
            shutil.copytree(src, dst)
        elif src.exists():
            shutil.copy2(src, dst)
        saved.append(src.name)
    (target / "meta.json").write_text(json.dumps(
        {"reader": case.reader, "seed": case.seed, "outcome": outcome, "files": saved,
         "options": case.options, **meta}, indent=1, default=str))
    (target / "detail.txt").write_text(detail)
    return target


def _tree_bytes(path: Path) -> bytes:
    if path.is_dir():
        return b"".join(_tree_bytes(p) for p in sorted(path.rglob("*")) if p.is_file())
    return path.read_bytes() if path.exists() else b""


# =====================================================================================
# Worker and supervisor
# =====================================================================================

def _limit_address_space() -> None:
    try:
        with open("/proc/self/statm") as f:
            virtual = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return
    limit = virtual + ADDRESS_SPACE_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def worker(args) -> int:
    """Run inputs until told to stop; one JSON line per input on stdout."""
    import logging
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    torch.set_num_threads(1)
    logging.getLogger("protonet").setLevel(logging.ERROR)
    from protonet import limits
    from protonet.rng import set_random_seed
    out = sys.stdout
    sys.stdout = sys.stderr            # stray prints must not garble the protocol
    root = Path(args.scratch)
    ws = Workspace(root, Path(args.conformance) if args.conformance else None)
    readers = [READER_CLASSES[name]() for name in args.readers.split(",")]
    crashes = Path(args.crashes)
    with limits.override(max_blob_elements=BLOB_LIMIT, max_image_pixels=IMAGE_PIXEL_LIMIT):
        seeds = {r.name: r.seeds(ws) for r in readers}
        _limit_address_space()
        index = args.start
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline and (args.count <= 0 or index < args.count):
            reader = readers[index % len(readers)]
            rng = random.Random(f"{args.seed}/{reader.name}/{index}")
            set_random_seed(rng.randrange(1 << 31))
            pool = seeds[reader.name]
            seed = rng.choice(pool)
            try:
                case = reader.make(ws, seed, rng, rng.sample(pool, min(3, len(pool))))
            except Exception as e:          # a harness problem, not a finding
                print(json.dumps({"i": index, "reader": reader.name, "skip": repr(e)}),
                      file=out, flush=True)
                index += 1
                continue
            print(json.dumps({"i": index, "reader": reader.name, "start": case.paths,
                              "seed": case.seed, "options": case.options}, default=str),
                  file=out, flush=True)
            outcome, detail = run_case(reader, ws, case, args.timeout)
            record = {"i": index, "reader": reader.name, "outcome": outcome}
            if outcome in FAILURES + ("wrapped", "known"):
                saved = save_case(crashes, case, outcome, detail,
                                  {"fuzz_seed": args.seed, "index": index})
                record["saved"] = str(saved)
                record["detail"] = detail.strip().splitlines()[-1:] if detail else []
            print(json.dumps(record), file=out, flush=True)
            index += 1
    print(json.dumps({"done": index}), file=out, flush=True)
    return 0


def supervise(args) -> dict:
    """Run workers for --seconds, restarting any that die or hang; returns the summary."""
    counts = {name: {k: 0 for k in PASSES + FAILURES}
              for name in args.readers.split(",")}
    crashes = Path(args.crashes).resolve()
    crashes.mkdir(parents=True, exist_ok=True)
    failures = []
    scratch = Path(tempfile.mkdtemp(prefix="protonet-fuzz-"))
    deadline = time.monotonic() + args.seconds
    index = 0
    started = time.monotonic()
    try:
        while time.monotonic() < deadline and (args.count <= 0 or index < args.count):
            left = max(1.0, deadline - time.monotonic())
            command = [sys.executable, __file__, "--worker", "--seed", str(args.seed),
                       "--start", str(index), "--seconds", str(left),
                       "--count", str(args.count), "--readers", args.readers,
                       "--scratch", str(scratch), "--crashes", str(crashes),
                       "--timeout", str(args.timeout),
                       "--conformance", str(args.conformance or "")]
            log = scratch / "worker.log"
            with open(log, "w") as errors:
                child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors,
                                         text=True,
                                         env={**os.environ, "OMP_NUM_THREADS": "1"})
                before = index
                index, current, done = _follow(child, args, counts, failures, crashes)
            if current is None and index == before and not done:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the fuzz worker failed before its first input:\n{tail}")
            if done:
                break
            if current is not None:             # it died or hung on this input
                index = current["i"] + 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    total = {k: sum(c[k] for c in counts.values()) for k in PASSES + FAILURES}
    wrapped = [f for f in failures if f["outcome"] in ("wrapped", "known")]
    failures = [f for f in failures if f["outcome"] in FAILURES]
    return {"seed": args.seed, "seconds": round(time.monotonic() - started, 1),
            "tried": sum(total.values()), "failed": sum(total[k] for k in FAILURES),
            "total": total, "per_reader": counts, "failures": failures[:50],
            "wrapped": wrapped[:20], "crashes_dir": str(crashes)}


def _follow(child, args, counts, failures, crashes):
    """Read a worker's lines; returns (next index, input it died on or None, finished)."""
    import selectors
    current = None
    index = 0
    selector = selectors.DefaultSelector()
    selector.register(child.stdout, selectors.EVENT_READ)
    buffer = ""
    hard_limit = args.timeout * 3 + 60   # seeds are built before the first line
    last = time.monotonic()
    while True:
        ready = selector.select(timeout=1.0)
        if not ready:
            if child.poll() is not None:
                break
            if time.monotonic() - last > hard_limit:
                child.kill()
                child.wait()
                if current is not None:
                    _record_lost(current, "hang", child, counts, failures, crashes, args)
                    return current["i"] + 1, current, False
                return index, None, True
            continue
        chunk = child.stdout.readline()
        if not chunk:
            break
        last = time.monotonic()
        hard_limit = args.timeout * 3 + 10
        buffer = chunk
        try:
            line = json.loads(buffer)
        except ValueError:
            continue
        if "done" in line:
            child.wait()
            return line["done"], None, True
        if "start" in line:
            current = line
            continue
        if "outcome" in line:
            counts[line["reader"]][line["outcome"]] += 1
            if "saved" in line:
                failures.append(line)
            current = None
            index = line["i"] + 1
        elif "skip" in line:
            index = line["i"] + 1
    code = child.wait()
    if current is not None:
        _record_lost(current, "died", child, counts, failures, crashes, args, code)
        return current["i"] + 1, current, False
    return index, None, code == 0


def _record_lost(current, outcome, child, counts, failures, crashes, args, code=None):
    reader = current["reader"]
    counts[reader][outcome] += 1
    case = Case(reader, current.get("seed", "?"), current["start"], current.get("options", {}))
    detail = f"worker {outcome} (exit status {code})\n"
    saved = save_case(crashes, case, outcome, detail, {"fuzz_seed": args.seed,
                                                       "index": current["i"]})
    failures.append({"i": current["i"], "reader": reader, "outcome": outcome,
                     "saved": str(saved), "detail": [detail.strip()]})


def replay(folder: Path, conformance: Path | None) -> int:
    """Run a saved input once, in this process, and print the outcome."""
    from protonet import limits
    meta = json.loads((folder / "meta.json").read_text())
    scratch = Path(tempfile.mkdtemp(prefix="protonet-replay-"))
    try:
        with limits.override(max_blob_elements=BLOB_LIMIT,
                             max_image_pixels=IMAGE_PIXEL_LIMIT):
            ws = Workspace(scratch, conformance)
            reader = READER_CLASSES[meta["reader"]]()
            paths = []
            for name in meta["files"]:
                src = folder / "input" / name
                dst = ws.fresh(reader.name, name)
                (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
                paths.append(str(dst))
            if reader.name in ("solverstate", "hdf5") and meta["options"].get("kind") in (
                    "conf", "sgd", "rmsprop_h5", "state"):
                folder_for = (ws.conf_solvers if meta["options"]["kind"] == "conf"
                              else ws.work) / "snap"
                moved = folder_for / Path(paths[0]).name
                shutil.move(paths[0], moved)
                paths[0] = str(moved)
            case = Case(reader.name, meta["seed"], paths, meta["options"])
            outcome, detail = run_case(reader, ws, case, 60.0)
        print(f"{reader.name}: {outcome}")
        print(detail)
        return 0 if outcome in PASSES else 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="time budget")
    parser.add_argument("--count", type=int, default=0, help="stop after this many inputs")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--readers", default=",".join(READERS))
    parser.add_argument("--crashes", default="fuzz-crashes",
                        help="folder for failing inputs")
    parser.add_argument("--conformance", default=str(DEFAULT_CONFORMANCE),
                        help="fixture folder to take seeds from ('' for none)")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per input")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--replay", help="run one saved failing input again")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.readers.split(",")) - set(READERS)
    if unknown:
        parser.error(f"unknown readers {sorted(unknown)}; known: {', '.join(READERS)}")
    if args.conformance and not Path(args.conformance).is_dir():
        args.conformance = ""
    if args.replay:
        return replay(Path(args.replay), Path(args.conformance) if args.conformance else None)
    if args.worker:
        return worker(args)
    summary = supervise(args)
    if args.json:
        print(json.dumps(summary))
    else:
        _print_summary(summary)
    return 1 if summary["failed"] else 0


def _print_summary(summary: dict) -> None:
    columns = PASSES + FAILURES
    print(f"fuzz seed {summary['seed']}: {summary['tried']} inputs in "
          f"{summary['seconds']} s, {summary['failed']} failures")
    print(f"{'reader':<12}" + "".join(f"{c:>10}" for c in columns))
    for name, row in summary["per_reader"].items():
        print(f"{name:<12}" + "".join(f"{row[c]:>10}" for c in columns))
    for failure in summary["failures"] + summary["wrapped"]:
        print(f"  {failure['reader']} #{failure['i']} {failure['outcome']}: "
              f"{' '.join(failure.get('detail', []))[:200]} -> {failure.get('saved')}")


if __name__ == "__main__":
    sys.exit(main())
