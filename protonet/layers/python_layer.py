"""The `Python` layer type: a layer written by the user against pycaffe's contract.

`python_param { module: "m" layer: "C" param_str: "..." }` imports module `m` (it must be
importable: on sys.path or PYTHONPATH; the prototxt's folder is not added) and builds
`m.C(layer_param)`, a subclass of `PythonLayer`. As in pycaffe, the instance gets
`param_str` and `phase`, then `setup(bottom, top)` once, and `reshape(bottom, top)`
before every `forward(bottom, top)`; `backward(top, propagate_down, bottom)` writes the
bottom diffs (and param diffs). Blobs are numpy-backed objects with `.data`, `.diff` and
`.reshape(*shape)`; `self.blobs.add_blob(*shape)` makes a learnable param. The user's code
runs on CPU numpy arrays; an autograd Function ties it into the torch graph.
`share_in_parallel`, deprecated in Caffe, is accepted and has no effect.

This runs user code by design: building a net with a Python layer imports the module
its python_param names (running the module's top-level code) and instantiates the
named class, which must be a PythonLayer subclass; nothing else is imported or
called. A prototxt with Python layers is a program (docs/guarantees.md).
"""
from __future__ import annotations

import importlib
from contextlib import contextmanager

import numpy as np
import torch

from ..errors import NetError, also_a, closest
from .base import TEST, Layer
from .registry import register


class PythonLayer:
    """Base class of user layers (pycaffe's `caffe.Layer`)."""

    type = "Python"

    def __init__(self, layer_param=None):
        self.layer_param = layer_param
        self.param_str = ""
        self.phase = TEST
        self.blobs: list = []

    def setup(self, bottom, top):
        """Check params and create param blobs; runs once, before the first reshape."""

    def reshape(self, bottom, top):
        raise NotImplementedError(f"{type(self).__name__} must define reshape(bottom, top)")

    def forward(self, bottom, top):
        raise NotImplementedError(f"{type(self).__name__} must define forward(bottom, top)")

    def backward(self, top, propagate_down, bottom):
        raise NotImplementedError(f"{type(self).__name__} must define "
                                  "backward(top, propagate_down, bottom)")


class NumpyBlob:
    """pycaffe's Blob as a Python layer sees it: float32 `.data` and `.diff` arrays."""

    def __init__(self, data: np.ndarray | None = None):
        self.hold(np.zeros(0, np.float32) if data is None else data)

    def hold(self, data: np.ndarray, diff: np.ndarray | None = None) -> None:
        """Make these arrays the blob's data and diff (diff zeros if not given)."""
        self._data = data
        self._diff = np.zeros_like(data) if diff is None else diff

    @property
    def data(self) -> np.ndarray:
        return self._data

    @property
    def diff(self) -> np.ndarray:
        return self._diff

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def count(self) -> int:
        return int(self.data.size)

    def legacy_dim(self, axis: int) -> int:
        """Caffe's LegacyShape: axes past the blob's own count as 1."""
        shape = self.shape
        return shape[axis] if axis < len(shape) else 1

    num = property(lambda self: self.legacy_dim(0))
    channels = property(lambda self: self.legacy_dim(1))
    height = property(lambda self: self.legacy_dim(2))
    width = property(lambda self: self.legacy_dim(3))

    def reshape(self, *shape: int) -> None:
        """Give the blob a new shape; data and diff start at zero."""
        dims = tuple(int(d) for d in shape)
        if any(d < 0 for d in dims):
            raise ValueError(f"blob shape {list(dims)} has a negative dimension")
        self.hold(np.zeros(dims, np.float32))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={list(self.shape)})"


class ParamView(NumpyBlob):
    """A param of the host layer seen as a blob (numpy views on CPU)."""

    def __init__(self, host: "Python", index: int):
        self._host, self._index = host, index

    @property
    def data(self) -> np.ndarray:
        staged = self._host.staged_data
        return staged[self._index] if staged is not None else \
            _numpy(self._host.blobs[self._index])

    @property
    def diff(self) -> np.ndarray:
        staged = self._host.staged_diffs
        if staged is not None:
            return staged[self._index]
        param = self._host.blobs[self._index]
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        return _numpy(param.grad)

    def reshape(self, *shape: int) -> None:
        raise self._host.error("param blobs keep the shape add_blob gave them")


