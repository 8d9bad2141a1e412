"""What training reports as it goes: Caffe's display lines, the JSON-lines log, the
smoothed loss and the progress bar.

Every `display` iterations Caffe logs the smoothed loss (the mean of the last
average_loss losses) and each train net output; protonet logs the same lines, and
writes each display and test record as one JSON object per line (with the learning
rate of that iteration's update) for tools and the "record" hooks.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time

import torch

from ..errors import SolverError
from .scoring import flat_outputs, group_scores, output_labels, score_line

log = logging.getLogger("protonet")


class JsonLog:
    """One JSON object per line, flushed per event. The first open truncates the
    file unless `append` (a resumed run); later opens always append."""

    def __init__(self, path: str):
        self.path = path
        self.file = None
        self.started = False

    def write(self, record: dict, append: bool) -> None:
        try:
            if self.file is None:
                os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
                mode = "a" if append or self.started else "w"
                self.file = open(self.path, mode, encoding="utf-8")
                self.started = True
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:        # a full disk: say so, rather than a traceback
            raise SolverError(f"{self.path}: could not write the JSON log "
                              f"({e.strerror or e})") from e

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class Reporting:
    """The Solver's display and records (a mixin of protonet.solver.solver.Solver)."""

    def _smooth(self, loss: torch.Tensor) -> None:
        """Keep the last average_loss losses (Caffe's UpdateSmoothedLoss), lazily."""
        window = self.param.average_loss
        if len(self._losses) < window:
            self._losses.append(loss)
        else:
            self._losses[(self.iter - self._start_iter) % window] = loss

    @property
    def smoothed_loss(self) -> float:
        if not self._losses:
            return 0.0
        return float(torch.stack(self._losses).float().mean())

    def _display(self, values: list) -> None:
        now = time.perf_counter()
        lapse = now - self._timer
        per_s = (self.iter - self._iter_last) / (lapse or 1)
        loss = self.smoothed_loss
        log.info("Iteration %d (%g iter/s, %gs/%d iters), loss = %g", self.iter, per_s,
                 lapse, self.param.display, loss)
        self._timer, self._iter_last = now, self.iter
        module = self.train_module
        labels = output_labels(module, values)
        scores = flat_outputs(module, values).tolist()
        for i, ((name, weight), value) in enumerate(zip(labels, scores)):
            log.info("    Train net output #%d: %s", i, score_line(value, name, weight))
        self._display_record = {"event": "train", "iter": self.iter, "loss": loss,
                                "iter_per_s": per_s, "outputs": group_scores(labels, scores)}
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4g}", refresh=False)

    def _emit_display(self, rate: float) -> None:
        record, self._display_record = self._display_record, None
        if record is not None:
            record["lr"] = rate
            record["time"] = time.time()
            self._publish(record)

    def _publish(self, record: dict) -> None:
        """A display/test record to the JSON log and the "record" hooks."""
        if self._json is not None:
            self._json.write(record, self._restored)
        for fn in self._hooks["record"]:
            fn(record)


@contextlib.contextmanager
def progress_bar(solver):
    """A tqdm bar over the iterations while `solver.progress` is on, with log lines
    routed through it so the two do not garble each other."""
    if not solver.progress:
        yield
        return
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm
    with tqdm(total=solver.param.max_iter, initial=solver.iter, unit="it",
              dynamic_ncols=True, desc="train") as bar, logging_redirect_tqdm():
        solver._bar = bar
        try:
            yield
        finally:
            solver._bar = None
