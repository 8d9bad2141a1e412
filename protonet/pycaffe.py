"""pycaffe-style Net and Blob, so that scripts port with an import change.

`Net` owns a NetModule (the torch side) and keeps Caffe's stateful view on top of
it: blobs persist between calls, input blobs are written in place through numpy
views, and `backward` leaves diffs in blobs and params.
"""
from __future__ import annotations

import itertools
import os
import weakref
from collections import OrderedDict
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch.nn.utils import parametrize

from . import hostsync
from .errors import NetError, ProtonetError, also_a
from .io.upgrade import read_net
from .io.weights import (_read_hdf5, copy_trained_layers, copy_weights,
                         save_caffemodel, save_hdf5)
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
        return tensor.cpu().numpy()      # a copy; Nets off the CPU show hostsync buffers
    return tensor.numpy()


# Writable numpy views handed out of params (ParamBlob.data), by id(param): [serial of
# the latest, weak references to the tensors numpy keeps alive under them]. A write
# through such a view bumps no torch version counter, so this is how Net.forward knows
# that weights its cached inference plan folded and packed may have changed, across
# nets that share the param. A serial per param, from one global counter.
_param_views: dict[int, list] = {}
_view_serial = itertools.count(1)


def _param_view(leaf: torch.Tensor) -> np.ndarray:
    """`_view` of a param, noted in `_param_views` (the script may write into it)."""
    array = _view(leaf)
    entry = _param_views.setdefault(id(leaf), [0, []])
    entry[0] = next(_view_serial)
    owner = array.base          # what every view derived from this one keeps alive
    if isinstance(owner, torch.Tensor):
        entry[1] = [ref for ref in entry[1] if ref() is not None] + [weakref.ref(owner)]
    return array


def _view_state(leaf: torch.Tensor) -> int | None:
    """The serial of the param's latest view handed out (0: none), or None while a
    view of it may still be written (one is alive)."""
    entry = _param_views.get(id(leaf))
    if entry is None:
        return 0
    if entry[1]:
        entry[1] = [ref for ref in entry[1] if ref() is not None]
        if entry[1]:
            return None
    return entry[0]


class Blob:
    """A named blob of the net: `.data` and `.diff` are numpy views of its memory
    (on CPU; on a GPU, of a host buffer kept in sync as Caffe's SyncedMemory), and
    stay so across forward() and backward(), as pycaffe's do; a reshape may
    reallocate, as in Caffe."""

    def __init__(self, net: "Net", blob_id: int):
        self._net, self._id = net, blob_id

    @property
    def data(self) -> np.ndarray:
        return self._net._show(self._id, diff=False)

    @data.setter
    def data(self, value) -> None:
        if self._net._synced:
            self.data[...] = np.asarray(value, np.float32)
            return
        with torch.no_grad():
            self._net._value(self._id).copy_(torch.as_tensor(np.asarray(value, np.float32)))

    @property
    def diff(self) -> np.ndarray:
        return self._net._show(self._id, diff=True)

    @diff.setter
    def diff(self, value) -> None:
        if self._net._synced:
            self.diff[...] = np.asarray(value, np.float32)
            return
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
        """Give the blob a new shape (zeros); the next forward() reshapes the rest
        of the net, as Caffe's layers reshape in Forward (or call net.reshape())."""
        self._net._set_blob(self._id, torch.zeros(tuple(int(d) for d in dims),
                                                   device=self._net.device))

    def __repr__(self) -> str:
        return f"Blob({self._net.module.blob_names[self._id]!r}, shape={list(self.shape)})"


