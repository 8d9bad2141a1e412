"""Layer-by-layer timing of a net, as Caffe's `caffe time` measures it.

Each layer's forward is timed in turn; then each layer's backward is timed in
turn (reverse order) on its own inputs, which is what Caffe's tool does: it calls
every layer's Backward separately. Whole-net figures (a plain forward in inference
mode, and forward + backward through the whole graph) come alongside, since they
are what training and deployment actually pay.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .device import synchronize
from .net.module import NetModule


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


def _grad_leaves(tensors):
    return [t.detach().requires_grad_(t.is_floating_point()) for t in tensors]


def time_net(module: NetModule, iterations: int, device, inputs=None,
             on_iteration=None) -> Timings:
    inputs = inputs if inputs is not None else random_inputs(module, device)
    steps = [s for s in module.steps if not s.is_input]
    fwd = [0.0] * len(steps)
    bwd = [0.0] * len(steps)
    result = Timings([module.layer_names[s.layer] for s in steps],
                     [module.layers[s.layer].type for s in steps], fwd, bwd, iterations)
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
                torch.autograd.grad(outs, wrt, [torch.ones_like(o) for o in outs],
                                    allow_unused=True)
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
    result.net_forward_ms, result.net_forward_backward_ms = _whole_net(module, inputs,
                                                                       iterations, device)
    return result


def _whole_net(module: NetModule, inputs, iterations: int, device) -> tuple[float, float]:
    def forward_only():
        with torch.inference_mode():
            module(inputs)

    def forward_backward():
        leaves = {k: v.detach().requires_grad_(True) for k, v in inputs.items()}
        values, loss = module(leaves)
        outs = [values[i] for i in module.output_ids if values[i] is not None and
                values[i].requires_grad]
        if loss is not None and loss.requires_grad:
            outs.append(loss)
        if outs:
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        module.zero_grad(set_to_none=True)

    return _median_ms(forward_only, iterations, device), \
        _median_ms(forward_backward, iterations, device)


def _median_ms(fn, iterations: int, device) -> float:
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