class ParamBlobs(list):
    """The user layer's `self.blobs`; the params live in the host layer."""

    def __init__(self, host: "Python"):
        super().__init__()
        self._host = host

    def add_blob(self, *shape: int) -> None:
        """Append a zero-filled learnable param of this shape (pycaffe's add_blob)."""
        self._host.add_blob(tuple(int(d) for d in shape))
        self.append(ParamView(self._host, len(self)))


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view on a CPU tensor, a copy of one on another device."""
    tensor = tensor.detach()
    return tensor.numpy() if tensor.device.type == "cpu" else tensor.cpu().numpy()


class PythonFunction(torch.autograd.Function):
    """Runs the user's reshape+forward, and backward, on numpy copies of the tensors."""

    @staticmethod
    def forward(ctx, host: "Python", num_bottoms: int, *tensors):
        bottom, top = host.bottom, host.top
        for blob, tensor in zip(bottom, tensors[:num_bottoms]):
            blob.hold(tensor.detach().cpu().numpy().copy())
        with host.staging(with_diffs=False):
            host.call("reshape", bottom, top)
            host.call("forward", bottom, top)
        ctx.host = host
        ctx.bottom_data = [b.data for b in bottom]
        ctx.top_data = [t.data.copy() for t in top]
        return tuple(torch.from_numpy(t.data.copy()).to(host.device) for t in top)

    @staticmethod
    def backward(ctx, *top_diffs):
        host, bottom, top = ctx.host, ctx.host.bottom, ctx.host.top
        needs = ctx.needs_input_grad[2:]
        for blob, data, diff in zip(top, ctx.top_data, top_diffs):
            blob.hold(data, np.array(diff.detach().cpu().numpy(), np.float32))
        for blob, data in zip(bottom, ctx.bottom_data):
            blob.hold(data)
        with host.staging(with_diffs=True) as param_diffs:
            host.call("backward", top, list(needs[:len(bottom)]), bottom)
        diffs = [b.diff for b in bottom] + param_diffs
        return (None, None, *(torch.from_numpy(d).to(host.device) if need else None
                              for d, need in zip(diffs, needs)))


@register("Python")
class Python(Layer):
    """Hosts a user's PythonLayer: builds it, infers shapes with it, runs it."""

    def __init__(self, param, phase=TEST):
        super().__init__(param, phase)
        self.user: PythonLayer | None = None
        self.bottom: list[NumpyBlob] = []   # the blobs the user's code sees; like
        self.top: list[NumpyBlob] = []      # Caffe's, they persist between calls
        self.staged_data: list[np.ndarray] | None = None
        self.staged_diffs: list[np.ndarray] | None = None

    @property
    def where(self) -> str:
        p = self.param.python_param
        return f"{p.module}.{p.layer}"

    def setup(self, bottom_shapes):
        self.user = self.instantiate()
        self.user.param_str = self.param.python_param.param_str
        self.user.phase = int(self.phase)
        self.user.blobs = ParamBlobs(self)
        self.bottom = [NumpyBlob(np.zeros(tuple(s), np.float32)) for s in bottom_shapes]
        self.top = [NumpyBlob() for _ in range(self.num_tops)]
        self.call("setup", self.bottom, self.top)

    def shape_bottoms(self, bottom_shapes) -> None:
        """Shape the bottoms for shape inference (zeros where the shape changes)."""
        for blob, shape in zip(self.bottom, bottom_shapes):
            if blob.shape != tuple(shape):
                blob.hold(np.zeros(tuple(shape), np.float32))

    def instantiate(self) -> PythonLayer:
        p = self.param.python_param
        if not p.module or not p.layer:
            raise self.error("python_param needs both 'module' and 'layer'")
        try:
            module = importlib.import_module(p.module)
        except ImportError as e:
            raise self.error(f"cannot import module '{p.module}' for class '{p.layer}': {e}. "
                             "The module must be importable (on sys.path or PYTHONPATH); "
                             "the prototxt's folder is not searched") from e
        except Exception as e:
            raise self.error(f"importing module '{p.module}' for class '{p.layer}' raised "
                             f"{type(e).__name__}: {e}") from e
        cls = getattr(module, p.layer, None)
        if cls is None:
            names = [n for n in vars(module) if not n.startswith("_")]
            raise self.error(f"module '{p.module}' ({getattr(module, '__file__', '?')}) "
                             f"has no class '{p.layer}'{closest(p.layer, names)}")
        if not (isinstance(cls, type) and issubclass(cls, PythonLayer)):
            raise self.error(f"{self.where} must be a class derived from "
                             "protonet.layers.python_layer.PythonLayer")
        try:
            return cls(self.param)
        except Exception as e:
            raise self.error(f"creating {self.where} raised {type(e).__name__}: {e}") from e

    def call(self, method: str, *args) -> None:
        """Call the user's method; its exceptions come back naming layer and class."""
        try:
            getattr(self.user, method)(*args)
        except NetError:
            raise
        except Exception as e:
            raise also_a(self.error(f"{self.where}.{method}() raised {type(e).__name__}: "
                                    f"{e}"), type(e)) from e

    def reshape(self, bottom_shapes):
        self.shape_bottoms(bottom_shapes)
        self.call("reshape", self.bottom, self.top)
        return [t.shape for t in self.top]

    def forward(self, *bottoms):
        return list(PythonFunction.apply(self, len(bottoms), *bottoms, *self.blobs))

    @contextmanager
    def staging(self, with_diffs: bool):
        """Host-side arrays for the params while user code runs: copies of data off
        the CPU (written back if the user changed them), zeroed diffs for backward."""
        params = list(self.blobs)
        off_cpu = any(p.device.type != "cpu" for p in params)
        self.staged_data = [_numpy(p).copy() for p in params] if off_cpu else None
        before = [d.copy() for d in self.staged_data] if off_cpu else []
        self.staged_diffs = [np.zeros(p.shape, np.float32) for p in params] \
            if with_diffs else None
        try:
            yield self.staged_diffs
            with torch.no_grad():
                for param, old, new in zip(params, before, self.staged_data or []):
                    if not np.array_equal(old, new):
                        param.data.copy_(torch.from_numpy(new))
        finally:
            self.staged_data = self.staged_diffs = None
