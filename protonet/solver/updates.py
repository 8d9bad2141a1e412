"""Caffe's update rules (ComputeUpdateValue of each solver), over lists of tensors.

Each rule turns the regularized gradients into the step Caffe subtracts from the
params, in place, so after an update `param.grad` holds what Caffe's param diff
holds (pycaffe scripts read it). The arithmetic follows the CPU code path op by
op, in float32; unlike torch.optim, SGD keeps the learning rate inside its history
(v = momentum * v + lr * g), which is what Caffe's solverstate files store.

`history` is in Caffe's order: one blob per param, then (AdaDelta, Adam) a
second blob per param.
"""
from __future__ import annotations

from typing import ClassVar, Sequence

import numpy as np
import torch

from ..errors import SolverError
from ..proto import caffe_pb2

Tensors = list[torch.Tensor]


def f32(value: float) -> float:
    """A Python float holding the float32 value Caffe would compute."""
    return float(np.float32(value))


class UpdateRule:
    """History buffers plus the rule; `apply(grads, rates, iteration)` edits grads."""

    slots: ClassVar[int] = 1      # history blobs per param

    def __init__(self, param: caffe_pb2.SolverParameter, params: Sequence[torch.Tensor]):
        self.param = param
        self.history: Tensors = [torch.zeros_like(p, memory_format=torch.contiguous_format)
                                 for _ in range(self.slots) for p in params]
        self.check(param)

    @classmethod
    def check(cls, param: caffe_pb2.SolverParameter) -> None:
        """Caffe's constructor sanity checks for this rule."""

    def apply(self, grads: Tensors, rates: list[float], iteration: int) -> Tensors | None:
        """Turn grads into the step, in place (returning None), or return the tensors
        holding the step (they become the params' diffs until the next backward)."""
        raise NotImplementedError

    def _halves(self) -> tuple[Tensors, Tensors]:
        n = len(self.history) // 2
        return self.history[:n], self.history[n:]


def _by_rate(rates: list[float]) -> list[tuple[float, list[int]]]:
    """Param indices grouped by local rate (one fused op per rate; most nets have
    one or two rates: lr_mult 1 for weights, 2 for biases)."""
    groups: dict[float, list[int]] = {}
    for i, rate in enumerate(rates):
        groups.setdefault(rate, []).append(i)
    return list(groups.items())


class SGD(UpdateRule):
    """v = momentum * v + rate * g; step = v (the history itself, not a copy of it)."""

    def apply(self, grads, rates, iteration):
        history = self.history
        torch._foreach_mul_(history, f32(self.param.momentum))
        for rate, members in _by_rate(rates):     # no scaled copy of the grads
            torch._foreach_add_([history[i] for i in members], [grads[i] for i in members],
                                alpha=rate)
        return history


class Nesterov(UpdateRule):
    """v' = momentum * v + rate * g; step = (1 + momentum) * v' - momentum * v."""

    def apply(self, grads, rates, iteration):
        momentum = f32(self.param.momentum)
        history = self.history
        previous = torch._foreach_mul(history, momentum)
        torch._foreach_mul_(history, momentum)
        torch._foreach_add_(history, torch._foreach_mul(grads, rates))
        step = torch._foreach_mul(history, f32(1 + np.float32(momentum)))
        torch._foreach_sub_(step, previous)
        torch._foreach_copy_(grads, step)


class AdaGrad(UpdateRule):
    """h += g^2; step = rate * g / (sqrt(h) + delta)."""

    @classmethod
    def check(cls, param):
        if param.momentum != 0:
            raise SolverError("momentum cannot be used with AdaGrad (set momentum: 0)")

    def apply(self, grads, rates, iteration):
        torch._foreach_add_(self.history, torch._foreach_mul(grads, grads))
        denom = torch._foreach_sqrt(self.history)
        torch._foreach_add_(denom, f32(self.param.delta))
        torch._foreach_div_(grads, denom)
        torch._foreach_mul_(grads, rates)


class RMSProp(UpdateRule):
    """h = decay * h + (1 - decay) * g^2; step = rate * g / (sqrt(h) + delta)."""

    @classmethod
    def check(cls, param):
        if param.momentum != 0:
            raise SolverError("momentum cannot be used with RMSProp (set momentum: 0)")
        if not 0 <= param.rms_decay < 1:
            raise SolverError(f"rms_decay should lie in [0, 1), got {param.rms_decay}")

    def apply(self, grads, rates, iteration):
        decay = np.float32(self.param.rms_decay)
        squares = torch._foreach_mul(grads, grads)
        torch._foreach_mul_(squares, f32(np.float32(1) - decay))
        torch._foreach_mul_(self.history, float(decay))
        torch._foreach_add_(self.history, squares)
        denom = torch._foreach_sqrt(self.history)
        torch._foreach_add_(denom, f32(self.param.delta))
        torch._foreach_div_(grads, denom)
        torch._foreach_mul_(grads, rates)


class AdaDelta(UpdateRule):
    """Zeiler's AdaDelta with Caffe's placement of delta and of the rate."""

    slots = 2

    def apply(self, grads, rates, iteration):
        momentum = np.float32(self.param.momentum)
        keep, fresh = float(momentum), f32(np.float32(1) - momentum)
        delta = f32(self.param.delta)
        grad_history, step_history = self._halves()
        _decay_into(grad_history, torch._foreach_mul(grads, grads), keep, fresh)
        ratio = torch._foreach_add(step_history, delta)
        torch._foreach_div_(ratio, torch._foreach_add(grad_history, delta))
        torch._foreach_sqrt_(ratio)
        torch._foreach_mul_(grads, ratio)
        _decay_into(step_history, torch._foreach_mul(grads, grads), keep, fresh)
        torch._foreach_mul_(grads, rates)


class Adam(UpdateRule):
    """Kingma & Ba's Adam; the bias correction is folded into the rate as in Caffe."""

    slots = 2

    def apply(self, grads, rates, iteration):
        beta1, beta2 = np.float32(self.param.momentum), np.float32(self.param.momentum2)
        t = iteration + 1
        correction = np.float32(np.sqrt(1.0 - float(beta2) ** t) / (1.0 - float(beta1) ** t))
        first, second = self._halves()
        _decay_into(first, grads, float(beta1), f32(np.float32(1) - beta1))
        _decay_into(second, torch._foreach_mul(grads, grads), float(beta2),
                    f32(np.float32(1) - beta2))
        denom = torch._foreach_sqrt(second)
        torch._foreach_add_(denom, f32(self.param.delta))
        step = torch._foreach_div(first, denom)
        torch._foreach_mul_(step, [f32(np.float32(r) * correction) for r in rates])
        torch._foreach_copy_(grads, step)


def _decay_into(history: Tensors, values: Tensors, keep: float, fresh: float) -> None:
    """history = keep * history + fresh * values (Caffe's axpby), in place."""
    scaled = torch._foreach_mul(values, fresh)
    torch._foreach_mul_(history, keep)
    torch._foreach_add_(history, scaled)


RULES: dict[str, type[UpdateRule]] = {
    "SGD": SGD, "Nesterov": Nesterov, "AdaGrad": AdaGrad,
    "RMSProp": RMSProp, "AdaDelta": AdaDelta, "Adam": Adam,
}
