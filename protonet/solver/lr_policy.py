"""Caffe's learning rate policies (SGDSolver::GetLearningRate).

A policy is chosen and validated once, when the solver is built, so a bad
`lr_policy` or a missing `stepsize` fails before training starts instead of at the
first update. The rate is rounded to float32, the precision Caffe computes it in.
`step` and `multistep` also move the solver's `current_step`, which is saved in
snapshots; the policy returns it alongside the rate.
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import numpy as np

from ..errors import SolverError, closest
from ..proto import caffe_pb2

log = logging.getLogger("protonet")

# (iteration, current_step) -> (rate, new current_step)
Policy = Callable[[int, int], "tuple[float, int]"]


def _f32(value: float) -> float:
    with np.errstate(over="ignore"):
        return float(np.float32(value))


def _pow(base: float, exponent: float) -> float:
    """C's pow, as Caffe calls it: inf on overflow and nan outside the domain (a
    negative base to a fractional power: poly past max_iter) instead of Python's
    OverflowError, ZeroDivisionError or complex result."""
    with np.errstate(all="ignore"):
        return float(np.power(np.float64(base), np.float64(exponent)))


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise SolverError(message)


def _fixed(p: caffe_pb2.SolverParameter) -> Policy:
    rate = _f32(p.base_lr)
    return lambda it, step: (rate, step)


def _step(p: caffe_pb2.SolverParameter) -> Policy:
    _require(p.stepsize > 0, f"lr_policy 'step' needs stepsize > 0, got {p.stepsize}")
    _require(p.gamma >= 0, f"lr_policy 'step' needs gamma >= 0, got {p.gamma}")

    def rate(it: int, step: int):
        step = it // p.stepsize
        return _f32(p.base_lr * _pow(p.gamma, step)), step
    return rate


def _exp(p: caffe_pb2.SolverParameter) -> Policy:
    _require(p.gamma >= 0, f"lr_policy 'exp' needs gamma >= 0, got {p.gamma}")
    return lambda it, step: (_f32(p.base_lr * _pow(p.gamma, it)), step)


def _inv(p: caffe_pb2.SolverParameter) -> Policy:
    _require(p.gamma >= 0, f"lr_policy 'inv' needs gamma >= 0, got {p.gamma}")
    gamma, power = np.float32(p.gamma), np.float32(p.power)

    def rate(it: int, step: int):
        base = np.float32(1) + gamma * np.float32(it)
        return _f32(p.base_lr * _pow(float(base), -float(power))), step
    return rate


def _multistep(p: caffe_pb2.SolverParameter) -> Policy:
    _require(p.gamma >= 0, f"lr_policy 'multistep' needs gamma >= 0, got {p.gamma}")
    values = list(p.stepvalue)

    def rate(it: int, step: int):
        if step < len(values) and it >= values[step]:
            step += 1
            log.info("MultiStep Status: Iteration %d, step = %d", it, step)
        return _f32(p.base_lr * _pow(p.gamma, step)), step
    return rate


def _poly(p: caffe_pb2.SolverParameter) -> Policy:
    _require(p.max_iter > 0, f"lr_policy 'poly' needs max_iter > 0, got {p.max_iter}")

    def rate(it: int, step: int):
        left = np.float32(1) - np.float32(it) / np.float32(p.max_iter)
        return _f32(p.base_lr * _pow(float(left), p.power)), step
    return rate


def _sigmoid(p: caffe_pb2.SolverParameter) -> Policy:
    _require(p.gamma >= 0, f"lr_policy 'sigmoid' needs gamma >= 0, got {p.gamma}")
    _require(p.stepsize > 0, f"lr_policy 'sigmoid' needs stepsize > 0, got {p.stepsize}")

    def rate(it: int, step: int):
        z = -p.gamma * (it - p.stepsize)
        return _f32(p.base_lr / (1.0 + math.exp(min(z, 700.0)))), step
    return rate


POLICIES: dict[str, Callable[[caffe_pb2.SolverParameter], Policy]] = {
    "fixed": _fixed, "step": _step, "exp": _exp, "inv": _inv,
    "multistep": _multistep, "poly": _poly, "sigmoid": _sigmoid,
}


def make_policy(param: caffe_pb2.SolverParameter) -> Policy:
    """The rate function for `param.lr_policy`, with its parameters checked."""
    maker = POLICIES.get(param.lr_policy)
    if maker is None:
        raise SolverError(f"unknown lr_policy '{param.lr_policy}'"
                          f"{closest(param.lr_policy, POLICIES)}; expected one of "
                          f"{', '.join(POLICIES)}")
    return maker(param)