class ParamBlob:
    """A learnable param seen as a Blob: `.data` is the weight, `.diff` its gradient
    (`synced`: through host buffers, for params off the CPU)."""

    def __init__(self, layer, index: int, synced: bool = False):
        self._layer, self._index, self._synced = layer, index, synced

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
        if self._synced:
            return hostsync.param_copy(self._leaf, diff=False).show().reshape(self.shape)
        return _param_view(self._leaf).reshape(self.shape)

    @data.setter
    def data(self, value) -> None:
        if self._synced:
            host = hostsync.param_copy(self._leaf, diff=False).show()
            host[...] = np.asarray(value, dtype=np.float32).reshape(host.shape)
            return
        with torch.no_grad():
            self._leaf.copy_(torch.as_tensor(np.asarray(value, dtype=np.float32))
                             .reshape(self._leaf.shape))

    @property
    def diff(self) -> np.ndarray:
        if self._synced:
            return hostsync.param_copy(self._leaf, diff=True).show().reshape(self.shape)
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
    """pycaffe's net.layers[i] / net.layer_dict[name]: type, param blobs, and
    setup/reshape over blobs (pycaffe's Layer wrapper)."""

    def __init__(self, layer, synced: bool = False):
        self._layer, self._synced = layer, synced
        self.type = layer.type
        self.name = layer.layer_name
        self._blobs = [ParamBlob(layer, i, synced) for i in range(len(layer.blobs))]

    @property
    def blobs(self) -> list[ParamBlob]:
        if len(self._blobs) != len(self._layer.blobs):      # a Python layer's add_blob
            self._blobs = [ParamBlob(self._layer, i, self._synced)
                           for i in range(len(self._layer.blobs))]
        return self._blobs

    @property
    def module(self):
        return self._layer

    @property
    def phase(self) -> int:
        return int(self._layer.phase)

    def setup(self, bottom, top) -> None:
        """Caffe's LayerSetUp then shapes the tops: a Python layer runs its own
        setup; other layers were set up when the net was built."""
        user = getattr(self._layer, "user", None)
        if user is not None:
            self._layer.call("setup", bottom, top)
        self.reshape(bottom, top)

    def reshape(self, bottom, top) -> None:
        """Shape `top` blobs for `bottom` blobs' shapes, as the layer's Reshape."""
        user = getattr(self._layer, "user", None)
        if user is not None:
            self._layer.call("reshape", bottom, top)
            return
        shapes = self._layer.reshape([tuple(b.shape) for b in bottom])
        for blob, shape in zip(top, shapes):
            blob.reshape(*shape)

    def __repr__(self) -> str:
        return f"Layer({self.name!r}, type={self.type!r})"


def _leaves_of(layer) -> list[torch.nn.Parameter]:
    """A layer's stored params (for a PERMISSIVE share, the owner's Parameter)."""
    return [ParamBlob(layer, i)._leaf for i in range(len(layer.blobs))]


def _unique(tensors: list) -> list:
    return list({id(t): t for t in tensors}.values())


# Forwards a cached inference plan must run to repay its build (Net._plan_ready).
PLAN_PAYS_AFTER = 4


