"""Test scoring: a net's outputs as Caffe reports them, and the solver's test passes.

Caffe's Solver::Test runs test_iter batches, sums every element of every output blob,
and logs each mean (loss outputs with their weight: ` (* w = w*value loss)`), plus the
mean loss when test_compute_loss. `Testing` is that part of the Solver; the output
helpers are shared with `protonet test` and ensembles.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from ..net.module import NetModule
from ..speed import autocast
from .debug_info import forward_debug
from .updates import f32

log = logging.getLogger("protonet")
NONE, SNAPSHOT, STOP = "none", "snapshot", "stop"      # Caffe's SolverAction


def output_labels(module: NetModule, values: list) -> list[tuple[str, float]]:
    """(blob name, loss weight) for each element of the net's output blobs, in
    Caffe's order (output blobs by name, elements in memory order)."""
    weights = {step.tops[pos]: w for step in module.steps for pos, w in step.losses}
    return [(module.blob_names[b], weights.get(b, 0.0))
            for b in module.output_ids for _ in range(values[b].numel())]


def flat_outputs(module: NetModule, values: list) -> torch.Tensor:
    """All output blob elements of one forward pass as one float32 vector."""
    parts = [values[b].detach().reshape(-1).float() for b in module.output_ids]
    return torch.cat(parts) if parts else torch.zeros(0)


def score_line(value: float, name: str, weight: float) -> str:
    """`name = value`, plus Caffe's ` (* w = w*value loss)` for loss outputs."""
    text = f"{name} = {value:g}"
    if weight:
        text += f" (* {weight:g} = {f32(np.float32(weight) * np.float32(value)):g} loss)"
    return text


def group_scores(labels: list[tuple[str, float]], values: list[float]) -> dict:
    """Scores by output name (a list when an output has several elements)."""
    grouped: dict[str, list[float]] = {}
    for (name, _), value in zip(labels, values):
        grouped.setdefault(name, []).append(value)
    return {k: v[0] if len(v) == 1 else v for k, v in grouped.items()}


class Testing:
    """The Solver's test passes (a mixin of protonet.solver.solver.Solver)."""

    def test_all(self) -> list[dict]:
        results = []
        for i in range(len(self.test_modules)):
            if self.requested_early_exit:
                break
            results.append(self.test(i))
        return results

    def test(self, index: int = 0) -> dict:
        """Caffe's Solver::Test: mean of each output element over test_iter batches."""
        log.info("Iteration %d, Testing net (#%d)", self.iter, index)
        iters = self.param.test_iter[index]
        scores = self.test_scores(index, iters, interruptible=True)
        if scores is None:
            log.info("Test interrupted.")
            return {}
        return self._report_test(index, iters, *scores)

    def test_scores(self, index: int, iters: int, interruptible: bool = False):
        """(sums of the flattened outputs, summed loss, output labels) over `iters`
        batches of test net `index`; None if a signal interrupted the test."""
        module = self.test_modules[index]
        sums, loss, labels = None, 0.0, []
        with torch.inference_mode():      # no autograd bookkeeping at all (Caffe's TEST)
            for _ in range(iters):
                if interruptible and self._test_interrupted():
                    return None
                with autocast(self.precision, self.device):
                    values, batch_loss = self._forward(index + 1)
                if self.param.debug_info:
                    forward_debug(module, values)
                if self.param.test_compute_loss and batch_loss is not None:
                    loss += float(batch_loss)
                flat = flat_outputs(module, values)
                if sums is None:
                    sums, labels = flat.clone(), output_labels(module, values)
                else:
                    sums += flat
        return sums, loss, labels

    def _report_test(self, index: int, iters: int, sums, loss: float, labels,
                     event: str = "test", loss_label: str = "Test loss",
                     output_label: str = "Test net output", **extra) -> dict:
        """Log and publish a test's means (Caffe's lines); returns the outputs by name."""
        record = {"event": event, "iter": self.iter, "net": index, **extra}
        if self.param.test_compute_loss:
            loss = f32(np.float32(loss) / np.float32(iters))
            log.info("%s: %g", loss_label, loss)
            record["loss"] = loss
        means = (sums / iters).tolist() if sums is not None else []
        for i, ((name, weight), value) in enumerate(zip(labels, means)):
            log.info("    %s #%d: %s", output_label, i, score_line(value, name, weight))
        record["outputs"] = group_scores(labels, means)
        record["time"] = time.time()
        self._publish(record)
        return record["outputs"]

    def _test_interrupted(self) -> bool:
        while (request := self._request()) != NONE:
            if request == SNAPSHOT:
                self.snapshot()
            elif request == STOP:
                self.requested_early_exit = True
        return self.requested_early_exit
