"""pycaffe-style Net and Blob, so that scripts port with an import change.

`Net` owns a NetModule (the torch side) and keeps Caffe's stateful view on top of
it: blobs persist between calls, input blobs are written in place through numpy
views, and `backward` leaves diffs in blobs and params.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Iterable, Sequence

import numpy as np
import torch
from torch.nn.utils import parametrize

from .errors import NetError, ProtonetError
from .io.upgrade import read_net
from .io.weights import copy_weights, save_caffemodel
from .net.module import NetModule
from .proto import caffe_pb2

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST


def _view(tensor: torch.Tensor | None) -> np.ndarray:
    if tensor is None:
        return np.zeros(0, dtype=np.float32)
    tensor = tensor.detach()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        return tensor.float().cpu().numpy()   # a copy (autocast blobs; numpy has no bf16)
    if tensor.device.type != "cpu":
        return tensor.cpu().numpy()      # a copy: assign with `blob.data = ...` on GPU
    return tensor.numpy()


class Blob:
    """A named blob of the net: `.data` and `.diff` are numpy arrays (views on CPU)."""

    def __init__(self, net: "Net", blob_id: int):
        self._net, self._id = net, blob_id

    @property
    def data(self) -> np.ndarray:
        return _view(self._net._value(self._id))

    @data.setter
    def data(self, value) -> None:
        with torch.no_grad():
            self._net._value(self._id).copy_(torch.as_tensor(np.asarray(value, np.float32)))

    @property
    def diff(self) -> np.ndarray:
        return _view(self._net._diff(self._id))

    @diff.setter
    def diff(self, value) -> None:
        self._net._diff(self._id).copy_(torch.as_tensor(np.asarray(value, np.float32)))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._net._value(self._id).shape)

    @property
    def count(self) -> int:
        return int(np.prod(self.shape))

    def _legacy(self, axis: int) -> int:
        """Caffe's LegacyShape: 1 for an axis the blob does not have."""
        shape = self.shape
        return shape[axis] if axis < len(shape) else 1

    @property
    def num(self) -> int:
        return self._legacy(0)

    @property
    def channels(self) -> int:
        return self._legacy(1)

    @property
    def height(self) -> int:
        return self._legacy(2)

    @property
    def width(self) -> int:
        return self._legacy(3)

    def reshape(self, *dims: int) -> None:
        """Give the blob a new shape (zeros); follow with net.reshape() for the rest."""
        self._net._set_blob(self._id, torch.zeros(tuple(int(d) for d in dims),
                                                   device=self._net.device))

    def __repr__(self) -> str:
        return f"Blob({self._net.module.blob_names[self._id]!r}, shape={list(self.shape)})"


class ParamBlob:
    """A learnable param seen as a Blob: `.data` is the weight, `.diff` its gradient."""

    def __init__(self, layer, index: int):
        self._layer, self._index = layer, index

    @property
    def _param(self) -> torch.Tensor:
        return self._layer.blobs[self._index]

    @property
    def _leaf(self) -> torch.nn.Parameter:
        """The stored Parameter (for a PERMISSIVE share, the owner's, in its shape)."""
        blobs = self._layer.blobs
        if parametrize.is_parametrized(blobs, str(self._index)):
            return blobs.parametrizations[str(self._index)].original
        return blobs[self._index]

    @property
    def data(self) -> np.ndarray:
        return _view(self._leaf).reshape(self.shape)

    @data.setter
    def data(self, value) -> None:
        with torch.no_grad():
            self._leaf.copy_(torch.as_tensor(np.asarray(value, dtype=np.float32))
                             .reshape(self._leaf.shape))

    @property
    def diff(self) -> np.ndarray:
        leaf = self._leaf
        if leaf.grad is None:
            leaf.grad = torch.zeros_like(leaf)
        return _view(leaf.grad).reshape(self.shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._param.shape)

    @property
    def count(self) -> int:
        return self._param.numel()

    def reshape(self, *dims: int) -> None:
        raise ProtonetError("param blobs keep the shape their layer gave them")

    def __repr__(self) -> str:
        return f"ParamBlob(shape={list(self.shape)})"


class LayerView:
    """pycaffe's net.layers[i] / net.layer_dict[name]: type and param blobs."""

    def __init__(self, layer):
        self._layer = layer
        self.type = layer.type
        self.name = layer.layer_name

    @property
    def blobs(self) -> list[ParamBlob]:
        return [ParamBlob(self._layer, i) for i in range(len(self._layer.blobs))]

    @property
    def module(self):
        return self._layer

    def __repr__(self) -> str:
        return f"Layer({self.name!r}, type={self.type!r})"


def _leaves_of(layer) -> list[torch.nn.Parameter]:
    """A layer's stored params (for a PERMISSIVE share, the owner's Parameter)."""
    return [ParamBlob(layer, i)._leaf for i in range(len(layer.blobs))]


def _unique(tensors: list) -> list:
    return list({id(t): t for t in tensors}.values())


