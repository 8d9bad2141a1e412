"""NetModule: a Caffe NetParameter turned into a torch.nn.Module.

Building follows Caffe's Net::Init: filter by NetState, insert splits, create each
layer from the registry, wire bottoms/tops (in-place layers reuse their bottom's
blob), run shape inference, attach params (with sharing by ParamSpec name), and work
out which blobs need a gradient. The result is a flat execution plan over integer
blob ids, so a forward pass does no graph walking and no name lookups.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch
from google.protobuf.descriptor import FieldDescriptor
from torch import nn
from torch.nn.utils import parametrize

from ..errors import NetError, ShapeError
from ..layers import layer_class
from ..layers.base import Layer, Shape
from ..limits import shape_problem
from ..proto import caffe_pb2
from ..speed import to_channels_last
from .splits import insert_splits
from .state import filter_net

log = logging.getLogger("protonet")

PERMISSIVE = caffe_pb2.ParamSpec.PERMISSIVE
# Layers torch runs faster on channels-last (NHWC) bottoms on the CPU (oneDNN
# convolution without reorders, pooling vectorized over channels).
NHWC_LAYERS = {"Convolution", "Deconvolution", "Pooling"}
# What a layer's own code raises for parameters or shapes it cannot work with; at
# build time these become an error naming the layer.
SETUP_ERRORS = (ValueError, IndexError, RuntimeError, ZeroDivisionError, OverflowError,
                MemoryError)
# ... and what torch raises in a forward pass the layer's setup did not foresee.
FORWARD_ERRORS = (RuntimeError, ValueError, IndexError, ZeroDivisionError, MemoryError)


@dataclass
class Step:
    """One layer in execution order, wired by blob ids."""
    layer: int
    bottoms: tuple[int, ...]
    tops: tuple[int, ...]
    detach: tuple[bool, ...]          # bottom gets no gradient (Caffe's bottom_need_backward)
    losses: tuple[tuple[int, float], ...] = ()  # (top position, loss weight) pairs
    is_input: bool = False
    no_grad: bool = False             # Caffe skips this layer in Backward
    spatial: bool = False             # convolves or pools: runs on NHWC bottoms when asked


@dataclass
class LearnableParam:
    """A param the solver updates, with Caffe's multipliers (owners only when shared)."""
    param: nn.Parameter
    lr_mult: float
    decay_mult: float
    layer: str
    index: int
    name: str = ""
    has_lr: bool = False
    has_decay: bool = False
    users: list = field(default_factory=list)   # (layer, index) of every sharer


_UNSIGNED = (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64,
             FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_FIXED64)


def _over_int_range(message, prefix: str = "") -> str | None:
    """'field = value' for an unsigned field over INT_MAX (kernel sizes, strides,
    num_output, ...: Caffe keeps them all in ints, where such values turn
    negative), or None."""
    for desc, value in message.ListFields():
        if desc.type == FieldDescriptor.TYPE_MESSAGE:
            for i, sub in enumerate(value if desc.is_repeated else [value]):
                name = f"{prefix}{desc.name}" + (f"[{i}]" if desc.is_repeated else "")
                found = _over_int_range(sub, name + ".")
                if found:
                    return found
        elif desc.type in _UNSIGNED:
            for v in (value if desc.is_repeated else [value]):
                if v > 2**31 - 1:
                    return f"{prefix}{desc.name} = {v}"
    return None


