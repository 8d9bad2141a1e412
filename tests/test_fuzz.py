"""Bad input gives a located ProtonetError, never a traceback, a hang or a huge allocation.

`test_bounded_fuzz_run` runs tools/fuzz.py (every reader, a fixed seed and input
count, under a time cap) in a child process and fails on any failure it reports;
its counts are printed (pytest -s shows them). The tests after it pin the bugs
earlier fuzz runs found, one small input each, so they stay fixed.
"""
from __future__ import annotations

import json
import math
import resource
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from conformance import ROOT
from protonet import limits
from protonet.data.datum import decode_datum, encoded_datum, image_size
from protonet.data.imageset import compute_image_mean, read_image, read_image_list
from protonet.errors import DataError, NetError, ParseError, ProtonetError, ShapeError, \
    SolverError, WeightsError
from protonet.io.binary import parse_binary
from protonet.io.text import parse_text
from protonet.io.weights import blob_to_array, read_weights
from protonet.net.module import NetModule
from protonet.proto import caffe_pb2
from protonet.pycaffe import Net
from protonet.solver.lr_policy import make_policy
from protonet.solver.snapshot import read_state

REPO = Path(__file__).resolve().parents[1]
FUZZ_SEED = 20261123
FUZZ_COUNT = 6000           # inputs; about 20-40 s on two cores
FUZZ_SECONDS = 60           # the cap, should a slow machine not get through them


def test_bounded_fuzz_run(tmp_path):
    conformance = str(ROOT) if ROOT.is_dir() else ""
    command = [sys.executable, str(REPO / "tools" / "fuzz.py"), "--seed", str(FUZZ_SEED),
               "--count", str(FUZZ_COUNT), "--seconds", str(FUZZ_SECONDS), "--json",
               "--crashes", str(tmp_path / "crashes"), "--conformance", conformance]
    done = subprocess.run(command, capture_output=True, text=True, timeout=FUZZ_SECONDS + 60)
    assert done.stdout.strip(), f"the fuzzer printed nothing:\n{done.stderr[-3000:]}"
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\nfuzz seed {FUZZ_SEED}: {summary['tried']} inputs in {summary['seconds']} s "
          f"(fixtures: {'yes' if conformance else 'no'})")
    for reader, row in summary["per_reader"].items():
        print(f"  {reader:<12} " + " ".join(f"{k}={v}" for k, v in row.items() if v))
    details = "\n".join(f"{f['reader']} #{f['i']} {f['outcome']}: {f.get('detail')} "
                        f"-> {f.get('saved')}" for f in summary["failures"])
    assert summary["failed"] == 0, f"fuzz failures (replay with tools/fuzz.py " \
                                   f"--replay DIR):\n{details}"
    assert summary["tried"] >= min(FUZZ_COUNT, 1500), summary["total"]
    assert all(sum(row.values()) > 0 for row in summary["per_reader"].values())


# -- the mutators themselves ----------------------------------------------------------
def test_mutations_are_seeded():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import fuzz
    finally:
        sys.path.remove(str(REPO / "tools"))
    import random
    data = bytes(range(256)) * 4
    first = [fuzz.mutate_bytes(data, random.Random(f"s/{i}")) for i in range(20)]
    again = [fuzz.mutate_bytes(data, random.Random(f"s/{i}")) for i in range(20)]
    assert first == again and len(set(first)) > 10
    text = (REPO / "examples" / "mnist" / "lenet.prototxt").read_text()
    mutator = fuzz.TextMutator()
    assert mutator(text, random.Random(3)) == mutator(text, random.Random(3)) != text


# -- regressions: images ---------------------------------------------------------------
def _png(width: int, height: int) -> bytes:
    ok, buffer = cv2.imencode(".png", np.zeros((6, 5, 3), np.uint8))
    data = bytearray(buffer.tobytes())
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def _jpeg(width: int, height: int) -> bytes:
    ok, buffer = cv2.imencode(".jpg", np.zeros((6, 5, 3), np.uint8))
    data = bytearray(buffer.tobytes())
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def _peak_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def test_lying_jpeg_header_is_refused_before_decoding():
    # Found by the fuzzer: OpenCV allocated 30000x30000x3 (2.7 GB) for a 600-byte file.
    data = _jpeg(30000, 30000)
    assert image_size(data) == (30000, 30000)
    before = _peak_kb()
    with pytest.raises(DataError, match=r"rec: image header says 30000x30000"):
        decode_datum(encoded_datum(data, 0), "rec")
    assert _peak_kb() - before < 200_000