class Net:
    """A Caffe net for scripts: `Net(prototxt, phase)` or `Net(prototxt, weights, phase)`."""

    def __init__(self, network_file, *args, weights: str | Sequence[str] | None = None,
                 phase: int | None = None, level: int = 0,
                 stages: Iterable[str] = (), device: str | torch.device = "cpu"):
        args = list(args)
        if args and isinstance(args[-1], int):
            phase = args.pop() if phase is None else phase
        if args:
            weights = args.pop(0) if weights is None else weights
        if args:
            raise TypeError("Net(network_file, [weights], phase)")
        if phase is None:
            raise TypeError("Net needs a phase: protonet.TRAIN or protonet.TEST")
        if isinstance(network_file, caffe_pb2.NetParameter):
            param = network_file
        else:
            param = read_net(str(network_file))
        module = NetModule(param, phase=phase, level=level, stages=list(stages))
        self._attach(module.to(device), torch.device(device))
        if weights:
            single = isinstance(weights, (str, os.PathLike))
            for path in ([weights] if single else weights):
                self.copy_from(path)

    @classmethod
    def from_module(cls, module: NetModule, device: str | torch.device = "cpu") -> "Net":
        """A pycaffe view on an existing NetModule (e.g. a solver's train net)."""
        net = cls.__new__(cls)
        net._attach(module, torch.device(device))
        return net

    def _attach(self, module: NetModule, device: torch.device) -> None:
        self.module = module
        self.device = device
        self._values: list[torch.Tensor | None] = [None] * len(self.module.blob_names)
        self._diffs: list[torch.Tensor | None] = [None] * len(self.module.blob_names)
        self._loss_weight = {step.tops[pos]: weight for step in module.steps
                             for pos, weight in step.losses}
        for i in self.module.input_ids:
            self._set_blob(i, torch.zeros(self.module.blob_shapes[i], device=self.device))

    # -- pycaffe attributes ------------------------------------------------------
    @property
    def blobs(self) -> "OrderedDict[str, Blob]":
        return OrderedDict((n, Blob(self, i)) for i, n in enumerate(self.module.blob_names))

    @property
    def params(self) -> "OrderedDict[str, list[ParamBlob]]":
        return OrderedDict((layer.layer_name, LayerView(layer).blobs)
                           for layer in self.module.layers if len(layer.blobs))

    @property
    def layers(self) -> list[LayerView]:
        return [LayerView(layer) for layer in self.module.layers]

    @property
    def layer_dict(self) -> "OrderedDict[str, LayerView]":
        return OrderedDict((layer.layer_name, LayerView(layer)) for layer in self.module.layers)

    @property
    def _layer_names(self) -> list[str]:
        return list(self.module.layer_names)

    @property
    def _blob_names(self) -> list[str]:
        return list(self.module.blob_names)

    @property
    def inputs(self) -> list[str]:
        return self.module.input_names

    @property
    def outputs(self) -> list[str]:
        return self.module.output_names

    @property
    def phase(self) -> int:
        return self.module.phase

    # -- running -----------------------------------------------------------------
    def forward(self, blobs: Sequence[str] | None = None, start: str | None = None,
                end: str | None = None, **kwargs) -> dict[str, np.ndarray]:
        """Run the net (or layers start..end); returns outputs (and `blobs`) as arrays."""
        for name, value in kwargs.items():
            if name not in self.inputs:
                raise NetError(f"'{name}' is not an input blob; inputs are {self.inputs}")
            value = np.asarray(value, dtype=np.float32)
            current = self._value(self.module.blob_index[name])
            if tuple(current.shape) != value.shape:
                raise NetError(f"input '{name}' has shape {list(value.shape)}, the blob "
                               f"{list(current.shape)}; reshape the blob first")
            self.blobs[name].data = value
        first = self._layer_index(start) if start is not None else 0
        last = self._layer_index(end) if end is not None else len(self.module.layers) - 1
        need_grad = torch.is_grad_enabled() and any(self.module.layer_need_backward)
        values = list(self._values)
        for i in self.module.input_ids:
            value = self._value(i).detach()
            values[i] = value.requires_grad_(need_grad and self.module.blob_need_backward[i])
        with torch.set_grad_enabled(need_grad):
            self._values, _ = self.module(None, first, last, values)
        names = list(self.outputs) if end is None else \
            [self.module.blob_names[t] for t in self.module.steps[last].tops]
        names += [b for b in (blobs or []) if b not in names]
        return {n: self.blobs[n].data.copy() for n in names}

    def backward(self, diffs: Sequence[str] | None = None, start: str | None = None,
                 end: str | None = None, **kwargs) -> dict[str, np.ndarray]:
        """Caffe's Backward over layers start..end (default: all, from the last).

        It starts from the diffs the range's final tops hold — loss weights on loss
        tops, whatever was written into `blob.diff`, or the keyword arguments — and
        leaves diffs in every blob of the range and accumulates them into params.
        """
        for name, value in kwargs.items():
            if name not in self.module.blob_index:
                raise NetError(f"no blob named '{name}'")
            self.blobs[name].diff[...] = np.asarray(value, dtype=np.float32)
        hi = self._layer_index(start) if start is not None else len(self.module.layers) - 1
        lo = self._layer_index(end) if end is not None else 0
        seeds, wrt = self._backward_range(lo, hi)
        tensors = [self._values[t] for t in seeds]
        grads = [self._diff(t).to(self._values[t].device) for t in seeds]
        targets = [self._values[b] for b in wrt]
        params = [p for step in self.module.steps[lo:hi + 1]
                  for p in _leaves_of(self.module.layers[step.layer]) if p.requires_grad]
        if tensors and (targets or params):  # as in Caffe: nothing needs backward, nothing runs
            for t in targets:
                t.grad = None
            torch.autograd.backward(tensors, grads, inputs=targets + _unique(params))
            for b, t in zip(wrt, targets):
                self._diffs[b] = (t.grad if t.grad is not None else
                                  torch.zeros_like(t)).detach()
        names = list(self.inputs) + [d for d in (diffs or []) if d not in self.inputs]
        return {n: self.blobs[n].diff.copy() for n in names}

    def input_tensors(self) -> dict[str, torch.Tensor]:
        """The input blobs' tensors, for code that runs `self.module` directly."""
        return {self.module.blob_names[i]: self._value(i) for i in self.module.input_ids}

    def adopt(self, values: list) -> None:
        """Show the blob values of a pass run on `self.module` directly (the solver's)."""
        self._values = list(values)
        self._diffs = [None] * len(values)

    def _backward_range(self, lo: int, hi: int) -> tuple[list[int], list[int]]:
        """Blobs that start the backward of layers lo..hi (tops no later layer in the
        range reads) and blobs that receive a diff (the rest that need a gradient)."""
        steps = self.module.steps[lo:hi + 1]
        last_read: dict[int, int] = {}
        last_made: dict[int, int] = {}
        for k, step in enumerate(steps):     # a layer reads (2k) before it writes (2k+1)
            for b in step.bottoms:
                last_read[b] = 2 * k
            for t in step.tops:
                last_made[t] = 2 * k + 1
        seeds, wrt = [], []
        for b in dict.fromkeys([*last_read, *last_made]):
            value = self._values[b]
            if value is None or not value.requires_grad:
                continue
            if b in last_made and last_read.get(b, -1) < last_made[b]:
                seeds.append(b)
            else:
                wrt.append(b)
        return seeds, wrt

    def reshape(self) -> None:
        """Propagate input blob shapes through the net (pycaffe's net.reshape())."""
        shapes = {self.module.blob_names[i]: tuple(self._value(i).shape)
                  for i in self.module.input_ids}
        self.module.infer_shapes(shapes)
        for i, shape in enumerate(self.module.blob_shapes):
            for store in (self._values, self._diffs):
                if store[i] is not None and tuple(store[i].shape) != shape:
                    store[i] = None

    def _value(self, blob_id: int) -> torch.Tensor:
        """The blob's data; a blob not computed yet is zeros, as Caffe allocates it."""
        if self._values[blob_id] is None:
            self._values[blob_id] = torch.zeros(self.module.blob_shapes[blob_id],
                                                device=self.device)
        return self._values[blob_id]

    def _diff(self, blob_id: int) -> torch.Tensor:
        """The blob's diff; a loss top starts with its loss weight, others with zeros."""
        diff = self._diffs[blob_id]
        value = self._value(blob_id)
        if diff is None or diff.shape != value.shape:
            diff = torch.full(tuple(value.shape), self._loss_weight.get(blob_id, 0.0),
                              device=value.device)
            self._diffs[blob_id] = diff
        return diff

    def _set_blob(self, blob_id: int, tensor: torch.Tensor) -> None:
        self._values[blob_id] = tensor.to(torch.float32)
        self._diffs[blob_id] = None


    def _layer_index(self, name: str) -> int:
        try:
            return self.module.layer_names.index(name)
        except ValueError:
            raise NetError(f"no layer named '{name}'") from None

    def set_input_arrays(self, data, labels) -> None:
        """Feed a MemoryData first layer (pycaffe's Net.set_input_arrays)."""
        from .data.layers import set_input_arrays
        set_input_arrays(self.module, data, labels)

    # -- weights -----------------------------------------------------------------
    def copy_from(self, path) -> None:
        """Copy trained weights by layer name (Caffe's CopyTrainedLayersFrom);
        `path` is a .caffemodel, an HDF5 file or zoo:NAME."""
        from .zoo import resolve_weights
        copy_weights(self.module.layers, resolve_weights(os.fspath(path)))

    def save(self, path: str) -> None:
        """Write the weights as a .caffemodel (or HDF5 for .h5), atomically."""
        save_caffemodel(self.module, path)

    def share_with(self, other: "Net") -> None:
        """Make this net use `other`'s param tensors (pycaffe's share_with)."""
        theirs = {layer.layer_name: layer for layer in other.module.layers}
        for layer in self.module.layers:
            source = theirs.get(layer.layer_name)
            if source is not None and len(source.blobs) == len(layer.blobs):
                for i, p in enumerate(source.blobs):
                    layer.blobs[i] = p