class Net:
    """A Caffe net for scripts: `Net(prototxt, phase)` or `Net(prototxt, weights, phase)`.

    As in Caffe, the net owns its blobs: each has a data and a diff buffer that
    persist between calls (numpy views of them stay valid), forward() writes tops
    into them, and backward() runs layer by layer from the top diffs held there,
    writing bottom diffs (overwriting, so an in-place layer's bottom diff replaces
    its top diff) and adding param diffs (they accumulate until cleared).

    Off the CPU (`_synced`), numpy cannot view the tensors: each blob or param a
    script looks at gets a host buffer (protonet.hostsync, Caffe's SyncedMemory),
    refreshed when read after the device wrote it and copied back before the
    next pass, update, copy_from or save.
    """

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
        try:        # Caffe's bindings raise RuntimeError for what they cannot build
            if isinstance(network_file, caffe_pb2.NetParameter):
                param = network_file
            else:
                param = read_net(os.fspath(network_file))
            module = NetModule(param, phase=phase, level=level, stages=list(stages or ()))
            self._attach(module.to(device), torch.device(device))
            if weights:
                single = isinstance(weights, (str, os.PathLike))
                for path in ([weights] if single else weights):
                    self.copy_from(path)
        except ProtonetError as e:
            also_a(e, RuntimeError)         # the same error, now a RuntimeError too
            raise

    @classmethod
    def from_module(cls, module: NetModule, device: str | torch.device = "cpu") -> "Net":
        """A pycaffe view on an existing NetModule (e.g. a solver's train net)."""
        net = cls.__new__(cls)
        net._attach(module, torch.device(device))
        return net

    def _attach(self, module: NetModule, device: torch.device) -> None:
        self.module = module
        self.device = device
        self._synced = device.type != "cpu" or hostsync.forced()
        self._copies: dict[tuple[int, bool], hostsync.HostCopy] = {}   # (blob, diff)
        count = len(module.blob_names)
        self._values: list[torch.Tensor | None] = [None] * count
        # {blob id: function making its value}: tops the plan's joined ops skipped,
        # made on first read (_value) or before anything else reads the blobs (_settle)
        self._pending: dict[int, Callable[[], torch.Tensor]] = {}
        self._diffs: list[torch.Tensor | None] = [None] * count
        self._shown: tuple[set, set] = (set(), set())   # blobs whose data/diff views are out
        self._segments: dict[int, tuple] = {}   # layer -> (bottom leaves, tops) of a forward
        self._stale_from: int | None = None     # layers from here on not reshaped yet
        self._callbacks: dict[str, list] = {"before_forward": [], "after_forward": [],
                                            "before_backward": [], "after_backward": []}
        self._loss_weight = {step.tops[pos]: weight for step in module.steps
                             for pos, weight in step.losses}
        self._blobs = OrderedDict((n, Blob(self, i)) for i, n in enumerate(module.blob_names))
        self._layers = [LayerView(layer, self._synced) for layer in module.layers]
        # The cached inference plan (NetModule.forward_for_inference) may run a whole-net
        # forward only for what it reproduces: a TEST net on the CPU whose forward no
        # backward needs, with no Python layer and no param in another's shape.
        self._plannable = module.phase == TEST and not self._synced and \
            not any(module.layer_need_backward) and not any(
                layer.type == "Python" or parametrize.is_parametrized(layer.blobs)
                for layer in module.layers)
        self._param_lists = [layer.blobs._parameters for layer in module.layers]
        self._plan_token: tuple | None = None    # what the last whole-net forward saw
        self._plan_stable = 0       # whole-net forwards in a row that saw that token
        self._plan_wait = 2         # how many it takes before a plan is built
        self._plan_built: int | None = None      # _plan_runs when the plan was built
        self._plan_runs = 0                      # whole-net forwards the plan ran
        for i in self.module.input_ids:
            self._set_blob(i, torch.zeros(self.module.blob_shapes[i], device=self.device))

    # -- pycaffe attributes ------------------------------------------------------
    @property
    def blobs(self) -> "OrderedDict[str, Blob]":
        return self._blobs

    @property
    def _blob_loss_weights(self) -> list[float]:
        return [self._loss_weight.get(i, 0.0) for i in range(len(self.module.blob_names))]

    @property
    def blob_loss_weights(self) -> "OrderedDict[str, float]":
        """Each blob's weight in the loss (0 for blobs that are no loss)."""
        return OrderedDict(zip(self.module.blob_names, self._blob_loss_weights))

    @property
    def params(self) -> "OrderedDict[str, list[ParamBlob]]":
        return OrderedDict((view.name, view.blobs) for view in self._layers if view.blobs)

    @property
    def layers(self) -> list[LayerView]:
        return list(self._layers)

    @property
    def layer_dict(self) -> "OrderedDict[str, LayerView]":
        return OrderedDict((view.name, view) for view in self._layers)

    @property
    def _layer_names(self) -> list[str]:
        return list(self.module.layer_names)

    @property
    def _blob_names(self) -> list[str]:
        return list(self.module.blob_names)

    @property
    def _inputs(self) -> list[int]:
        return list(self.module.input_ids)

    @property
    def _outputs(self) -> list[int]:
        return list(self.module.output_ids)

    def _top_ids(self, layer: int) -> list[int]:
        return list(self.module.steps[layer].tops)

    def _bottom_ids(self, layer: int) -> list[int]:
        return list(self.module.steps[layer].bottoms)

    @property
    def top_names(self) -> "OrderedDict[str, list[str]]":
        names = self.module.blob_names
        return OrderedDict((self.module.layer_names[i], [names[t] for t in step.tops])
                           for i, step in enumerate(self.module.steps))

    @property
    def bottom_names(self) -> "OrderedDict[str, list[str]]":
        names = self.module.blob_names
        return OrderedDict((self.module.layer_names[i], [names[b] for b in step.bottoms])
                           for i, step in enumerate(self.module.steps))

    @property
    def inputs(self) -> list[str]:
        return self.module.input_names

    @property
    def outputs(self) -> list[str]:
        return self.module.output_names

    @property
    def phase(self) -> int:
        return self.module.phase

    # -- callbacks (Caffe's Net::Callback, called with the layer index) ----------------
    def before_forward(self, callback) -> None:
        self._callbacks["before_forward"].append(callback)

    def after_forward(self, callback) -> None:
        self._callbacks["after_forward"].append(callback)

    def before_backward(self, callback) -> None:
        self._callbacks["before_backward"].append(callback)

    def after_backward(self, callback) -> None:
        self._callbacks["after_backward"].append(callback)

    # -- running -----------------------------------------------------------------
    def forward(self, blobs: Sequence[str] | None = None, start: str | None = None,
                end: str | None = None, **kwargs) -> dict[str, np.ndarray]:
        """Run the net (or layers start..end); returns views of the outputs (the
        `end` layer's tops when given) and of `blobs`, as pycaffe."""
        for name, value in kwargs.items():
            if name not in self.inputs:
                raise NetError(f"'{name}' is not an input blob; inputs are {self.inputs}")
            value = np.asarray(value, dtype=np.float32)
            current = self._value(self.module.blob_index[name])
            if tuple(current.shape) != value.shape:
                raise NetError(f"input '{name}' has shape {list(value.shape)}, the blob "
                               f"{list(current.shape)}; reshape the blob first")
            self.blobs[name].data = value
        hostsync.push_pending()
        first = self._layer_index(start) if start is not None else 0
        last = self._layer_index(end) if end is not None else len(self.module.layers) - 1
        self._reshape(first, last, only_if_changed=True)   # Caffe's layers reshape in Forward
        if start is None and end is None and self._plan_ready():
            self._forward_planned()
        else:
            self._forward(first, last)
        names = list(self.outputs) if end is None else \
            [self.module.blob_names[t] for t in self.module.steps[last].tops]
        names += [b for b in (blobs or []) if b not in names]
        return {n: self.blobs[n].data for n in names}

    def _plan_ready(self) -> bool:
        """Whether this whole-net forward may run the cached inference plan: the net is
        plannable (see _attach), no forward callback or autocast is on, every param is
        float32 and no view of one handed out may still be written, and nothing the plan
        depends on (params: identity, torch version, views handed out; input shapes;
        layout) changed for the last `_plan_wait` whole-net forwards, this one included.

        Any change drops the plan, which snapshots weights; the next forwards run layer
        by layer until the net has been stable that long. Building a plan costs about
        two exact forwards (ResNet-50) and each forward it runs saves under half of one,
        so it starts at 2 (one forward, or edits before every forward, never pay for a
        build) and doubles, up to 64, each time a plan is dropped before it ran
        PLAN_PAYS_AFTER forwards (a server whose batch size keeps changing)."""
        token = self._current_plan_token()
        if token is not None and token == self._plan_token:
            self._plan_stable += 1
        else:
            if self._plan_built is not None:
                paid = self._plan_runs - self._plan_built >= PLAN_PAYS_AFTER
                self._plan_wait = 2 if paid else min(2 * self._plan_wait, 64)
                self._plan_built = None
            self.module.drop_inference_plan()
            self._plan_stable = 1
        self._plan_token = token
        ready = token is not None and self._plan_stable >= self._plan_wait
        if ready and self._plan_built is None:
            self._plan_built = self._plan_runs
        return ready

    def _current_plan_token(self) -> tuple | None:
        """What the plan depends on, as it is now; None when the plan may not run."""
        if not self._plannable or self._callbacks["before_forward"] or \
                self._callbacks["after_forward"] or \
                torch.is_autocast_enabled(self.device.type):
            return None
        module = self.module
        token: list = [module.channels_last]
        token += [module.blob_shapes[i] for i in module.input_ids]
        for params in self._param_lists:
            for p in params.values():
                viewed = _view_state(p)
                if viewed is None or p.dtype != torch.float32:
                    return None
                token.append((id(p), p._version, viewed))
        return tuple(token)

    def _forward_planned(self) -> None:
        """The whole net by the module's cached inference plan (forward_for_inference):
        every blob as _forward leaves it, to float32 rounding, copied into the buffers
        whose views a script holds as _forward's are."""
        module = self.module
        inputs = {module.blob_names[i]: self._value(i) for i in module.input_ids}
        pending: dict = {}
        values, _ = module.forward_for_inference(inputs, pending)
        self._segments.clear()
        self._pending.clear()
        for t, value in enumerate(values):     # inputs too: a layer may work in place
            if value is not None:              # on one, as _forward stores it
                self._store(t, value)
        for t, make in pending.items():        # a joined convolution's own top: made
            if t in self._shown[0]:            # when read, unless a view of it is out
                self._store(t, make())
            else:
                self._values[t] = None
                self._pending[t] = make
        self._plan_runs += 1

    def _forward(self, first: int, last: int) -> None:
        """Caffe's ForwardFromTo: layers first..last, tops kept in the blobs."""
        steps = self.module.steps[first:last + 1]
        need_grad = torch.is_grad_enabled() and \
            any(self.module.layer_need_backward[first:last + 1])
        self._settle()
        made: set[int] = set()
        values = list(self._values)
        for step in steps:
            for b in step.bottoms:
                if b not in made:
                    values[b] = self._value(b)
            made.update(step.tops)
        for i in range(first, last + 1):
            self._segments.pop(i, None)
        record = {} if need_grad else None
        before, after = self._callbacks["before_forward"], self._callbacks["after_forward"]

        def run_before(index: int, _values) -> None:
            for callback in before:
                callback(index)

        def run_after(index: int, values_now) -> None:
            for t in self.module.steps[index].tops:
                self._store(t, values_now[t])
            for callback in after:
                callback(index)

        with torch.set_grad_enabled(need_grad):
            values, _ = self.module(None, first, last, values, record=record,
                                    before=run_before if before else None,
                                    after=run_after if after else None)
        if record:
            self._segments.update(record)
        for t in made:
            if values[t] is not None:
                self._store(t, values[t])
        self._params_changed(data=True)     # BatchNorm's statistics, a Python layer's

    def backward(self, diffs: Sequence[str] | None = None, start: str | None = None,
                 end: str | None = None, **kwargs) -> dict[str, np.ndarray]:
        """Caffe's Backward over layers start..end (default: all, from the last).

        Each layer that needs backward reads its top diffs as the blobs hold them
        (loss weights on loss tops, whatever was written into `blob.diff`, the
        keyword arguments, or what a later layer left), writes its bottom diffs
        and adds to its param diffs. It works from the blobs the last forward()
        made, or, when none ran, from the stored blob data. Returns views of the
        `end` layer's bottom diffs (default: the inputs') and of `diffs`.
        """
        for name, value in kwargs.items():
            if name not in self.module.blob_index:
                raise NetError(f"no blob named '{name}'")
            self.blobs[name].diff[...] = np.asarray(value, dtype=np.float32)
        hostsync.push_pending()
        hi = self._layer_index(start) if start is not None else len(self.module.layers) - 1
        lo = self._layer_index(end) if end is not None else 0
        for i in range(hi, lo - 1, -1):
            for callback in self._callbacks["before_backward"]:
                callback(i)
            if self.module.layer_need_backward[i] and not self.module.steps[i].is_input:
                self._backward_layer(i)
            for callback in self._callbacks["after_backward"]:
                callback(i)
        self._params_changed(diff=True)
        names = list(self.inputs) if end is None else \
            [self.module.blob_names[b] for b in self.module.steps[lo].bottoms]
        names += [d for d in (diffs or []) if d not in names]
        return {n: self.blobs[n].diff for n in names}

    def _backward_layer(self, index: int) -> None:
        """One layer's Backward: top diffs -> bottom diffs (written) and param diffs
        (added), through autograd on the layer's own graph: the last forward's, or
        one rebuilt from the stored blobs when there is none or a script wrote into
        memory that graph saved (Caffe's Backward reads the blobs as they are now)."""
        layer = self.module.layers[self.module.steps[index].layer]
        segment = self._segments.get(index)
        try:
            try:
                self._backward_through(index, segment or self._replay(index))
            except RuntimeError as e:
                if segment is None or "modified by an inplace operation" not in str(e):
                    raise
                self._segments.pop(index, None)
                self._backward_through(index, self._replay(index))
        except ProtonetError:
            raise
        except (RuntimeError, ValueError, IndexError, ZeroDivisionError) as e:
            raise also_a(NetError(f"backward failed: {type(e).__name__}: {e}",
                                  layer.layer_name, layer.type), RuntimeError) from e

    def _backward_through(self, index: int, segment) -> None:
        if segment is None:
            return
        step = self.module.steps[index]
        leaves, tops = segment
        wanted = [(b, leaf) for b, leaf in zip(step.bottoms, leaves) if leaf.requires_grad]
        params = _unique([p for p in _leaves_of(self.module.layers[step.layer])
                          if p.requires_grad])
        outs = [(top, t) for top, t in zip(tops, step.tops) if top.requires_grad]
        if not outs or not (wanted or params):
            return
        grads = [self._diff(t).to(top.device, top.dtype) for top, t in outs]
        found = torch.autograd.grad([top for top, _ in outs],
                                    [leaf for _, leaf in wanted] + params, grads,
                                    retain_graph=True, allow_unused=True)
        for (b, leaf), grad in zip(wanted, found):
            self._store(b, grad if grad is not None else torch.zeros_like(leaf), diff=True)
        with torch.no_grad():
            for p, grad in zip(params, found[len(wanted):]):
                if grad is None:
                    continue
                if p.grad is None:
                    p.grad = grad.detach().clone()
                else:
                    p.grad.add_(grad.reshape(p.grad.shape))

    def _replay(self, index: int):
        """The layer's graph rebuilt from the stored bottoms (a backward with no
        forward before it: Caffe's Backward reads the blobs as they are)."""
        step = self.module.steps[index]
        values = [None] * len(self.module.blob_names)
        for b in step.bottoms:
            values[b] = self._value(b)
        record: dict = {}
        with torch.enable_grad():
            self.module(None, index, index, values, record=record)
        return record.get(index)

    def forward_all(self, blobs: Sequence[str] | None = None,
                    **kwargs) -> dict[str, np.ndarray]:
        """forward() over inputs of any length in net-sized batches (the last one
        padded with zeros); returns each output (and `blobs`) concatenated, the
        padding dropped."""
        names = list(dict.fromkeys(list(self.outputs) + list(blobs or [])))
        if not kwargs:
            out = self.forward(blobs=blobs)
            return {n: out[n].copy() for n in names}
        parts: dict[str, list] = {n: [] for n in names}
        for batch in self._batch(kwargs):
            out = self.forward(blobs=blobs, **batch)
            for n in names:
                parts[n].extend(out[n].copy())
        return self._trim(parts, len(next(iter(kwargs.values()))))

    def forward_backward_all(self, blobs: Sequence[str] | None = None,
                             diffs: Sequence[str] | None = None, **kwargs):
        """forward() and backward() batch by batch: kwargs name inputs (for forward)
        and outputs (their top diffs, for backward); returns (outputs, diffs), each
        concatenated over the batches, padding dropped."""
        out_names = list(dict.fromkeys(list(self.outputs) + list(blobs or [])))
        diff_names = list(dict.fromkeys(list(self.inputs) + list(diffs or [])))
        ins = {n: v for n, v in kwargs.items() if n in self.inputs}
        tops = {n: v for n, v in kwargs.items() if n in self.outputs}
        outs: dict[str, list] = {n: [] for n in out_names}
        grads: dict[str, list] = {n: [] for n in diff_names}
        for fb, bb in itertools.zip_longest(self._batch(ins) if ins else [],
                                            self._batch(tops) if tops else [], fillvalue={}):
            got = self.forward(blobs=blobs, **fb)
            back = self.backward(diffs=diffs, **bb)
            for n in out_names:
                outs[n].extend(got[n].copy())
            for n in diff_names:
                grads[n].extend(back[n].copy())
        total = len(next(iter(kwargs.values()))) if kwargs else None
        return self._trim(outs, total), self._trim(grads, total)

    @staticmethod
    def _trim(parts: dict[str, list], total: int | None) -> dict[str, np.ndarray]:
        arrays = {n: np.asarray(v) for n, v in parts.items()}
        if total is not None:
            arrays = {n: a[:total] for n, a in arrays.items()}
        return arrays

    def _batch(self, blobs: dict):
        """Split {name: array} into net-sized batches, the last padded with zeros
        (pycaffe's Net._batch; the batch size is the first blob's num)."""
        num = len(next(iter(blobs.values())))
        size = next(iter(self.blobs.values())).shape[0]
        for i in range(0, num - num % size, size):
            yield {name: value[i:i + size] for name, value in blobs.items()}
        left = num % size
        if left:
            padded = {}
            for name, value in blobs.items():
                value = np.asarray(value)
                pad = np.zeros((size - left,) + value.shape[1:], dtype=value.dtype)
                padded[name] = np.concatenate([value[-left:], pad])
            yield padded

    def input_tensors(self) -> dict[str, torch.Tensor]:
        """The input blobs' tensors, for code that runs `self.module` directly."""
        hostsync.push_pending()
        return {self.module.blob_names[i]: self._value(i) for i in self.module.input_ids}

    def adopt(self, values: list) -> None:
        """Show the blob values of a pass run on `self.module` directly (the solver's):
        copied into buffers whose views a script holds, taken over otherwise."""
        self._segments.clear()
        self._pending.clear()
        if self._synced:
            self._values = list(values)
            if not any(diff for _, diff in self._copies):
                self._diffs = [None] * len(values)
            for copy in self._copies.values():
                copy.changed()
            return
        data_out, diff_out = self._shown
        if not data_out:
            self._values = list(values)
        else:
            for i, value in enumerate(values):
                if value is not None:
                    self._store(i, value)
        if not diff_out:
            self._diffs = [None] * len(values)

    def reshape(self) -> None:
        """Propagate input blob shapes through the net (pycaffe's net.reshape());
        blobs whose shape changes get new memory, as in Caffe."""
        self._reshape(0, len(self.module.layers) - 1)

    def _reshape(self, first: int, last: int, only_if_changed: bool = False) -> None:
        """Reshape layers first..last for the shapes their outside bottoms (inputs,
        blobs earlier layers made) hold now. With only_if_changed, nothing happens
        unless one of those differs from the shape the net last inferred."""
        if first > 0:           # earlier layers' tops are read as they are
            self._settle()
        made: set[int] = set()
        outside: dict[int, tuple] = {}
        for step in self.module.steps[first:last + 1]:
            for b in step.bottoms:
                if b not in made and self._values[b] is not None:
                    outside[b] = tuple(self._values[b].shape)
            if step.is_input:
                for t in step.tops:
                    outside[t] = tuple(self._value(t).shape)
            made.update(step.tops)
        stale = self._stale_from is not None and last >= self._stale_from
        if only_if_changed and not stale and all(
                shape == tuple(self.module.blob_shapes[b]) for b, shape in outside.items()):
            return
        names = self.module.blob_names
        self._settle()          # made at the shapes they were planned for
        self.module.infer_shapes({names[b]: s for b, s in outside.items()}, first, last)
        if last < len(self.module.layers) - 1:      # later layers keep their old shapes
            self._stale_from = last + 1 if self._stale_from is None else \
                min(self._stale_from, last + 1)
        elif first == 0:
            self._stale_from = None
        self._segments.clear()
        for i, shape in enumerate(self.module.blob_shapes):
            for store, shown in zip((self._values, self._diffs), self._shown):
                if store[i] is not None and tuple(store[i].shape) != shape:
                    store[i] = None
                    shown.discard(i)
                    self._drop(i, diff=store is self._diffs)

    # -- blob memory ----------------------------------------------------------------
    def _value(self, blob_id: int) -> torch.Tensor:
        """The blob's data; a blob not computed yet is zeros, as Caffe allocates it."""
        if self._pending:
            make = self._pending.pop(blob_id, None)
            if make is not None:
                self._values[blob_id] = make()
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
            self._shown[1].discard(blob_id)
            self._changed(blob_id, diff=True)
        return diff

    def _show(self, blob_id: int, diff: bool) -> np.ndarray:
        """A numpy view of the blob's data or diff; from now on new values are copied
        into that memory rather than replacing it, so the view stays current.
        Off the CPU: the blob's host buffer (see hostsync)."""
        if self._synced:
            return self._host(blob_id, diff).show()
        tensor = self._diff(blob_id) if diff else self._value(blob_id)
        shown = self._shown[int(diff)]
        if blob_id not in shown and tensor.device.type == "cpu" and \
                tensor.dtype == torch.float32:
            # From now on the net owns this memory: a layer's top may be a view of
            # memory the net does not own (MemoryData serves the caller's arrays),
            # which later passes must not write into.
            tensor = tensor.detach().clone()
            shown.add(blob_id)
        elif tensor.requires_grad or tensor.grad_fn is not None:
            tensor = tensor.detach()
        (self._diffs if diff else self._values)[blob_id] = tensor
        return _view(tensor)

    def _settle(self) -> None:
        """Make every blob the last planned forward left to be made on demand (before
        a pass or a reshape reads the blob list as a whole)."""
        for blob_id in list(self._pending):
            self._value(blob_id)

    def _store(self, blob_id: int, tensor: torch.Tensor, diff: bool = False) -> None:
        """Make `tensor` the blob's data (or diff): into its memory when a view of it
        is out and the shape is unchanged, else in its place."""
        if not diff and self._pending:
            self._pending.pop(blob_id, None)
        store, shown = (self._diffs, self._shown[1]) if diff else (self._values, self._shown[0])
        current = store[blob_id]
        if blob_id in shown and current is not None and current.shape == tensor.shape \
                and current.device == tensor.device:
            if current.data_ptr() != tensor.data_ptr():
                with torch.no_grad():
                    current.copy_(tensor.detach())
            return
        shown.discard(blob_id)
        store[blob_id] = tensor.detach() if diff else tensor
        self._changed(blob_id, diff)

    def _set_blob(self, blob_id: int, tensor: torch.Tensor) -> None:
        self._pending.pop(blob_id, None)
        self._values[blob_id] = tensor.to(torch.float32)
        self._diffs[blob_id] = None
        self._shown[0].discard(blob_id)
        self._shown[1].discard(blob_id)
        self._drop(blob_id, diff=False)
        self._drop(blob_id, diff=True)
        self._segments.clear()

    # -- host buffers off the CPU (hostsync) -------------------------------------------
    def _host(self, blob_id: int, diff: bool) -> hostsync.HostCopy:
        copy = self._copies.get((blob_id, diff))
        if copy is None:
            get = (lambda: self._diff(blob_id)) if diff else (lambda: self._value(blob_id))
            copy = hostsync.HostCopy(get, lambda host: self._put(blob_id, diff, host))
            self._copies[blob_id, diff] = copy
        return copy

    def _put(self, blob_id: int, diff: bool, host: torch.Tensor) -> None:
        """Host values become the blob's tensor: new memory, so no tensor a layer
        made (which may alias its bottom) is written into. A layer whose bottom a
        script changed rebuilds its backward graph from the blobs (Caffe's Backward
        reads them as they are); one merely read keeps its graph (a Dropout mask)."""
        tensor = host.to(self.device, torch.float32, copy=True)
        if diff:
            self._diffs[blob_id] = tensor
            return
        old = self._values[blob_id]
        self._values[blob_id] = tensor
        if old is not None and old.shape == tensor.shape and \
                torch.equal(old.detach().to(torch.float32), tensor):
            return
        for index, step in enumerate(self.module.steps):
            if blob_id in step.bottoms:
                self._segments.pop(index, None)

    def _changed(self, blob_id: int, diff: bool) -> None:
        if self._copies:
            copy = self._copies.get((blob_id, diff))
            if copy is not None:
                copy.changed()

    def _drop(self, blob_id: int, diff: bool) -> None:
        copy = self._copies.pop((blob_id, diff), None) if self._copies else None
        if copy is not None:
            copy.drop()

    def _leaves(self) -> list[torch.nn.Parameter]:
        return [leaf for layer in self.module.layers for leaf in _leaves_of(layer)]

    def _params_changed(self, data: bool = False, diff: bool = False) -> None:
        """The device wrote these params: their host buffers (if shown) are stale."""
        if self._synced:
            hostsync.params_changed(self._leaves(), data=data, diff=diff)

    def _layer_index(self, name: str) -> int:
        try:
            return self.module.layer_names.index(name)
        except ValueError:      # pycaffe's list.index raises ValueError
            raise also_a(NetError(f"no layer named '{name}'"), ValueError) from None

    def set_input_arrays(self, data, labels) -> None:
        """Feed a MemoryData first layer (pycaffe's Net.set_input_arrays)."""
        from .data.layers import set_input_arrays
        set_input_arrays(self.module, data, labels)

    def clear_param_diffs(self) -> None:
        """Zero every param diff in place (Caffe's ClearParamDiffs); diff arrays a
        script holds show the zeros."""
        held = hostsync.held(self._leaves(), diff=True) if self._synced else []
        hostsync.push_pending()
        with torch.no_grad():
            for layer in self.module.layers:
                for p in _leaves_of(layer):
                    if p.grad is not None:
                        p.grad.zero_()
        self._params_changed(diff=True)
        for copy in held:
            copy.refresh()

    # -- weights -----------------------------------------------------------------
    def copy_from(self, path) -> None:
        """Copy trained weights by layer name (Caffe's CopyTrainedLayersFrom);
        `path` is a .caffemodel, an HDF5 file or zoo:NAME."""
        from .zoo import resolve_weights
        hostsync.push_pending()
        copy_weights(self.module.layers, resolve_weights(os.fspath(path)))
        self._params_changed(data=True)

    def save(self, path: str) -> None:
        """Write the weights as a .caffemodel (or HDF5 for .h5), atomically."""
        hostsync.push_pending()
        save_caffemodel(self.module, os.fspath(path))

    def save_hdf5(self, path: str) -> None:
        """Write the weights in Caffe's HDF5 layout (/data/<layer>/<i>), whatever
        the file name (Caffe's ToHDF5)."""
        hostsync.push_pending()
        save_hdf5(self.module, os.fspath(path))

    def load_hdf5(self, path: str) -> None:
        """Copy weights from a Caffe HDF5 weights file (CopyTrainedLayersFromHDF5)."""
        hostsync.push_pending()
        copy_trained_layers(self.module.layers, _read_hdf5(os.fspath(path)),
                            os.fspath(path), partial=True)
        self._params_changed(data=True)

    def share_with(self, other: "Net") -> None:
        """Use `other`'s param data for layers of the same name (Caffe's
        ShareTrainedLayersWith); shapes must match."""
        hostsync.push_pending()
        theirs = {layer.layer_name: layer for layer in other.module.layers}
        for layer in self.module.layers:
            source = theirs.get(layer.layer_name)
            if source is None or not len(source.blobs):
                continue
            if len(source.blobs) != len(layer.blobs):
                raise also_a(NetError(f"has {len(layer.blobs)} param blobs, the layer it "
                                      f"shares with {len(source.blobs)}", layer.layer_name,
                                      layer.type), RuntimeError)
            for i, p in enumerate(source.blobs):
                if tuple(p.shape) != tuple(layer.blobs[i].shape):
                    raise also_a(NetError(f"cannot share param {i}: shape "
                                          f"{list(layer.blobs[i].shape)} vs "
                                          f"{list(p.shape)}", layer.layer_name,
                                          layer.type), RuntimeError)
                layer.blobs[i] = p
