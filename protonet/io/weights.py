"""Trained weights in and out: Caffe's binary .caffemodel and its HDF5 variant.

Copying follows Caffe's Net::CopyTrainedLayersFrom: layers match by name, layers the
file lacks keep their fillers, layers the net lacks are ignored, and a shape
mismatch is an error that tells the user to rename the layer to learn it afresh.
"""
from __future__ import annotations

import logging
import os
from typing import Iterable

import numpy as np
import torch

from ..errors import ParseError, WeightsError
from ..proto import caffe_pb2
from .atomic import atomic_call
from .binary import write_binary

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
    if diff:
        values = blob.double_diff if len(blob.double_diff) else blob.diff
    else:
        values = blob.double_data if len(blob.double_data) else blob.data
    array = np.asarray(values, dtype=np.float32)
    count = int(np.prod(shape)) if shape else len(array)
    if array.size != count:
        raise WeightsError(f"{where}: holds {array.size} values but its shape "
                           f"{list(shape)} needs {count}")
    return array.reshape(shape if shape else (count,))


def array_to_blob(array, blob: caffe_pb2.BlobProto | None = None,
                  diff=None) -> caffe_pb2.BlobProto:
    """Fill a BlobProto (shape + float data, optional diff) from an array or tensor."""
    blob = blob if blob is not None else caffe_pb2.BlobProto()
    data = _numpy(array)
    blob.shape.dim.extend(data.shape)
    blob.data.extend(data.ravel().tolist())
    if diff is not None:
        blob.diff.extend(_numpy(diff).ravel().tolist())
    return blob


def _numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(value, dtype=np.float32)


def read_weights(path: str) -> caffe_pb2.NetParameter:
    """A NetParameter with blobs, from a .caffemodel (any version) or .h5 file."""
    if str(path).endswith((".h5", ".hdf5")):
        return _read_hdf5(path)
    from .upgrade import read_net_binary
    return read_net_binary(path)


def _read_hdf5(path: str) -> caffe_pb2.NetParameter:
    import h5py
    net = caffe_pb2.NetParameter()
    try:
        with h5py.File(path, "r") as f:
            if "data" not in f:
                raise ParseError("HDF5 weights need a 'data' group (as Caffe writes)", path)
            for name, group in f["data"].items():
                layer = net.layer.add()
                layer.name = name
                for key in sorted(group.keys(), key=int):
                    array_to_blob(np.asarray(group[key], dtype=np.float32), layer.blobs.add())
    except FileNotFoundError:
        raise ParseError("file not found", path) from None
    except OSError as e:
        raise ParseError(f"not a readable HDF5 file ({e})", path) from None
    return net


def copy_trained_layers(layers: Iterable, source: caffe_pb2.NetParameter,
                        path: str = "weights", partial: bool = False) -> list[str]:
    """Copy blobs from `source` into same-named layers; returns the names copied.

    `partial` accepts fewer blobs than the layer has (HDF5 files omit shared params).
    """
    by_name = {layer.layer_name: layer for layer in layers}
    copied = []
    for src in source.layer:
        target = by_name.get(src.name)
        if target is None:
            if src.blobs:
                log.info("Ignoring source layer %s", src.name)
            continue
        if len(target.blobs) != len(src.blobs) and not (
                partial and len(src.blobs) < len(target.blobs)):
            raise WeightsError(f"{path}: layer '{src.name}' has {len(src.blobs)} blob(s) "
                               f"in the file, but the net's layer has {len(target.blobs)}")
        for j, blob in enumerate(src.blobs):
            mine = target.blobs[j]
            theirs = blob_shape(blob)
            if not _shapes_match(tuple(mine.shape), theirs):
                raise WeightsError(
                    f"{path}: cannot copy param {j} of layer '{src.name}': the file has "
                    f"shape {list(theirs)}, the net expects {list(mine.shape)}. To learn "
                    "this layer's parameters from scratch rather than copying them, "
                    "rename the layer.")
            values = blob_to_array(blob, where=f"{path}: layer '{src.name}' param {j}")
            with torch.no_grad():
                mine.copy_(torch.from_numpy(values.reshape(tuple(mine.shape))))
        if src.blobs:
            copied.append(src.name)
    return copied


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
    import h5py

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            data = f.create_group("data")
            diff = f.create_group("diff") if write_diff else None
            owned = {id(entry.param) for entry in module.learnable}
            written: set[int] = set()
            for layer in module.layers:
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
    os.chmod(path, 0o644)
