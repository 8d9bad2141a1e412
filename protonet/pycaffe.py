"""pycaffe-style Net and Blob, so that scripts port with an import change.

`Net` owns a NetModule (the torch side) and keeps Caffe's stateful view on top of
it: blobs persist between calls, input blobs are written in place through numpy
views, and `backward` leaves diffs in blobs and params.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Sequence

import numpy as np
import torch
from torch.nn.utils import parametrize

from .errors import NetError, ProtonetError
from .io.upgrade import read_net
from .io.weights import copy_trained_layers, read_weights, save_caffemodel
from .net.module import NetModule
from .proto import caffe_pb2

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST


def _view(tensor: torch.Tensor | None) -> np.ndarray:
    if tensor is None:
        return np.zeros(0, dtype=np.float32)
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        return tensor.cpu().numpy()      # a copy: assign with `blob.data = ...` on GPU
    return tensor.numpy()


class Blob:
    """A named blob of the net: `.data` and `.diff` are numpy arrays (views on CPU)."""

    def __init__(self, net: "Net", blob_id: int):
        self._net, self._id = net, blob_id

    @property
    def data(self) -> np.ndarray:
        return _view(self._net._values[self._id])

    @data.setter
    def data(self, value) -> None:
        target = self._net._values[self._id]
        with torch.no_grad():
            target.copy_(torch.as_tensor(np.asarray(value, dtype=np.float32)))

    @property
    def diff(self) -> np.ndarray:
        value = self._net._diffs[self._id]
        if value is None:
            value = torch.zeros(self.shape, dtype=torch.float32)
            self._net._diffs[self._id] = value
        return _view(value)

    @property
    def shape(self) -> tuple[int, ...]:
        value = self._net._values[self._id]
        return tuple(value.shape) if value is not None else \
            self._net.module.blob_shapes[self._id]

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
            for path in ([weights] if isinstance(weights, str) else weights):
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
        self._loss: torch.Tensor | None = None
        self._leaves: dict[int, torch.Tensor] = {}
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
            current = self._values[self.module.blob_index[name]]
            if current is None or tuple(current.shape) != value.shape:
                raise NetError(f"input '{name}' has shape {list(value.shape)}, the blob "
                               f"{list(current.shape) if current is not None else None}; "
                               "reshape the blob first")
            self.blobs[name].data = value
        first = self._layer_index(start) if start is not None else 0
        last = self._layer_index(end) if end is not None else len(self.module.layers) - 1
        need_grad = torch.is_grad_enabled() and any(self.module.layer_need_backward)
        if first == 0:
            self._values = [self._values[i] if i in self.module.input_ids else None
                            for i in range(len(self._values))]
        with torch.set_grad_enabled(need_grad):
            inputs = self._graph_inputs() if need_grad else None
            values, loss = self.module(None, first, last, self._with_inputs(inputs))
        self._values = values
        self._loss = loss
        self._diffs = [None] * len(values)
        names = list(self.outputs) + [b for b in (blobs or []) if b not in self.outputs]
        if end is not None:
            names = [self.module.blob_names[t] for t in self.module.steps[last].tops] + \
                [b for b in (blobs or [])]
        return {n: self.blobs[n].data.copy() for n in names}

    def _graph_inputs(self) -> dict[int, torch.Tensor]:
        """Input blobs as leaves that collect a gradient when Caffe would give one."""
        leaves = {}
        for i in self.module.input_ids:
            value = self._values[i]
            if self.module.blob_need_backward[i]:
                value = value.detach().requires_grad_(True)
            leaves[i] = value
        return leaves

    def _with_inputs(self, leaves):
        values = list(self._values)
        if leaves:
            for i, v in leaves.items():
                values[i] = v
        self._leaves = leaves or {}
        return values

    def backward(self, diffs: Sequence[str] | None = None, start: str | None = None,
                 end: str | None = None, **kwargs) -> dict[str, np.ndarray]:
        """Back-propagate from the loss tops (seeded with their loss weights, as in
        Caffe) and from any top diffs given; returns the input blobs' diffs."""
        seeds: dict[int, torch.Tensor] = {}
        for step in self.module.steps:
            for pos, weight in step.losses:
                top = step.tops[pos]
                if self._values[top] is not None:
                    seeds[top] = torch.full_like(self._values[top].detach(), weight)
        for name, value in kwargs.items():
            if name not in self.module.blob_index:
                raise NetError(f"no blob named '{name}'")
            top = self.module.blob_index[name]
            seeds[top] = torch.as_tensor(np.asarray(value, dtype=np.float32),
                                         device=self.device).reshape(self._values[top].shape)
        pairs = [(self._values[t], g) for t, g in seeds.items()
                 if self._values[t] is not None and self._values[t].requires_grad]
        self._track_grads()
        if pairs:   # as in Caffe, a net where no layer needs backward computes nothing
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        self._collect_diffs()
        names = list(self.inputs) + list(diffs or [])
        return {n: self.blobs[n].diff.copy() for n in names}

    def _track_grads(self) -> None:
        for v in self._values:
            if v is not None and v.requires_grad and not v.is_leaf:
                v.retain_grad()

    def _collect_diffs(self) -> None:
        for i, v in enumerate(self._values):
            if v is None:
                continue
            leaf = self._leaves.get(i)
            source = leaf if leaf is not None else v
            if source.requires_grad and source.grad is not None:
                self._diffs[i] = source.grad.detach()

    def reshape(self) -> None:
        """Propagate input blob shapes through the net (pycaffe's net.reshape())."""
        shapes = {self.module.blob_names[i]: tuple(self._values[i].shape)
                  for i in self.module.input_ids}
        self.module.infer_shapes(shapes)

    def _set_blob(self, blob_id: int, tensor: torch.Tensor) -> None:
        self._values[blob_id] = tensor.to(torch.float32)
        if hasattr(self, "_diffs"):
            self._diffs[blob_id] = None

    def _layer_index(self, name: str) -> int:
        try:
            return self.module.layer_names.index(name)
        except ValueError:
            raise NetError(f"no layer named '{name}'") from None

    # -- weights -----------------------------------------------------------------
    def copy_from(self, path: str) -> None:
        """Copy trained weights by layer name (Caffe's CopyTrainedLayersFrom)."""
        copy_trained_layers(self.module.layers, read_weights(path), path,
                            partial=str(path).endswith((".h5", ".hdf5")))

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