class _ViewAs(nn.Module):
    """Parametrization that shows a shared param in the sharing layer's shape."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = shape

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(self.shape)


class NetModule(nn.Module):
    """The executable net. `forward` maps input tensors to every blob's tensor."""

    def __init__(self, net_param: caffe_pb2.NetParameter, phase: int | None = None,
                 level: int | None = None, stages: Iterable[str] | None = None):
        super().__init__()
        param = caffe_pb2.NetParameter()
        param.CopyFrom(net_param)
        if phase is not None:
            param.state.phase = phase
        if level is not None:
            param.state.level = level
        if stages is not None:      # added to the file's own stages, as Caffe does
            param.state.stage.extend(stages)
        self.phase = param.state.phase
        self.name = param.name
        self.net_param = insert_splits(filter_net(param))
        self.debug_info = self.net_param.debug_info
        self.layers = nn.ModuleList()
        self.layer_names: list[str] = []
        self.blob_names: list[str] = []
        self.blob_shapes: list[Shape] = []
        self.steps: list[Step] = []
        self.input_ids: list[int] = []
        self.learnable: list[LearnableParam] = []
        self.channels_last = False
        self._build()

    # -- building ---------------------------------------------------------------
    def _build(self) -> None:
        self._building = -1
        try:
            self._build_layers()
        except NetError as e:
            raise self._locate(e) from None

    def _locate(self, error: NetError) -> NetError:
        """`error` naming the layer being built, when it names none (an unnamed
        layer, or a check that does not know its layer)."""
        if error.layer or self._building < 0:
            return error
        lp = self.net_param.layer[self._building]
        return type(error)(error.detail, lp.name or f"#{self._building} (unnamed)",
                           lp.type or None)

    def _build_layers(self) -> None:
        blob_id: dict[str, int] = {}
        available: set[str] = set()
        blob_need_backward: list[bool] = []
        layer_need_backward: list[bool] = []
        bottom_need_backward: list[list[bool]] = []
        self._param_owner: dict[str, LearnableParam] = {}

        for index, lp in enumerate(self.net_param.layer):
            self._building = index                  # for _locate
            if not lp.HasField("phase"):
                lp.phase = self.phase
            if lp.propagate_down and len(lp.propagate_down) != len(lp.bottom):
                raise NetError(f"propagate_down has {len(lp.propagate_down)} entries; it "
                               f"must have none or one per bottom ({len(lp.bottom)})",
                               lp.name, lp.type)
            if lp.name in self.layer_names:
                # Caffe's Net::Init accepts this (HED names five Crop layers alike);
                # only copying weights by name can be ambiguous, and that step
                # (io.weights) refuses it where it is.
                log.warning("layer '%s' (%s): another layer has this name; weights "
                            "are copied by name, so only layers without params may "
                            "share one", lp.name, lp.type)
            too_big = _over_int_range(lp)
            if too_big:
                raise NetError(f"{too_big} is over 2147483647; Caffe reads this field as an "
                               "int", lp.name, lp.type)
            try:
                layer = layer_class(lp.type, lp.name)(lp, self.phase)
            except SETUP_ERRORS as e:
                raise NetError(f"cannot be made from its parameters: {e}", lp.name,
                               lp.type) from None
            need_backward = False
            bottoms, bneed = [], []
            for j, name in enumerate(lp.bottom):
                if name not in available:
                    known = "" if name not in blob_id else (
                        " (it was consumed in place by an earlier layer or is not yet made)")
                    raise NetError(f"unknown bottom blob '{name}' (bottom index {j}){known}",
                                   lp.name, lp.type)
                bid = blob_id[name]
                bottoms.append(bid)
                available.discard(name)
                need = lp.propagate_down[j] if lp.propagate_down else blob_need_backward[bid]
                bneed.append(bool(need))
                need_backward |= blob_need_backward[bid]
            tops = []
            top_names = list(lp.top)
            if layer.is_loss:
                needed = max(layer.min_tops or 0, layer.exact_tops or 0)
                while len(top_names) < needed:
                    top_names.append(None)
            layer.num_tops = len(top_names)
            for j, name in enumerate(top_names):
                if name is None:                      # Caffe's "(automatic)" top
                    name = "(automatic)" if "(automatic)" not in blob_id else \
                        f"(automatic){len(self.blob_names)}"
                    tops.append(self._new_blob(name, blob_id, blob_need_backward))
                    continue
                if j < len(lp.bottom) and lp.bottom[j] == name:
                    tops.append(blob_id[name])        # in-place
                elif name in blob_id:
                    raise NetError(f"top blob '{name}' is produced by more than one "
                                   "layer", lp.name, lp.type)
                else:
                    tops.append(self._new_blob(name, blob_id, blob_need_backward))
                available.add(name)
            layer.check_blob_counts(len(bottoms), len(tops))
            bottom_shapes = [self.blob_shapes[b] for b in bottoms]
            self._setup_layer(layer, bottom_shapes, tops)
            losses = self._loss_weights(layer, lp, len(tops))
            layer_index = len(self.layers)
            self.layers.append(layer)
            self.layer_names.append(lp.name)
            need_backward |= self._attach_params(layer, lp)
            layer_need_backward.append(need_backward)
            if need_backward:
                for t in tops:
                    blob_need_backward[t] = True
            bottom_need_backward.append(bneed)
            is_input = lp.type == "Input"
            if is_input:
                self.input_ids.extend(tops)
            spatial = lp.type in NHWC_LAYERS and \
                all(len(self.blob_shapes[b]) == 4 for b in bottoms)
            self.steps.append(Step(layer_index, tuple(bottoms), tuple(tops), (), losses,
                                   is_input, spatial=spatial))

        self._prune_backward(layer_need_backward, bottom_need_backward)
        if self.net_param.force_backward:
            for i, step in enumerate(self.steps):
                layer_need_backward[i] = True
                layer = self.layers[step.layer]
                for j, bid in enumerate(step.bottoms):
                    bottom_need_backward[i][j] |= layer.allow_force_backward(j)
                    blob_need_backward[bid] |= bottom_need_backward[i][j]
                for p in layer.blobs:
                    p.requires_grad_(True)
        # Exactly Caffe's gradient flow: a bottom Caffe does not back-propagate to is
        # detached, and a layer Caffe skips in Backward runs without autograd.
        for i, step in enumerate(self.steps):
            step.detach = tuple(not n for n in bottom_need_backward[i])
            step.no_grad = not layer_need_backward[i]
        self.layer_need_backward = layer_need_backward
        self.fused_scale = self._find_batchnorm_scale_pairs()
        self.blob_need_backward = blob_need_backward
        self.output_ids = [blob_id[n] for n in sorted(available)]
        self.blob_index = blob_id

    def _new_blob(self, name: str, blob_id: dict[str, int],
                  need: list[bool]) -> int:
        blob_id[name] = len(self.blob_names)
        self.blob_names.append(name)
        self.blob_shapes.append(())
        need.append(False)
        return blob_id[name]

    def _setup_layer(self, layer: Layer, bottom_shapes: Sequence[Shape],
                     tops: Sequence[int]) -> None:
        try:
            layer.setup(bottom_shapes)
            top_shapes = layer.reshape(bottom_shapes)
        except (NetError, ShapeError):
            raise
        except SETUP_ERRORS as e:
            shapes = ", ".join(str(list(s)) for s in bottom_shapes) or "none"
            raise ShapeError(f"cannot set up with bottom shapes {shapes}: {e}",
                             layer.layer_name, layer.type) from None
        if len(top_shapes) != len(tops):
            raise ShapeError(f"produced {len(top_shapes)} top shape(s) for {len(tops)} top(s)",
                             layer.layer_name, layer.type)
        for t, shape in zip(tops, top_shapes):
            problem = shape_problem(shape)
            if problem:
                raise ShapeError(f"top '{self.blob_names[t]}': {problem} (bottoms: "
                                 f"{[list(s) for s in bottom_shapes]})",
                                 layer.layer_name, layer.type)
            self.blob_shapes[t] = tuple(int(d) for d in shape)

    @staticmethod
    def _loss_weights(layer: Layer, lp, num_tops: int) -> tuple[tuple[int, float], ...]:
        weights = list(lp.loss_weight)
        if not weights and layer.is_loss:
            weights = [1.0]
        if lp.loss_weight and len(weights) != num_tops:
            raise NetError(f"loss_weight must be given for every top or none "
                           f"({len(weights)} for {num_tops} tops)", lp.name, lp.type)
        return tuple((j, float(w)) for j, w in enumerate(weights) if w != 0 and j < num_tops)

    def _attach_params(self, layer: Layer, lp) -> bool:
        """Apply ParamSpecs (multipliers, sharing); True if any param needs a gradient."""
        if len(lp.param) > len(layer.blobs):
            raise NetError(f"{len(lp.param)} param specs for {len(layer.blobs)} param blobs",
                           lp.name, lp.type)
        default = caffe_pb2.ParamSpec()
        need = False
        for i in range(len(layer.blobs)):
            spec = lp.param[i] if i < len(lp.param) else default
            blob = layer.blobs[i]
            need |= spec.lr_mult != 0
            owner = self._param_owner.get(spec.name) if spec.name else None
            if owner is None:
                entry = LearnableParam(blob, spec.lr_mult, spec.decay_mult, lp.name, i,
                                       spec.name, spec.HasField("lr_mult"),
                                       spec.HasField("decay_mult"), [(lp.name, i)])
                self.learnable.append(entry)
                if spec.name:
                    self._param_owner[spec.name] = entry
                blob.requires_grad_(spec.lr_mult != 0)
                continue
            self._share(layer, lp, i, spec, owner)
        return need

    def _share(self, layer: Layer, lp, i: int, spec, owner: LearnableParam) -> None:
        mine, theirs = layer.blobs[i], owner.param
        if spec.share_mode == PERMISSIVE:
            if mine.numel() != theirs.numel():
                raise NetError(f"cannot share param '{spec.name}' owned by layer "
                               f"'{owner.layer}': count mismatch (owner shape "
                               f"{list(theirs.shape)}, this layer {list(mine.shape)})",
                               lp.name, lp.type)
        elif mine.shape != theirs.shape:
            raise NetError(f"cannot share param '{spec.name}' owned by layer '{owner.layer}': "
                           f"shape mismatch (owner {list(theirs.shape)}, this layer "
                           f"{list(mine.shape)}); use share_mode: PERMISSIVE to share by count",
                           lp.name, lp.type)
        if spec.HasField("lr_mult"):
            if owner.has_lr and spec.lr_mult != owner.lr_mult:
                raise NetError(f"shared param '{spec.name}' has lr_mult {spec.lr_mult}, "
                               f"its owner '{owner.layer}' {owner.lr_mult}", lp.name, lp.type)
            owner.has_lr, owner.lr_mult = True, spec.lr_mult
        if spec.HasField("decay_mult"):
            if owner.has_decay and spec.decay_mult != owner.decay_mult:
                raise NetError(f"shared param '{spec.name}' has decay_mult {spec.decay_mult}, "
                               f"its owner '{owner.layer}' {owner.decay_mult}",
                               lp.name, lp.type)
            owner.has_decay, owner.decay_mult = True, spec.decay_mult
        layer.blobs[i] = theirs
        if mine.shape != theirs.shape:   # PERMISSIVE: the owner's memory, this layer's shape
            parametrize.register_parametrization(layer.blobs, str(i),
                                                 _ViewAs(tuple(mine.shape)), unsafe=True)
        owner.users.append((lp.name, i))
        theirs.requires_grad_(owner.lr_mult != 0 or theirs.requires_grad)

    def _prune_backward(self, layer_need: list[bool], bottom_need: list[list[bool]]) -> None:
        """Caffe's pass from the top: layers that feed no loss need no backward."""
        under_loss: set[str] = set()
        skip: set[str] = set()
        for i in range(len(self.steps) - 1, -1, -1):
            step = self.steps[i]
            contributes, skip_down = False, True
            for j, t in enumerate(step.tops):
                name = self.blob_names[t]
                if any(pos == j for pos, _ in step.losses) or name in under_loss:
                    contributes = True
                if name not in skip:
                    skip_down = False
                if contributes and not skip_down:
                    break
            if layer_need[i] and skip_down:
                layer_need[i] = False
                bottom_need[i] = [False] * len(bottom_need[i])
            if not contributes:
                layer_need[i] = False
            for j, b in enumerate(step.bottoms):
                name = self.blob_names[b]
                if contributes:
                    under_loss.add(name)
                else:
                    bottom_need[i][j] = False
                if not bottom_need[i][j]:
                    skip.add(name)

    # -- running ----------------------------------------------------------------
    def _find_batchnorm_scale_pairs(self) -> dict[int, int]:
        """{step of a BatchNorm: step of the per-channel Scale right after it, in place
        on its top}. The pair runs as one batch-norm pass with the Scale as its affine
        part; their shared blob only ever shows Scale's output."""
        pairs = {}
        for i in range(len(self.steps) - 1):
            bn_step, scale_step = self.steps[i], self.steps[i + 1]
            bn, scale = self.layers[bn_step.layer], self.layers[scale_step.layer]
            if bn.type != "BatchNorm" or scale.type != "Scale":
                continue
            if scale_step.bottoms == bn_step.tops and scale_step.tops == bn_step.tops and \
                    not bn_step.losses and not scale_step.losses and \
                    bn_step.no_grad == scale_step.no_grad and not scale_step.detach[0] and \
                    scale.per_channel_of(self.blob_shapes[bn_step.tops[0]]):
                pairs[i] = i + 1
        return pairs

    @property
    def input_names(self) -> list[str]:
        return [self.blob_names[i] for i in self.input_ids]

    @property
    def output_names(self) -> list[str]:
        return [self.blob_names[i] for i in self.output_ids]

    def forward(self, inputs: Mapping[str, torch.Tensor] | None = None, start: int = 0,
                end: int | None = None, values: list | None = None,
                record: dict | None = None, before=None, after=None):
        """Run layers start..end (inclusive). Returns (blob values by id, loss).

        `values` carries blobs from an earlier partial pass (pycaffe's start=...).
        `record` (a dict) gets, per layer that back-propagates, (bottom leaves, tops):
        each layer's bottoms enter as leaves of their own graph, so that a later
        Caffe-style Backward can run layer by layer from stored diffs. `before` and
        `after` are called with (layer index, values) around each layer (Caffe's
        Net callbacks). Either turns off the BatchNorm + Scale fusion, so every layer
        is seen on its own.
        """
        if values is None:
            values = [None] * len(self.blob_names)
        if inputs:
            for name, tensor in inputs.items():
                values[self.blob_index[name]] = tensor
        end = len(self.steps) - 1 if end is None else end
        loss = None
        layers = self.layers
        skip = -1
        for index in range(start, end + 1):
            step = self.steps[index]
            if index == skip:           # the Scale of a BatchNorm + Scale pair, done
                continue
            if before is not None:
                before(index, values)
            if step.is_input:
                for t in step.tops:
                    if values[t] is None:
                        raise NetError(f"input blob '{self.blob_names[t]}' was not given",
                                       self.layer_names[step.layer], "Input")
                if after is not None:
                    after(index, values)
                continue
            recording = record is not None and not step.no_grad and torch.is_grad_enabled()
            if recording:
                bottoms = [values[b].detach().requires_grad_(
                    not d and values[b].is_floating_point())
                    for b, d in zip(step.bottoms, step.detach)]
            else:
                bottoms = [values[b].detach() if d else values[b]
                           for b, d in zip(step.bottoms, step.detach)]
            leaves = list(bottoms)
            if step.spatial and self.channels_last:
                bottoms = [to_channels_last(b) for b in bottoms]
            run = layers[step.layer]
            partner = self.fused_scale.get(index)
            if partner is not None and partner <= end and record is None and \
                    before is None and after is None:
                fused = layers[step.layer].with_scale(layers[self.steps[partner].layer],
                                                      bottoms[0])
                if fused is not None:
                    run, skip = fused, partner
            try:
                if step.no_grad and torch.is_grad_enabled():
                    with torch.no_grad():
                        out = run(*bottoms)
                else:
                    out = run(*bottoms)
            except (torch.OutOfMemoryError, NetError):
                raise                   # a resource limit, or already says where
            except FORWARD_ERRORS as e:
                raise self._forward_error(step, bottoms, e) from e
            if isinstance(out, torch.Tensor):
                out = (out,)
            for t, v in zip(step.tops, out):
                values[t] = v
            if recording:
                record[index] = (leaves, tuple(out))
            for pos, weight in step.losses:
                term = out[pos].sum() * weight
                loss = term if loss is None else loss + term
            if after is not None:
                after(index, values)
        return values, loss

    def _forward_error(self, step: Step, bottoms: list, error: Exception) -> NetError:
        """A layer's forward failed inside torch (a case its setup did not rule out):
        say which layer, with which bottoms; the original stays chained."""
        layer = self.layers[step.layer]
        shapes = [list(b.shape) for b in bottoms]
        return NetError(f"forward failed for bottoms {shapes}: {type(error).__name__}: "
                        f"{error}", layer.layer_name, layer.type)

    def use_channels_last(self, enabled: bool = True) -> "NetModule":
        """Convolve and pool channels-last (NHWC) activations: their bottoms are converted
        once (a no-op for tops of earlier such layers) and their tops stay NHWC, as do
        the element-wise layers after them. Blob shapes and values are unchanged, up to
        float rounding (summation order); only memory order differs. Much faster on the
        CPU (bench/bench_lenet_train.py); the solver turns it on there."""
        self.channels_last = enabled
        return self

    def optimize_for_inference(self, precision: str = "fp32", channels_last: bool | None = None,
                               compile: bool = False):
        """An opt-in fast inference plan of this net (protonet.speed.InferenceNet): call it
        with {input: tensor} for {output: tensor}. It snapshots the weights; forward
        itself is unchanged."""
        from ..speed import InferenceNet
        return InferenceNet(self, precision=precision, channels_last=channels_last,
                            compile=compile)

    def forward_for_inference(self, inputs: Mapping[str, torch.Tensor] | None = None,
                              pending: dict | None = None):
        """forward(inputs) without autograd, by a cached inference plan that keeps every
        blob (speed.InferenceNet.forward_blobs): the same (blob values by id, loss),
        each blob as Caffe's forward leaves it, faster (folded BatchNorm/Scale, packed
        weights, fused ReLU). With a `pending` dict, the plan may also join shortcut
        sums into convolutions and leave the convolutions' tops to be made on demand:
        their values are None and `pending` gets {blob id: function making it}. The
        plan is made again when a param changed in place since, or the layout or
        device did. For pycaffe's Net.forward over the whole net when no backward
        will follow."""
        from ..speed import InferenceNet
        device = next((p.device for p in self.parameters()), torch.device("cpu"))
        deferrable = pending is not None
        key = (self.channels_last, device, tuple(self.blob_shapes[i] for i in self.input_ids),
               deferrable)
        plan = getattr(self, "_blob_plan", None)
        if plan is None or self._blob_plan_key != key or plan.stale():
            plan = InferenceNet(self, channels_last=self.channels_last, keep_blobs=True,
                                deferrable=deferrable)
            self._blob_plan, self._blob_plan_key = plan, key
        return plan.forward_blobs(inputs or {}, pending)

    def drop_inference_plan(self) -> None:
        """Forget forward_for_inference's cached plan (and the weights it holds): for
        changes to the params its own check cannot see, such as numpy writes through
        pycaffe's param views, which bump no torch version counter."""
        self._blob_plan = None

    def infer_shapes(self, input_shapes: Mapping[str, Sequence[int]], first: int = 0,
                     last: int | None = None) -> None:
        """Re-run shape inference for new input shapes (pycaffe's net.reshape()), over
        layers first..last (as Caffe's Forward reshapes only the layers it runs); the
        shapes of blobs later layers make stay as they were."""
        shapes = list(self.blob_shapes)
        for name, shape in input_shapes.items():
            shapes[self.blob_index[name]] = tuple(int(d) for d in shape)
        for step in self.steps[first:None if last is None else last + 1]:
            if step.is_input:
                continue
            layer = self.layers[step.layer]
            bottom = [shapes[b] for b in step.bottoms]
            try:
                tops = layer.reshape(bottom)
            except SETUP_ERRORS as e:
                raise ShapeError(f"cannot reshape for bottoms {[list(s) for s in bottom]}: "
                                 f"{e}", layer.layer_name, layer.type) from None
            for t, s in zip(step.tops, tops):
                problem = shape_problem(s)
                if problem:
                    raise ShapeError(f"top '{self.blob_names[t]}': {problem}",
                                     layer.layer_name, layer.type)
                shapes[t] = tuple(int(d) for d in s)
        self.blob_shapes = shapes