def test_png_chunk_claiming_more_than_the_file_is_refused():
    # Found by the fuzzer: an IDAT length of 0xffffffff made OpenCV allocate 4 GiB.
    data = bytearray(_png(5, 6))
    idat = data.find(b"IDAT") - 4
    data[idat:idat + 4] = b"\xff\xff\xff\xff"
    before = _peak_kb()
    with pytest.raises(DataError, match=r"rec: PNG chunk at byte \d+ claims 4294967295"):
        decode_datum(encoded_datum(bytes(data), 0), "rec")
    assert _peak_kb() - before < 200_000


def test_image_limits_apply_to_files_resizes_and_opencv(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(_png(20000, 20000))
    with pytest.raises(DataError, match="big.png: image header says 20000x20000"):
        read_image(str(path))
    small = tmp_path / "small.png"
    cv2.imwrite(str(small), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DataError, match="cannot resize to 100000x100000"):
        read_image(str(small), 100000, 100000)
    with limits.override(max_image_pixels=10):
        with pytest.raises(DataError, match="over the limit of 10"):
            read_image(str(small))
    with pytest.raises(DataError, match="NUL byte"):
        read_image(str(small) + "\0x")
    with pytest.raises(DataError, match="rec: could not decode"):
        decode_datum(encoded_datum(b"", 0), "rec")


def test_image_list_labels_must_fit_int32(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("a.png 1\nb.png 99999999999\n")
    with pytest.raises(DataError, match=r"list.txt:2: label 99999999999"):
        read_image_list(str(listing))


def test_corrupt_record_in_a_database_names_the_record(tmp_path):
    import lmdb
    ok, png = cv2.imencode(".png", np.zeros((6, 5, 3), np.uint8))
    bad = bytearray(png.tobytes())
    bad[bad.find(b"IDAT") - 4:bad.find(b"IDAT")] = b"\xff\xff\xff\xff"
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"0", encoded_datum(png.tobytes(), 0).SerializeToString())
        txn.put(b"1", encoded_datum(bytes(bad), 0).SerializeToString())
    env.close()
    with pytest.raises(DataError, match=r"db record '1': PNG chunk"):
        compute_image_mean(str(tmp_path / "db"), workers=1, progress=False)


# -- regressions: protobuf files --------------------------------------------------------
def test_non_utf8_strings_in_binary_files_are_refused(tmp_path):
    # Found by the fuzzer: protobuf returns such strings as bytes, which crashed the
    # V1 upgrade (UnicodeDecodeError) and Solver.restore (TypeError).
    with pytest.raises(ParseError, match=r"w.caffemodel: field input\[0\] is not UTF-8"):
        parse_binary(b"\x1a\x02\xff\xfe", caffe_pb2.NetParameter(), "w.caffemodel")
    state = tmp_path / "s.solverstate"
    state.write_bytes(b"\x12\x03a\xffb")
    with pytest.raises(ParseError, match="s.solverstate"):
        read_state(str(state))


def test_blob_shapes_are_checked_before_use():
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend([-1, -4])
    blob.data.extend([0.0] * 4)
    with pytest.raises(WeightsError, match=r"layer 'x' param 0: shape \[-1, -4\] has a "
                                           "negative dimension"):
        blob_to_array(blob, where="layer 'x' param 0")
    huge = caffe_pb2.BlobProto()
    huge.shape.dim.extend([1 << 40, 1 << 40])
    with pytest.raises(WeightsError, match="over the limit"):
        blob_to_array(huge, where="b")


def test_nul_in_file_names_is_a_parse_error():
    from protonet.io.upgrade import read_net
    with pytest.raises(ParseError, match="not a valid file name"):
        read_net("a\0b.prototxt")


# -- regressions: HDF5 ----------------------------------------------------------------
def _h5(path: Path, build) -> str:
    with h5py.File(path, "w") as f:
        build(f)
    return str(path)


def test_hdf5_dataset_declaring_more_than_the_file_holds(tmp_path):
    # Found by the fuzzer: a chunked dataset of shape (2**40,) was read into 4 TiB.
    path = _h5(tmp_path / "w.h5", lambda f: f.create_group("data/ip").create_dataset(
        "0", shape=(1 << 28,), dtype="f4", chunks=True))
    with pytest.raises(ParseError, match=r"w.h5: dataset 'data/ip/0' declares shape "
                                         r"\[268435456\].*stores only 0 bytes"):
        read_weights(path)


def test_hdf5_weights_with_the_wrong_layout(tmp_path):
    # Found by the fuzzer: AttributeError ('Dataset' object has no attribute 'keys').
    flat = _h5(tmp_path / "flat.h5", lambda f: f.create_dataset("data/ip", data=[1.0]))
    with pytest.raises(ParseError, match="flat.h5: data/ip is a dataset"):
        read_weights(flat)
    index = _h5(tmp_path / "index.h5", lambda f: f.create_dataset(
        "data/ip/999999999", data=[1.0]))
    with pytest.raises(ParseError, match="not a param index"):
        read_weights(index)
    text = _h5(tmp_path / "text.h5", lambda f: f.create_dataset(
        "data/ip/0", data=np.array([b"a", b"b"])))
    with pytest.raises(ParseError, match="expected integer or floating point"):
        read_weights(text)


def test_damaged_hdf5_files_name_the_file(tmp_path):
    good = _h5(tmp_path / "good.h5", lambda f: f.create_dataset("data/ip/0", data=[1.0]))
    raw = bytearray(Path(good).read_bytes())
    for offset in range(0, len(raw), 97):          # flip a byte here and there
        damaged = tmp_path / f"d{offset}.caffemodel.h5"
        copy = bytearray(raw)
        copy[offset] ^= 0x5A
        damaged.write_bytes(bytes(copy))
        try:
            read_weights(str(damaged))
        except ProtonetError as e:
            assert str(damaged) in str(e)


def test_hdf5_solver_state_fields_are_checked(tmp_path):
    def state(f):
        f["iter"] = np.array([np.nan])
        f["current_step"] = np.array([0])
        f.create_group("history")
    path = _h5(tmp_path / "s.solverstate.h5", state)
    with pytest.raises(ParseError, match="s.solverstate.h5.*'iter' should hold one int32"):
        read_state(path)


def test_hdf5_data_without_rows_is_an_error_not_a_hang(tmp_path):
    source = _h5(tmp_path / "d.h5", lambda f: (
        f.create_dataset("data", data=np.zeros((0, 3), np.float32)),
        f.create_dataset("label", data=np.zeros((0,), np.float32))))
    (tmp_path / "list.txt").write_text(source + "\n")
    net = parse_text(f"""layer {{ name: "d" type: "HDF5Data" top: "data" top: "label"
        hdf5_data_param {{ source: "{tmp_path / 'list.txt'}" batch_size: 2 }} }}""",
                     caffe_pb2.NetParameter())
    with pytest.raises(DataError, match="d.h5: dataset 'data' has no rows"):
        NetModule(net)


# -- regressions: nets ----------------------------------------------------------------
def _net(text: str) -> caffe_pb2.NetParameter:
    return parse_text(text, caffe_pb2.NetParameter())


INPUT = 'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'


def test_huge_params_are_refused_before_allocation():
    net = _net(INPUT + 'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" '
                       'inner_product_param { num_output: 2000000000 } }')
    before = _peak_kb()
    with limits.override(max_blob_elements=1 << 24):
        with pytest.raises(ShapeError, match=r"layer 'ip' \(InnerProduct\): param blob 0: "
                                             r"shape \[2000000000, 3\]"):
            NetModule(net)
    assert _peak_kb() - before < 200_000


def test_huge_tops_and_dummy_data_are_refused():
    big = _net('layer { name: "x" type: "Input" top: "x" input_param { shape { '
               'dim: 100000 dim: 100000 dim: 1000 } } }')
    with pytest.raises(ShapeError, match=r"layer 'x' \(Input\): top 'x': shape"):
        NetModule(big)
    dummy = _net('layer { name: "d" type: "DummyData" top: "d" dummy_data_param { '
                 'shape { dim: 50000 dim: 50000 } } }')
    with pytest.raises(ShapeError, match=r"layer 'd' \(DummyData\): top 0"):
        NetModule(dummy)
    odd = _net('layer { name: "x" type: "Input" top: "x" input_param { shape { '
               'dim: 0 dim: 4611686018427387904 } } }')
    with pytest.raises(ShapeError, match="a dimension of"):
        NetModule(odd)


def test_cycles_and_missing_bottoms_name_the_layer():
    cycle = _net(INPUT + 'layer { name: "a" type: "ReLU" bottom: "b" top: "a" }\n'
                         'layer { name: "b" type: "ReLU" bottom: "a" top: "b" }')
    with pytest.raises(NetError, match=r"layer 'a' \(ReLU\): unknown bottom blob 'b'"):
        NetModule(cycle)
    itself = _net(INPUT + 'layer { name: "c" type: "Concat" bottom: "x" bottom: "c" top: "c" }')
    with pytest.raises(NetError, match=r"layer 'c' \(Concat\): unknown bottom blob 'c'"):
        NetModule(itself)


def test_unsigned_fields_over_int_max_are_refused():
    # Found by the fuzzer: stride 2^31 passed setup and crashed torch in forward.
    net = _net('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 1 '
               'dim: 1 dim: 8 dim: 8 } } }\nlayer { name: "pool" type: "Pooling" '
               'bottom: "x" top: "y" pooling_param { pool: MAX kernel_size: 2 '
               'stride: 2147483648 } }')
    with pytest.raises(NetError, match=r"layer 'pool' \(Pooling\): pooling_param.stride = "
                                       "2147483648 is over 2147483647"):
        NetModule(net)


def test_errors_in_unnamed_layers_give_the_layer_index():
    net = _net(INPUT + 'layer { type: "ReLU" bottom: "nope" top: "y" }')
    with pytest.raises(NetError, match=r"layer '#1 \(unnamed\)' \(ReLU\): unknown bottom"):
        NetModule(net)
    net = _net(INPUT + 'layer { type: "NoSuchType" bottom: "x" top: "y" }')
    with pytest.raises(NetError, match=r"layer '#1 \(unnamed\)'.*unknown layer type"):
        NetModule(net)


def test_a_failing_layer_forward_names_the_layer():
    net = Net(_net('layer { name: "x" type: "Input" top: "x" input_param { shape { '
                   'dim: 2 dim: 0 dim: 6 dim: 7 } } }\n'
                   'layer { name: "mvn" type: "MVN" bottom: "x" top: "y" }'), caffe_pb2.TEST)
    with pytest.raises(NetError, match=r"layer 'mvn' \(MVN\): forward failed for bottoms "
                                       r"\[\[2, 0, 6, 7\]\]") as caught:
        net.forward()
    assert isinstance(caught.value.__cause__, RuntimeError)


# -- regressions: solvers ---------------------------------------------------------------
def _solver(**fields) -> caffe_pb2.SolverParameter:
    text = "\n".join(f"{k}: {json.dumps(v) if isinstance(v, str) else v}"
                     for k, v in fields.items())
    return parse_text(text, caffe_pb2.SolverParameter())


def test_lr_policies_follow_c_pow_instead_of_raising():
    # Found by the fuzzer: OverflowError for exp/step with a large gamma, a complex
    # number (then TypeError) for poly past max_iter.
    rate, _ = make_policy(_solver(lr_policy="exp", base_lr=0.1, gamma=10.0))(1000, 0)
    assert rate == math.inf
    rate, _ = make_policy(_solver(lr_policy="poly", base_lr=0.1, power=0.5,
                                  max_iter=10))(20, 0)
    assert math.isnan(rate)
    rate, _ = make_policy(_solver(lr_policy="inv", base_lr=0.1, gamma=0.0,
                                  power=1.0))(0, 0)
    assert rate == pytest.approx(0.1)


def test_solver_errors_name_the_solver_file(tmp_path):
    from protonet.solver import get_solver
    path = tmp_path / "bad.solver.prototxt"
    path.write_text('net: "net.prototxt"\nlr_policy: "nope"\n')
    with pytest.raises(SolverError, match=r"bad.solver.prototxt: unknown lr_policy 'nope'"):
        get_solver(str(path))
    path.write_text('net: ""\nlr_policy: "fixed"\n')
    with pytest.raises(SolverError, match=r"bad.solver.prototxt: 'net' is empty"):
        get_solver(str(path))
