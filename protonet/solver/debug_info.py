"""Caffe's debug_info lines, and what a NaN or Inf loss reports.

With debug_info, Caffe logs the mean absolute value of every top and param blob after
the forward pass ([Forward]), of every param diff and the nets' L1/L2 norms after the
backward ([Backward]), and of each param's data and update ([Update]); protonet logs
the same lines. A non-finite loss is explained the way those lines would show it: the
first layer whose output is not finite.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from ..errors import SolverError
from ..net.module import NetModule

log = logging.getLogger("protonet")


def _abs_mean(tensor: torch.Tensor) -> float:
    return float(tensor.detach().abs().float().mean()) if tensor.numel() else 0.0


def forward_debug(module: NetModule, values: list) -> None:
    for step in module.steps:
        name = module.layer_names[step.layer]
        for t in step.tops:
            if values[t] is not None:
                log.info("    [Forward] Layer %s, top blob %s data: %g", name,
                         module.blob_names[t], _abs_mean(values[t]))
        for j, blob in enumerate(module.layers[step.layer].blobs):
            log.info("    [Forward] Layer %s, param blob %d data: %g", name, j,
                     _abs_mean(blob))


def backward_debug(module: NetModule) -> None:
    for step in reversed(module.steps):
        layer = module.layers[step.layer]
        for j, blob in enumerate(layer.blobs):
            if blob.requires_grad and blob.grad is not None:
                log.info("    [Backward] Layer %s, param blob %d diff: %g",
                         layer.layer_name, j, _abs_mean(blob.grad))
    params = [e.param for e in module.learnable]
    if params:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        l1 = (sum(float(p.abs().sum()) for p in params), sum(float(g.abs().sum()) for g in grads))
        l2 = (float(torch.stack(torch._foreach_norm(params)).norm()),
              float(torch.stack(torch._foreach_norm(grads)).norm()))
        log.info("    [Backward] All net params (data, diff): L1 norm = (%g, %g); "
                 "L2 norm = (%g, %g)", l1[0], l1[1], l2[0], l2[1])


def update_debug(module: NetModule, updates: Sequence[torch.Tensor]) -> None:
    for entry, update in zip(module.learnable, updates):
        log.info("    [Update] Layer %s, param %s data: %g; diff: %g", entry.layer,
                 entry.name or entry.index, _abs_mean(entry.param), _abs_mean(update))


def nonfinite_error(module: NetModule, values: list, loss: float, source: str,
                    iteration: int) -> SolverError:
    """What stops training on a NaN/Inf loss: the iteration and, as Caffe's
    debug_info would show, the first layer whose output is not finite."""
    culprit = "no layer output is NaN or Inf (the loss overflowed when summed)"
    for step in module.steps:
        bad = [t for t in step.tops if values[t] is not None and
               values[t].is_floating_point() and not bool(torch.isfinite(values[t]).all())]
        if bad:
            layer = module.layers[step.layer]
            culprit = (f"the first non-finite output is top '{module.blob_names[bad[0]]}' "
                       f"of layer '{layer.layer_name}' ({layer.type})")
            params = [j for j, p in enumerate(layer.blobs)
                      if not bool(torch.isfinite(p.detach()).all())]
            if params:
                culprit += (f", whose param blob(s) {params} are already non-finite "
                            "(an earlier update diverged)")
            break
    return SolverError(
        f"{source}: iteration {iteration}: the loss is {loss}; {culprit}. Training "
        "stopped before this update (snapshots so far are intact); lower base_lr or "
        "check the data, or ask to train on with --nan_effect continue "
        "(Solver(..., nan_effect='continue')).")
