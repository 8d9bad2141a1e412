"""Building a solver's nets from its SolverParameter, as Caffe's Solver::Init does.

Which field defines the train net (exactly one of net, net_param, train_net,
train_net_param), which test nets there are (test_net_param, test_net files, then the
generic net once per remaining test_iter), each net's NetState (phase, the net's own
state, then the solver's train_state/test_state), the --weights to start from, and
the test nets holding the train net's very param tensors. Also where a solver file
runs (solver_mode, device_id) and how its errors name the file.
"""
from __future__ import annotations

import contextlib
import logging
import os

import torch

from ..device import select_device
from ..errors import SolverError
from ..io.upgrade import read_net, read_solver, upgrade_solver
from ..io.weights import copy_weights
from ..net.module import NetModule
from ..proto import caffe_pb2

log = logging.getLogger("protonet")

SP = caffe_pb2.SolverParameter
TRAIN_NET_FIELDS = ("net", "net_param", "train_net", "train_net_param")


# -- devices ---------------------------------------------------------------------
def solver_device(param: caffe_pb2.SolverParameter) -> torch.device:
    """The device a solver file asks for: solver_mode GPU (when set) and device_id;
    the CPU, with a warning, when CUDA is unavailable."""
    if not (param.HasField("solver_mode") and param.solver_mode == SP.GPU):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        log.warning("solver_mode is GPU but CUDA is not available; using the CPU")
        return torch.device("cpu")
    return select_device(str(param.device_id))


def _read_solver_param(source) -> caffe_pb2.SolverParameter:
    if isinstance(source, caffe_pb2.SolverParameter):
        return upgrade_solver(source)
    return read_solver(os.fspath(source))


def _source_name(param) -> str:
    if isinstance(param, caffe_pb2.SolverParameter):
        return "<solver>"
    return os.fspath(param)


@contextlib.contextmanager
def _located(source: str):
    """SolverErrors raised inside name the solver file (when they do not already)."""
    try:
        yield
    except SolverError as e:
        if str(e).startswith(source):
            raise
        raise SolverError(f"{source}: {e}") from None


def _read_net_file(field: str, path: str) -> caffe_pb2.NetParameter:
    if not path:
        raise SolverError(f"'{field}' is empty; it should name a net prototxt")
    return read_net(path)


def _with_state(net: caffe_pb2.NetParameter, phase: int,
                override: caffe_pb2.NetState | None) -> caffe_pb2.NetParameter:
    """Caffe's NetState precedence: phase, then the net's own state, then the solver's."""
    state = caffe_pb2.NetState(phase=phase)
    state.MergeFrom(net.state)
    if override is not None:
        state.MergeFrom(override)
    net.state.CopyFrom(state)
    return net


def _share_trained(target: NetModule, source: NetModule) -> None:
    """Make same-named layers of `target` use `source`'s param tensors."""
    by_name = {layer.layer_name: layer for layer in source.layers}
    for layer in target.layers:
        theirs = by_name.get(layer.layer_name)
        if theirs is None:
            continue
        if len(theirs.blobs) != len(layer.blobs):
            raise SolverError(f"layer '{layer.layer_name}' has {len(layer.blobs)} param "
                              f"blobs in a test net, {len(theirs.blobs)} in the train net")
        for j, blob in enumerate(theirs.blobs):
            if blob.shape != layer.blobs[j].shape:
                raise SolverError(f"cannot share param {j} of layer '{layer.layer_name}' "
                                  f"with the test net: train shape {list(blob.shape)}, "
                                  f"test shape {list(layer.blobs[j].shape)}")
            layer.blobs[j] = blob


def load_weights(module: NetModule, paths: str) -> None:
    """Copy weights from a comma-separated list of .caffemodel/.h5 files or zoo:NAME."""
    from ..zoo import resolve_weights
    for path in resolve_weights(paths).split(","):
        if path:
            log.info("Finetuning from %s", path)
            copy_weights(module.layers, path)


def train_net(param: caffe_pb2.SolverParameter, device) -> NetModule:
    """The train net on `device`, with the solver's weights loaded."""
    p = param
    given = [f for f in TRAIN_NET_FIELDS if p.HasField(f)]
    if len(given) != 1:
        raise SolverError(f"a solver needs exactly one of {', '.join(TRAIN_NET_FIELDS)} "
                          f"to define the train net; found {len(given) or 'none'}"
                          f"{': ' + ', '.join(given) if given else ''}")
    field = given[0]
    if field.endswith("_param"):
        log.info("Creating training net specified in %s.", field)
        net = caffe_pb2.NetParameter()
        net.CopyFrom(getattr(p, field))
    else:
        log.info("Creating training net from %s file: %s", field, getattr(p, field))
        net = _read_net_file(field, getattr(p, field))
    module = NetModule(_with_state(net, caffe_pb2.TRAIN, p.train_state)).to(device)
    for weights in p.weights:
        load_weights(module, weights)
    return module


def test_net_params(param: caffe_pb2.SolverParameter
                    ) -> list[tuple[str, caffe_pb2.NetParameter]]:
    """(source description, NetParameter) per test net, in Caffe's order."""
    p = param
    if p.HasField("net") and p.HasField("net_param"):
        raise SolverError("give either net or net_param, not both")
    sources = [("test_net_param", _copy(n)) for n in p.test_net_param]
    sources += [(f"test_net file: {f}", _read_net_file("test_net", f)) for f in p.test_net]
    generic = p.HasField("net") or p.HasField("net_param")
    if len(p.test_iter) < len(sources) or (not generic and len(p.test_iter) != len(sources)):
        raise SolverError(f"test_iter must be given once per test net: "
                          f"{len(p.test_iter)} test_iter for {len(sources)} test net(s)")
    for _ in range(len(p.test_iter) - len(sources)):
        if p.HasField("net_param"):
            sources.append(("net_param", _copy(p.net_param)))
        else:
            sources.append((f"net file: {p.net}", _read_net_file("net", p.net)))
    if p.test_state and len(p.test_state) != len(sources):
        raise SolverError(f"test_state must be unspecified or given once per test net "
                          f"({len(p.test_state)} for {len(sources)})")
    if sources and p.test_interval <= 0:
        raise SolverError(f"test_interval must be positive when there are test nets, "
                          f"got {p.test_interval}")
    return sources


def test_nets(param: caffe_pb2.SolverParameter, train: NetModule, device
              ) -> list[NetModule]:
    """The test nets on `device`, sharing `train`'s param tensors."""
    modules = []
    for i, (source, net) in enumerate(test_net_params(param)):
        state = param.test_state[i] if param.test_state else None
        log.info("Creating test net (#%d) specified by %s", i, source)
        module = NetModule(_with_state(net, caffe_pb2.TEST, state)).to(device)
        for weights in param.weights:
            load_weights(module, weights)
        _share_trained(module, train)
        modules.append(module)
    return modules


def _copy(message):
    duplicate = type(message)()
    duplicate.CopyFrom(message)
    return duplicate
