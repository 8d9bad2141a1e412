"""Layer-by-layer timing of a net, as Caffe's `caffe time` measures it.

Each layer's forward is timed in turn; then each layer's backward is timed in
turn (reverse order) on its own inputs, which is what Caffe's tool does: it calls
every layer's Backward separately. Whole-net figures come alongside, since they are
what deployment and training actually pay: the median forward of the inference plan
(`NetModule.optimize_for_inference`: inference mode, BatchNorm folded, weights packed
once) and the median forward + backward through the whole graph.

Both backward passes compute exactly the gradients Caffe's would (`backward_targets`):
a bottom's only where Net::Init marks it as needing backward (bottom_need_backward:
under a loss and downstream of a learnable param, or force_backward), and the
gradients of every param with lr_mult != 0 (all of them under force_backward) — even
in a layer that feeds no loss, since `caffe time` calls every layer's Backward and a
layer computes its param gradients whenever their propagate-down flag is set. So on a
deploy net (no loss) the backward is param gradients only, as Caffe's.

`TimingOptions` picks the fast paths of protonet.speed: precision (bf16/fp16 via
autocast for the layer-by-layer and training passes, pre-cast weights for inference),
channels-last inputs, and torch.compile for the inference plan.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .device import synchronize
from .net.module import NetModule
from .speed import autocast, to_channels_last


@dataclass
class TimingOptions:
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False


@dataclass
class Timings:
    layer_names: list[str]
    layer_types: list[str]
    forward_ms: list[float]
    backward_ms: list[float]
    iterations: int
    iteration_ms: list[float] = field(default_factory=list)
    net_forward_ms: float = 0.0
    net_forward_backward_ms: float = 0.0
    compiled: bool = False

    @property
    def forward_total(self) -> float:
        return sum(self.forward_ms)

    @property
    def backward_total(self) -> float:
        return sum(self.backward_ms)


def random_inputs(module: NetModule, device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {module.blob_names[i]: torch.rand(module.blob_shapes[i], generator=gen).to(device)
            for i in module.input_ids}


class _Ones:
    """Top diffs of ones, made once per shape and layout, as Caffe's diffs persist
    between iterations (a fresh ones_like per layer per pass would time allocation)."""

    def __init__(self):
        self._made: dict = {}

    def like(self, tensor: torch.Tensor) -> torch.Tensor:
        key = (tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device)
        if key not in self._made:
            self._made[key] = torch.ones_like(tensor)
        return self._made[key]

    def for_all(self, tensors) -> list[torch.Tensor]:
        return [self.like(t) for t in tensors]


@dataclass
class BackwardTargets:
    """What Caffe's Backward of one layer computes: the gradients of these bottoms
    (positions) and of these params."""
    bottoms: tuple[int, ...]
    params: tuple[torch.nn.Parameter, ...]


def backward_targets(module: NetModule) -> list[BackwardTargets]:
    """Per non-input step of `module`, the gradients Caffe's Backward computes there:
    bottoms Net::Init marks as needing backward (the module's step.detach is their
    complement), params with lr_mult != 0 (requires_grad; every param under
    force_backward). Integer bottoms (labels, indices) never get gradients."""
    targets = []
    for step in module.steps:
        if step.is_input:
            continue
        layer = module.layers[step.layer]
        bottoms = tuple(j for j, d in enumerate(step.detach) if not d)
        targets.append(BackwardTargets(bottoms, tuple(p for p in layer.blobs
                                                      if p.requires_grad)))
    return targets


def _leaves(tensors, need: tuple[int, ...]):
    return [t.detach().requires_grad_(j in need and t.is_floating_point())
            for j, t in enumerate(tensors)]


def time_net(module: NetModule, iterations: int, device, inputs=None,
             on_iteration=None, options: TimingOptions | None = None) -> Timings:
    options = options or TimingOptions()
    inputs = inputs if inputs is not None else random_inputs(module, device)
    if options.channels_last:
        inputs = {name: to_channels_last(t) for name, t in inputs.items()}
        module.use_channels_last()
    steps = [s for s in module.steps if not s.is_input]
    targets = backward_targets(module)
    fwd = [0.0] * len(steps)
    bwd = [0.0] * len(steps)
    result = Timings([module.layer_names[s.layer] for s in steps],
                     [module.layers[s.layer].type for s in steps], fwd, bwd, iterations)
    ones = _Ones()
    for it in range(iterations + 1):          # iteration 0 warms up and is not counted
        values = [None] * len(module.blob_names)
        for name, tensor in inputs.items():
            values[module.blob_index[name]] = tensor
        saved = []
        start_iter = time.perf_counter()
        for k, step in enumerate(steps):
            bottoms = _leaves([values[b] for b in step.bottoms], targets[k].bottoms)
            synchronize(device)
            t0 = time.perf_counter()
            with autocast(options.precision, device):
                out = module.layers[step.layer](*bottoms)
            synchronize(device)
            if it:
                fwd[k] += (time.perf_counter() - t0) * 1e3
            out = (out,) if isinstance(out, torch.Tensor) else tuple(out)
            for t, v in zip(step.tops, out):
                values[t] = v
            saved.append((bottoms, out))
        for k in range(len(steps) - 1, -1, -1):
            bottoms, out = saved[k]
            wrt = [b for b in bottoms if b.requires_grad] + list(targets[k].params)
            outs = [o for o in out if o.requires_grad]
            synchronize(device)
            t0 = time.perf_counter()
            if wrt and outs:
                torch.autograd.grad(outs, wrt, ones.for_all(outs), allow_unused=True)
            synchronize(device)
            if it:
                bwd[k] += (time.perf_counter() - t0) * 1e3
        if it:
            elapsed = (time.perf_counter() - start_iter) * 1e3
            result.iteration_ms.append(elapsed)
            if on_iteration:
                on_iteration(it, elapsed)
    for lst in (fwd, bwd):
        for k in range(len(lst)):
            lst[k] /= max(iterations, 1)
    result.net_forward_ms, result.compiled = time_inference(module, inputs, iterations,
                                                            device, options)
    result.net_forward_backward_ms = time_training(module, inputs, iterations, device,
                                                   options)
    return result


def time_inference(module: NetModule, inputs, iterations: int, device,
                   options: TimingOptions) -> tuple[float, bool]:
    """Median ms of the inference plan's forward, and whether it runs compiled."""
    plan = module.optimize_for_inference(options.precision, options.channels_last,
                                         options.compile)
    return median_ms(lambda: plan(inputs), iterations, device), plan.compiled


