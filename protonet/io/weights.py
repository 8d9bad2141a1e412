"""Trained weights in and out: Caffe's binary .caffemodel and its HDF5 variant.

Copying follows Caffe's Net::CopyTrainedLayersFrom: layers match by name, layers the
file lacks keep their fillers, layers the net lacks are ignored, and a shape
mismatch is an error that tells the user to rename the layer to learn it afresh.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Iterable

import numpy as np
import torch

from ..errors import ParseError, WeightsError
from ..limits import shape_problem
from ..proto import caffe_pb2
from .atomic import atomic_call
from .binary import write_binary
from .forks import _encode_varint
from .hdf5 import creating, read_array, reading

log = logging.getLogger("protonet")


def blob_shape(blob: caffe_pb2.BlobProto) -> tuple[int, ...]:
    """A BlobProto's shape, from `shape` or the legacy num/channels/height/width."""
    if blob.HasField("shape"):
        return tuple(int(d) for d in blob.shape.dim)
    if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        return (blob.num, blob.channels, blob.height, blob.width)
    return ()


def blob_to_array(blob: caffe_pb2.BlobProto, diff: bool = False,
                  where: str = "blob") -> np.ndarray:
    """BlobProto values as a float32 array in the blob's shape."""
    shape = blob_shape(blob)
    problem = shape_problem(shape)
    if problem:
        raise WeightsError(f"{where}: {problem}")
    if diff:
        values = blob.double_diff if len(blob.double_diff) else blob.diff
    elif blob.raw_data:
        values = _raw_values(blob, where)
    else:
        values = blob.double_data if len(blob.double_data) else blob.data
    array = np.asarray(values, dtype=np.float32)
    count = math.prod(shape) if shape else len(array)
    if array.size != count:
        raise WeightsError(f"{where}: holds {array.size} values but its shape "
                           f"{list(shape)} needs {count}")
    return array.reshape(shape if shape else (count,))


# NVCaffe's / OpenCV's BlobProto.raw_data: little-endian values of raw_data_type.
_RAW_DTYPES = {caffe_pb2.FLOAT16: np.dtype("<f2"), caffe_pb2.FLOAT: np.dtype("<f4"),
               caffe_pb2.DOUBLE: np.dtype("<f8")}


def _raw_values(blob: caffe_pb2.BlobProto, where: str) -> np.ndarray:
    """The values of a blob stored as raw bytes (fp16 in cv2.dnn.shrinkCaffeModel's
    and NVCaffe's files), widened to float32 by the caller."""
    if not blob.HasField("raw_data_type"):
        raise WeightsError(f"{where}: has raw_data but no raw_data_type (FLOAT16, "
                           "FLOAT or DOUBLE)")
    dtype = _RAW_DTYPES.get(blob.raw_data_type)
    if dtype is None:
        name = caffe_pb2.Type.Name(blob.raw_data_type)
        raise WeightsError(f"{where}: raw_data_type {name} is not a float type; "
                           "expected FLOAT16, FLOAT or DOUBLE")
    if len(blob.raw_data) % dtype.itemsize:
        raise WeightsError(f"{where}: raw_data has {len(blob.raw_data)} bytes, not a "
                           f"whole number of {dtype.itemsize}-byte "
                           f"{caffe_pb2.Type.Name(blob.raw_data_type)} values")
    return np.frombuffer(blob.raw_data, dtype=dtype)


def array_to_blob(array, blob: caffe_pb2.BlobProto | None = None,
                  diff=None) -> caffe_pb2.BlobProto:
    """Fill a BlobProto (shape + float data, optional diff) from an array or tensor."""
    blob = blob if blob is not None else caffe_pb2.BlobProto()
    data = _numpy(array)
    blob.shape.dim.extend(data.shape)
    packed = _packed_floats(_DATA_FIELD, data)
    if diff is not None:
        packed += _packed_floats(_DIFF_FIELD, _numpy(diff))
    blob.MergeFromString(packed)
    return blob


_DATA_FIELD, _DIFF_FIELD = 5, 6     # BlobProto's packed float fields


def _packed_floats(field: int, values: np.ndarray) -> bytes:
    """A packed repeated-float field's wire bytes (tag, length, little-endian floats).
    Merging these fills the field natively: extending it from a Python list would
    make a 32-byte float object per value (1.5 GB for AlexNet's 61M params)."""
    raw = values.astype("<f4", copy=False).tobytes()
    return _encode_varint(field << 3 | 2) + _encode_varint(len(raw)) + raw


def _numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(value, dtype=np.float32)


