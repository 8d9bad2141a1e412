"""Solver snapshots in Caffe's two formats, so runs resume across Caffe and protonet.

A snapshot is a model file (`<prefix>_iter_N.caffemodel` or `.caffemodel.h5`) and a
solver state (`.solverstate`: the binary SolverState message; `.solverstate.h5`:
datasets `iter`, `learned_net`, `current_step` and group `history/<i>`, as Caffe's
SGDSolver writes them). Every file is written through protonet.io.atomic, so a run
killed while snapshotting never leaves a half-written file behind.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ParseError, SolverError
from ..io.atomic import atomic_call
from ..io.binary import read_binary, write_binary
from ..io.hdf5 import creating, read_array, reading
from ..io.weights import array_to_blob, blob_to_array
from ..proto import caffe_pb2


@dataclass
class SolverStateData:
    """What a solverstate holds, whichever format it came from."""
    iter: int
    learned_net: str
    current_step: int
    history: list[np.ndarray]


def snapshot_filename(prefix: str, iteration: int, extension: str) -> str:
    return f"{prefix}_iter_{iteration}{extension}"


def write_state(path: str, state: SolverStateData) -> None:
    """Write `state` as HDF5 when `path` ends in .h5, else as binary protobuf."""
    if path.endswith(".h5"):
        _write_state_hdf5(path, state)
    else:
        _write_state_binary(path, state)


def read_state(path: str) -> SolverStateData:
    """Read a solverstate (ours or Caffe's); HDF5 when `path` ends in .h5, as Caffe."""
    if path.endswith(".h5"):
        return _read_state_hdf5(path)
    return _read_state_binary(path)


def _write_state_binary(path: str, state: SolverStateData) -> None:
    message = caffe_pb2.SolverState(iter=state.iter, learned_net=state.learned_net,
                                    current_step=state.current_step)
    for blob in state.history:
        array_to_blob(blob, message.history.add())
    write_binary(path, message)


def _read_state_binary(path: str) -> SolverStateData:
    message = read_binary(path, caffe_pb2.SolverState())
    history = [blob_to_array(b, where=f"{path}: history blob {i}")
               for i, b in enumerate(message.history)]
    return SolverStateData(message.iter, message.learned_net, message.current_step, history)


def _write_state_hdf5(path: str, state: SolverStateData) -> None:
    def write(tmp: str) -> None:
        with creating(tmp) as f:
            f.create_dataset("iter", data=np.array([state.iter], dtype=np.int32))
            _write_c_string(f, "learned_net", state.learned_net)
            f.create_dataset("current_step",
                             data=np.array([state.current_step], dtype=np.int32))
            group = f.create_group("history")
            for i, blob in enumerate(state.history):
                group.create_dataset(str(i), data=np.asarray(blob, dtype=np.float32))
    atomic_call(path, write)


def _write_c_string(f, name: str, text: str) -> None:
    """A scalar NUL-terminated string dataset, as HDF5's H5LTmake_dataset_string."""
    import h5py
    raw = text.encode("utf-8") + b"\0"
    string_type = h5py.h5t.C_S1.copy()
    string_type.set_size(len(raw))
    string_type.set_strpad(h5py.h5t.STR_NULLTERM)
    space = h5py.h5s.create(h5py.h5s.SCALAR)
    dataset = h5py.h5d.create(f.id, name.encode(), string_type, space)
    dataset.write(h5py.h5s.ALL, h5py.h5s.ALL, np.array(raw, dtype=f"S{len(raw)}"))


def _read_state_hdf5(path: str) -> SolverStateData:
    import h5py

    def fail(message: str) -> ParseError:
        return ParseError(f"not a readable HDF5 solver state: {message}", path)

    with reading(path, fail) as f:
        for key in ("iter", "current_step", "history"):
            if key not in f:
                raise SolverError(f"{path}: not a solver state: no '{key}' in the file")
        learned = ""
        if "learned_net" in f:
            node = f["learned_net"]
            if not isinstance(node, h5py.Dataset) or node.dtype.kind not in "SUOV" \
                    or node.size > 1:
                raise fail("'learned_net' is not a string")
            raw = node[()]
            raw = raw.tobytes() if isinstance(raw, np.ndarray) else raw
            raw = raw.encode("utf-8") if isinstance(raw, str) else bytes(raw)
            learned = _decode_name(raw.split(b"\0", 1)[0], path)
        group = f["history"]
        if not isinstance(group, h5py.Group):
            raise fail("'history' is not a group")
        history = []
        for i in range(len(group)):
            if str(i) not in group:
                raise fail(f"history holds {sorted(group.keys())[:10]}; expected "
                           f"datasets named 0 to {len(group) - 1}")
            history.append(read_array(group[str(i)], f"history/{i}", fail))
        return SolverStateData(_scalar_int(f["iter"], "iter", fail), learned,
                               _scalar_int(f["current_step"], "current_step", fail),
                               history)


def _scalar_int(node, name: str, fail) -> int:
    values = read_array(node, name, fail, dtype=np.float64).reshape(-1)
    if values.size < 1 or not np.isfinite(values[0]) or \
            not -2**31 <= values[0] < 2**31 or values[0] != int(values[0]):
        raise fail(f"'{name}' should hold one int32, got {values[:4].tolist()}")
    return int(values[0])


def _decode_name(raw: bytes, path: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ParseError("the model file name it holds (learned_net) is not UTF-8 text",
                         path) from None


def resolve_learned_net(state_path: str, learned_net: str) -> str:
    """Where the model file named in a state is: as written (relative to the current
    directory, as Caffe reads it), else next to the state file."""
    if not learned_net or os.path.exists(learned_net):
        return learned_net
    beside = os.path.join(os.path.dirname(state_path), os.path.basename(learned_net))
    if os.path.exists(beside):
        return beside
    raise SolverError(f"{state_path}: the model file it names, '{learned_net}', was not "
                      f"found (nor at {beside})")


def check_history(history: list[torch.Tensor], saved: list[np.ndarray], path: str) -> None:
    """Raise unless the saved history blobs fit the solver's, in count and sizes."""
    if len(saved) != len(history):
        raise SolverError(f"{path}: has {len(saved)} history blobs, this solver needs "
                          f"{len(history)} (a different net or solver type?)")
    for i, (mine, theirs) in enumerate(zip(history, saved)):
        if theirs.size != mine.numel():
            raise SolverError(f"{path}: history blob {i} has shape {list(theirs.shape)}, "
                              f"the param it belongs to {list(mine.shape)}")


def load_history(history: list[torch.Tensor], saved: list[np.ndarray], path: str) -> None:
    """Copy saved history blobs into the solver's, checking count and sizes."""
    check_history(history, saved, path)
    for mine, theirs in zip(history, saved):
        with torch.no_grad():
            mine.copy_(torch.from_numpy(theirs.reshape(tuple(mine.shape))))