def time_training(module: NetModule, inputs, iterations: int, device,
                  options: TimingOptions) -> float:
    """Median ms of one `training_step`: the whole net's forward and Caffe's backward."""
    step = training_step(module, inputs, options.precision, device)
    return median_ms(step, iterations, device)


def training_step(module: NetModule, inputs, precision: str = "fp32", device="cpu"):
    """A function doing one forward + backward of the whole net that computes exactly
    the gradients Caffe's Net::Backward does (`backward_targets`); param grads are
    released after each call.

    Where every layer with trainable params feeds a loss, that is NetModule.forward
    (the solver's own pass: fused BatchNorm + Scale pairs, channels-last) and a backward
    from the loss. Where some do not (a deploy net has no loss at all), those layers'
    param gradients come from their own tops (gradient ones, as the timing's diffs),
    their bottoms detached, as Caffe's Backward computes them from the top diff and
    back-propagates nothing further."""
    ones = _Ones()
    need_input = {b for step in module.steps if not step.is_input
                  for b, d in zip(step.bottoms, step.detach) if not d}
    local = {i for i, step in enumerate(module.steps) if step.no_grad and not step.is_input
             and any(p.requires_grad for p in module.layers[step.layer].blobs)}
    loss_blobs = {step.tops[pos] for step in module.steps for pos, _ in step.losses}
    # Outputs no loss reads whose layer still needs backward (force_backward on a net
    # without a loss, or a branch beside it): Caffe back-propagates their diffs too.
    loose = [i for i in module.output_ids if i not in loss_blobs]

    def leaves():
        return {k: v.detach().requires_grad_(module.blob_index[k] in need_input and
                                             v.is_floating_point())
                for k, v in inputs.items()}

    def step():
        if local:
            values, loss, roots = _forward_local_params(module, leaves(), local, precision,
                                                        device)
        else:
            with autocast(precision, device):
                values, loss = module(leaves())
            roots = []
        roots += [values[i] for i in loose if values[i] is not None and
                  values[i].requires_grad and not any(values[i] is r for r in roots)]
        grads = ones.for_all(roots)
        if loss is not None and loss.requires_grad:
            roots, grads = [loss] + roots, [torch.ones_like(loss)] + grads
        if roots:
            torch.autograd.backward(roots, grads)
        module.zero_grad(set_to_none=True)

    return step


def _forward_local_params(module: NetModule, inputs, local: set[int], precision: str,
                          device):
    """NetModule.forward's wiring, except that the steps in `local` (no backward to
    their bottoms, but params with gradients) run with autograd on detached bottoms.
    Returns the blob values, the loss and those steps' tops (roots of the backward,
    with gradient ones)."""
    values = [None] * len(module.blob_names)
    for name, tensor in inputs.items():
        values[module.blob_index[name]] = tensor
    loss, roots = None, []
    with autocast(precision, device):
        for index, step in enumerate(module.steps):
            if step.is_input:
                continue
            bottoms = [values[b].detach() if d else values[b]
                       for b, d in zip(step.bottoms, step.detach)]
            if step.spatial and module.channels_last:
                bottoms = [to_channels_last(b) for b in bottoms]
            layer = module.layers[step.layer]
            if step.no_grad and index not in local:
                with torch.no_grad():
                    out = layer(*bottoms)
            else:
                out = layer(*bottoms)
            out = (out,) if isinstance(out, torch.Tensor) else tuple(out)
            for t, v in zip(step.tops, out):
                values[t] = v
            if index in local:
                roots += [o for o in out if o.requires_grad]
            for pos, weight in step.losses:
                term = out[pos].sum() * weight
                loss = term if loss is None else loss + term
    return values, loss, roots


def median_ms(fn, iterations: int, device, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(iterations, 1)):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]