def read_weights(path: str) -> caffe_pb2.NetParameter:
    """A NetParameter with blobs, from a .caffemodel (any version) or HDF5 file.

    HDF5 is recognised by its name (.h5, .hdf5) or, as Caffe does, by its content.
    A param the HDF5 file lacks (Caffe does not write shared params) is an empty
    BlobProto at its index; see `copy_trained_layers`.
    """
    if str(path).endswith((".h5", ".hdf5")) or is_hdf5(path):
        return _read_hdf5(path)
    from .upgrade import read_net_binary
    return read_net_binary(path)


def is_hdf5(path: str) -> bool:
    """Caffe's H5Fis_hdf5 test, false for anything that cannot be opened."""
    if not os.path.isfile(path):
        return False
    import h5py
    try:
        return bool(h5py.is_hdf5(path))
    except (OSError, ValueError):
        return False


def _read_hdf5(path: str) -> caffe_pb2.NetParameter:
    import h5py
    net = caffe_pb2.NetParameter()

    def fail(message: str) -> ParseError:
        return ParseError(message, path)

    with reading(path, fail) as f:
        data = f.get("data")
        if not isinstance(data, h5py.Group):
            raise fail("HDF5 weights need a 'data' group (as Caffe writes)")
        for name, group in data.items():
            if not isinstance(group, h5py.Group):
                raise fail(f"data/{name} is a dataset; Caffe's layout is "
                           "data/<layer>/<param index>")
            indices = _param_indices(group, f"data/{name}", fail)
            layer = net.layer.add()
            layer.name = name
            for j in range(max(indices) + 1 if indices else 0):
                blob = layer.blobs.add()        # stays empty where the file has none
                if j in indices:
                    values = read_array(group[indices[j]], f"data/{name}/{j}", fail)
                    array_to_blob(values, blob)
    return net


# No Caffe layer has this many params; a bigger index is damage, not a layout.
MAX_PARAM_INDEX = 1 << 16


def _param_indices(group, where: str, fail) -> dict[int, str]:
    """{param index: dataset name} of a layer group, names checked."""
    indices = {}
    for key in group.keys():
        if not (key.isascii() and key.isdigit()) or int(key) > MAX_PARAM_INDEX:
            raise fail(f"group {where} holds '{key}', which is not a param index "
                       f"(0 to {MAX_PARAM_INDEX}); datasets: {sorted(group.keys())[:10]}")
        indices[int(key)] = key
    return indices


def copy_trained_layers(layers: Iterable, source: caffe_pb2.NetParameter,
                        path: str = "weights", partial: bool = False) -> list[str]:
    """Copy blobs from `source` into same-named layers; returns the names copied.

    A param the file lacks is fine when the net shares it from another layer, and an
    error otherwise (Caffe's CopyTrainedLayersFromHDF5). Lacking means an empty
    BlobProto (which Caffe's binary writer never produces) or, with `partial` (HDF5
    files), an index past the layer's last blob in the file.
    """
    layers = list(layers)
    by_name: dict = {}
    for layer in layers:    # the first of a name, as Caffe searches, preferring one
        known = by_name.get(layer.layer_name)   # with params (see below)
        if known is None or (not len(known.blobs) and len(layer.blobs)):
            by_name[layer.layer_name] = layer
    _refuse_ambiguous_names(layers, source, path)
    owner: dict[int, tuple[str, int]] = {}      # stored param -> first (layer, index)
    for layer in layers:
        for j in range(len(layer.blobs)):
            owner.setdefault(id(_stored_param(layer, j)), (layer.layer_name, j))
    copied = []
    for src in source.layer:
        target = by_name.get(src.name)
        if target is None:
            if src.blobs:
                log.info("Ignoring source layer %s", src.name)
            continue
        adapt = getattr(target, "adapt_to_stored_blobs", None)
        if adapt is not None:       # a layer type whose forks differ in blob count
            adapt(len(src.blobs))
        if len(target.blobs) != len(src.blobs) and not (
                partial and len(src.blobs) < len(target.blobs)):
            raise WeightsError(f"{path}: layer '{src.name}' has {len(src.blobs)} blob(s) "
                               f"in the file, but the net's layer has {len(target.blobs)}")
        for j in range(len(target.blobs)):
            stored = _stored_param(target, j)
            if j >= len(src.blobs) or not src.blobs[j].ListFields():
                if owner[id(stored)] != (src.name, j):
                    continue                    # shared: the owner's entry fills it
                raise WeightsError(f"{path}: layer '{src.name}' lacks param {j}, which "
                                   "the net's layer owns (not shared from another layer)")
            blob = src.blobs[j]
            mine = tuple(target.blobs[j].shape)     # the layer's own view of the param
            theirs = blob_shape(blob)
            if not _shapes_match(mine, theirs):
                raise WeightsError(
                    f"{path}: cannot copy param {j} of layer '{src.name}': the file has "
                    f"shape {list(theirs)}, the net expects {list(mine)}. To learn "
                    "this layer's parameters from scratch rather than copying them, "
                    "rename the layer.")
            values = blob_to_array(blob, where=f"{path}: layer '{src.name}' param {j}")
            with torch.no_grad():
                stored.copy_(torch.from_numpy(values.reshape(tuple(stored.shape))))
        if src.blobs:
            copied.append(src.name)
    return copied


