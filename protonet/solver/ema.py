"""Polyak / exponential moving average (EMA) of the weights, an opt-in solver extension.

After every update the solver applies, each param the solver owns (`Solver._params`:
the train net's params, shared ones once, including lr_mult 0 ones such as BatchNorm
statistics) moves its average

    ema += (1 - decay) * (param - ema)        (= decay * ema + (1 - decay) * param)

in float32 on the param's device. The average starts from the params as they are at
the first iteration (after a resume's restore), or from an EMA file written beside the
solverstate being resumed. With `warmup`, the decay of the n-th update is
min(decay, (1 + n) / (10 + n)), as TensorFlow's ExponentialMovingAverage with
num_updates, so that a short run is not dominated by its initial weights.

The EMA only reads the params: training with it is bit-identical to training without.
Each snapshot gets `<prefix>_iter_N.ema.caffemodel` (`.ema.caffemodel.h5` for HDF5
snapshots) beside it, written atomically by `save_caffemodel` with the averages swapped
into the net for the duration of the write. With `test=True`, every test pass of test
net i is followed by a second pass of the same net with the averages swapped in,
logged as "EMA test output #k" and recorded as a `{"event": "test_ema"}` JSON-log
record; that pass reads further batches from the test data source. The raw weights
are restored bit for bit after each swap.

    solver = protonet.get_solver("solver.prototxt")
    ema = WeightEMA(solver, 0.999, test=True).attach()
    solver.solve()
    ema.save("averaged.caffemodel")
"""
from __future__ import annotations

import contextlib
import logging
import os

import numpy as np
import torch

from ..errors import SolverError
from ..io.weights import copy_weights, save_caffemodel

log = logging.getLogger("protonet")

EMA_SUFFIXES = ((".caffemodel.h5", ".ema.caffemodel.h5"), (".caffemodel", ".ema.caffemodel"),
                (".solverstate.h5", ".ema.caffemodel.h5"), (".solverstate", ".ema.caffemodel"))


def ema_path(snapshot_path: str) -> str:
    """The EMA weights file beside a snapshot's caffemodel or solverstate."""
    path = os.fspath(snapshot_path)
    for suffix, replacement in EMA_SUFFIXES:
        if path.endswith(suffix) and not path.endswith(replacement):
            return path[:-len(suffix)] + replacement
    raise SolverError(f"{path}: not a snapshot (.caffemodel[.h5] or .solverstate[.h5]) "
                      "to put an EMA file beside")


def check_decay(decay: float) -> float:
    decay = float(decay)
    if not 0.0 <= decay < 1.0:
        raise SolverError(f"the EMA decay must be in [0, 1), got {decay:g} "
                          "(e.g. 0.999: the average of about the last 1000 iterations)")
    return decay


class WeightEMA:
    """The moving average of one solver's params; `attach()` hooks it into the solver."""

    def __init__(self, solver, decay: float, *, test: bool = False, warmup: bool = False):
        self.solver = solver
        self.decay = check_decay(decay)
        self.test_enabled = test
        self.warmup = warmup
        self.shadow: list[torch.Tensor] | None = None
        self.updates = 0            # updates averaged since the EMA started (or resumed)

    # -- wiring ----------------------------------------------------------------------
    def attach(self) -> "WeightEMA":
        """Start averaging at the next iteration; write EMA files with each snapshot and,
        with `test`, test with the averages after each test pass."""
        self.solver.add_callback(self._on_start, _nothing)
        self.solver.add_hook("update", self.update)
        self.solver.add_hook("snapshot", self._on_snapshot)
        if self.test_enabled:
            self.solver.add_hook("record", self._on_record)
        return self

    def _on_start(self) -> None:
        if self.shadow is None:
            self.reset()

    def _on_snapshot(self, model_path: str) -> None:
        self.save(ema_path(model_path))

    def _on_record(self, record: dict) -> None:
        if record.get("event") == "test":
            self.test(record.get("net", 0))

    # -- the average -----------------------------------------------------------------
    @property
    def params(self) -> list[torch.Tensor]:
        return self.solver._params

    def reset(self) -> None:
        """Start the average at the current params."""
        self.shadow = [p.detach().clone() for p in self.params]
        self.updates = 0

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if self.warmup:
            n = self.updates
            return min(self.decay, (1 + n) / (10 + n))
        return self.decay

    def update(self) -> None:
        """Fold the current params into the average (the solver calls it after each update)."""
        if self.shadow is None:
            self.reset()
        if self.shadow:
            with torch.no_grad():
                torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params],
                                     1.0 - self.current_decay())
        self.updates += 1

    def averages(self) -> list[np.ndarray]:
        """The averages as float32 arrays, in the order of `solver._params`."""
        if self.shadow is None:
            self.reset()
        return [s.detach().cpu().numpy().copy() for s in self.shadow]

    @contextlib.contextmanager
    def swapped(self):
        """The net holds the averages inside the block, its own params again after it."""
        if self.shadow is None:
            self.reset()
        params = self.params
        with torch.no_grad():
            backup = [p.detach().clone() for p in params]
            for p, s in zip(params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)

    # -- files -----------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write the averaged net as a .caffemodel (or .caffemodel.h5), atomically."""
        log.info("Snapshotting EMA weights (decay %g) to %s", self.decay, path)
        with self.swapped():
            save_caffemodel(self.solver.train_module, path)

    def load(self, path: str) -> None:
        """Continue from averages in a weights file (an EMA snapshot)."""
        path = os.fspath(path)
        params = self.params
        with torch.no_grad():
            backup = [p.detach().clone() for p in params]
            try:
                copy_weights(self.solver.train_module.layers, path)
                self.shadow = [p.detach().clone() for p in params]
            finally:
                for p, b in zip(params, backup):
                    p.copy_(b)
        self.updates = 0

    def resume(self, state_file: str) -> bool:
        """Load the EMA file beside the solverstate being resumed; without one, warn and
        let the average start again from the restored params. True when one was loaded."""
        path = ema_path(state_file)
        if os.path.exists(path):
            log.info("Resuming the EMA weights from %s", path)
            self.load(path)
            return True
        log.warning("no EMA weights beside %s (%s): the average starts again from the "
                    "restored weights", state_file, path)
        return False

    # -- testing ---------------------------------------------------------------------
    def test(self, index: int = 0) -> dict:
        """Test net `index` with the averaged weights, as Solver.test does with the raw
        ones; logged and recorded (event "test_ema"). Returns the outputs by name."""
        solver = self.solver
        log.info("Iteration %d, testing net (#%d) with the EMA weights", solver.iter, index)
        iters = solver.param.test_iter[index]
        with self.swapped():
            sums, loss, labels = solver.test_scores(index, iters)
        return solver._report_test(index, iters, sums, loss, labels, event="test_ema",
                                   loss_label="EMA test loss",
                                   output_label="EMA test output", decay=self.decay)


def _nothing() -> None:
    pass
