"""Layer-by-layer timing of a net, as Caffe's `caffe time` measures it.

Each layer's forward is timed in turn; then each layer's backward is timed in
turn (reverse order) on its own inputs, which is what Caffe's tool does: it calls
every layer's Backward separately. Whole-net figures come alongside, since they are
what deployment and training actually pay: the median forward of the inference plan
(`NetModule.optimize_for_inference`: inference mode, BatchNorm folded, weights packed
once) and the median forward + backward through the whole graph.

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
    input_grad: bool = True     # whole-net backward also to the inputs (force_backward)
    params_only: bool = False   # backward: each layer's param gradients only (see below)


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


def _grad_leaves(tensors):
    return [t.detach().requires_grad_(t.is_floating_point()) for t in tensors]


def time_net(module: NetModule, iterations: int, device, inputs=None,
             on_iteration=None, options: TimingOptions | None = None) -> Timings:
    options = options or TimingOptions()
    inputs = inputs if inputs is not None else random_inputs(module, device)
    if options.channels_last:
        inputs = {name: to_channels_last(t) for name, t in inputs.items()}
        module.use_channels_last()
    steps = [s for s in module.steps if not s.is_input]
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
            bottoms = _grad_leaves([values[b] for b in step.bottoms])
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
            layer = module.layers[steps[k].layer]
            wrt = [b for b in bottoms if b.requires_grad] + \
                [p for p in layer.blobs if p.requires_grad]
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
    """Median ms of a forward (autograd, autocast for bf16/fp16) and a backward from
    every output with gradient ones, params' grads released after each.

    With `params_only`, the backward is what `caffe time` does on a net without a loss
    (a deploy net): Caffe then back-propagates to no blob at all, but every layer with
    learnable params still computes their gradients from its top diff. Each layer's
    bottoms are detached and its param gradients taken from its own top (ones)."""
    ones = _Ones()
    if options.params_only:
        return median_ms(lambda: _forward_param_gradients(module, inputs, options, device,
                                                          ones), iterations, device)

    def forward_backward():
        leaves = {k: v.detach().requires_grad_(options.input_grad and v.is_floating_point())
                  for k, v in inputs.items()}
        with autocast(options.precision, device):
            values, loss = module(leaves)
        outs = [values[i] for i in module.output_ids if values[i] is not None and
                values[i].requires_grad]
        if loss is not None and loss.requires_grad:
            outs.append(loss)
        if outs:
            torch.autograd.backward(outs, ones.for_all(outs))
        module.zero_grad(set_to_none=True)

    return median_ms(forward_backward, iterations, device)


def _forward_param_gradients(module: NetModule, inputs, options: TimingOptions,
                             device, ones: _Ones) -> None:
    values = [None] * len(module.blob_names)
    for name, tensor in inputs.items():
        values[module.blob_index[name]] = tensor
    pending = []
    with autocast(options.precision, device):
        for step in module.steps:
            if step.is_input:
                continue
            layer = module.layers[step.layer]
            out = layer(*[values[b].detach() for b in step.bottoms])
            out = (out,) if isinstance(out, torch.Tensor) else tuple(out)
            for t, v in zip(step.tops, out):
                values[t] = v
            params = [p for p in layer.blobs if p.requires_grad]
            if params:
                pending.append(([o for o in out if o.requires_grad], params))
    for outs, params in reversed(pending):
        if outs:    # (BatchNorm's statistics are params its output does not use)
            torch.autograd.grad(outs, params, ones.for_all(outs), allow_unused=True)


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