def _refuse_ambiguous_names(layers: list, source: caffe_pb2.NetParameter,
                            path: str) -> None:
    """Duplicate layer names are fine (Caffe builds such nets) unless weights would
    go by that name: Caffe's CopyTrainedLayersFrom copies every file layer of a name
    into the net's first layer of that name, silently leaving the others filled
    at random or overwriting one file layer with another; protonet refuses."""
    in_net: dict[str, list] = {}
    for layer in layers:
        in_net.setdefault(layer.layer_name, []).append(layer)
    in_file: dict[str, int] = {}
    for src in source.layer:
        if src.blobs:
            in_file[src.name] = in_file.get(src.name, 0) + 1
    for name, count in in_file.items():
        targets = in_net.get(name, [])
        with_params = [t for t in targets if len(t.blobs)]
        if len(with_params) > 1:
            raise WeightsError(f"{path}: the net has {len(targets)} layers named '{name}' "
                               f"and {len(with_params)} of them have params; weights are "
                               "copied by layer name, so rename them")
        if count > 1 and with_params:
            raise WeightsError(f"{path}: the file has {count} layers named '{name}' with "
                               "weights; which one the net's layer gets is ambiguous")


def _stored_param(layer, index: int) -> torch.Tensor:
    """The Parameter behind layer.blobs[index]; a PERMISSIVE sharer sees its owner's
    through a reshape parametrization (protonet.net.module)."""
    parametrizations = getattr(layer.blobs, "parametrizations", None)
    if parametrizations is not None and str(index) in parametrizations:
        return parametrizations[str(index)].original
    return layer.blobs[index]


def copy_weights(layers: Iterable, path: str) -> list[str]:
    """Caffe's CopyTrainedLayersFrom for one file, binary or HDF5 (told by content)."""
    return copy_trained_layers(layers, read_weights(path), path, partial=is_hdf5(path))


def _shapes_match(mine: tuple[int, ...], theirs: tuple[int, ...]) -> bool:
    """Caffe's Blob::ShapeEquals, which lets legacy 4-D shapes pad with leading 1s."""
    if mine == theirs:
        return True
    if len(theirs) == 4 and len(mine) <= 4:
        padded = (1,) * (4 - len(mine)) + mine
        return padded == theirs
    return False


def net_to_proto(module, write_diff: bool = False) -> caffe_pb2.NetParameter:
    """The net's layers with their blobs, as Caffe's Net::ToProto writes them."""
    net = caffe_pb2.NetParameter()
    net.name = module.net_param.name
    for layer in module.layers:
        lp = net.layer.add()
        lp.CopyFrom(layer.param)
        del lp.blobs[:]
        for p in layer.blobs:
            grad = p.grad if write_diff and p.grad is not None else None
            if write_diff and grad is None:
                grad = torch.zeros_like(p)
            array_to_blob(p, lp.blobs.add(), grad)
    return net


def save_caffemodel(module, path: str, write_diff: bool = False) -> None:
    if str(path).endswith((".h5", ".hdf5")):
        save_hdf5(module, path, write_diff)
    else:
        write_binary(path, net_to_proto(module, write_diff))


def save_hdf5(module, path: str, write_diff: bool = False) -> None:
    """Caffe's Net::ToHDF5 layout: /data/<layer>/<i> (and /diff/... when asked)."""
    def write(tmp: str) -> None:
        with creating(tmp) as f:
            data = f.create_group("data")
            diff = f.create_group("diff") if write_diff else None
            owned = {id(entry.param) for entry in module.learnable}
            written: set[int] = set()
            for layer in module.layers:
                if layer.layer_name in data:        # a duplicate name (Caffe aborts)
                    if len(layer.blobs):
                        raise WeightsError(f"{path}: two layers are named "
                                           f"'{layer.layer_name}' and one has params; "
                                           "HDF5 weights are stored by layer name")
                    continue
                g = data.create_group(layer.layer_name)
                gd = diff.create_group(layer.layer_name) if diff is not None else None
                for j, p in enumerate(layer.blobs):
                    if id(p) in owned and id(p) not in written:  # sharers are not saved
                        written.add(id(p))
                        g.create_dataset(str(j), data=_numpy(p))
                    if gd is not None:
                        grad = p.grad if p.grad is not None else torch.zeros_like(p)
                        gd.create_dataset(str(j), data=_numpy(grad))
    atomic_call(path, write)
