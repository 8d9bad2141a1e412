"""The training loop: Caffe's Solver and SGDSolver family, step for step.

Caffe's observable behaviour is the contract: which iteration tests and snapshots
happen at, the order of the update (learning rate, gradient clipping, 1/iter_size
normalization, weight decay, the rule, data -= diff), the smoothed loss, the log
lines tools parse, and the solverstate files. Test nets hold the very tensors of
the train net's params, so an update is visible to them without copying.

The per-iteration path is kept flat: the param, gradient, rate and decay lists are
built once, updates are fused foreach ops, and host/device syncs happen only at
display, test and snapshot time.

The other parts live beside it: building the nets from the SolverParameter
(solver/nets.py), test passes and output scores (solver/scoring.py), display lines,
JSON log and progress bar (solver/reporting.py), debug_info and the NaN report
(solver/debug_info.py), solverstate files (solver/snapshot.py).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable, ClassVar

import numpy as np
import torch

from .. import hostsync
from ..errors import ProtonetError, SolverError, closest
from ..io.text import to_text
from ..io.weights import copy_weights, save_caffemodel
from ..net.module import NetModule
from ..proto import caffe_pb2
from ..pycaffe import Net
from ..speed import PRECISIONS, autocast, precision_dtype
from . import distributed, nets
from .debug_info import backward_debug, forward_debug, nonfinite_error, update_debug
from .loss_scale import LossScaler
from .lr_policy import make_policy
from .nets import _located, _read_solver_param, _source_name
from .reporting import JsonLog, Reporting, progress_bar
from .scoring import NONE, SNAPSHOT, STOP, Testing
from .snapshot import (SolverStateData, check_history, load_history, read_state,
                       resolve_learned_net, snapshot_filename, write_state)
from .updates import RULES, UpdateRule, f32
# Named here before the split into nets/scoring/reporting/debug_info; kept importable.
from .nets import load_weights, solver_device  # noqa: F401,E402
from .scoring import flat_outputs, group_scores, output_labels, score_line  # noqa: F401,E402

log = logging.getLogger("protonet")

SP = caffe_pb2.SolverParameter
CONTINUE = "continue"                                   # what a non-finite loss may do


def _check_precision(precision: str) -> str:
    """`precision` itself when it is one of PRECISIONS, else a SolverError."""
    try:
        precision_dtype(precision)
    except (ProtonetError, TypeError):
        raise SolverError(f"precision must be one of {', '.join(PRECISIONS)} (fp32: "
                          "Caffe's numerics; bf16/fp16: mixed precision), got "
                          f"{precision!r}") from None
    return precision


class Solver(Testing, Reporting):
    """Caffe's Solver: `step(n)`, `solve(resume_file)`, `snapshot()`, `restore(path)`.

    `param` is a solver prototxt path or a SolverParameter. `device` overrides
    solver_mode/device_id. `action` is polled once per iteration (and per test
    batch) and returns "none", "snapshot" or "stop", like Caffe's signal handler.
    `source` names the solver in errors (default: the path). A NaN or Inf loss
    stops training with a SolverError naming the iteration and the first layer
    whose output is not finite, before that iteration's update; with
    `nan_effect="continue"` training goes on, as Caffe's does. `precision` "bf16"
    or "fp16" runs the train and test nets' forward passes under torch.autocast
    (mixed precision); params, gradients, solver history and snapshots stay
    float32, and fp16 scales the loss dynamically (protonet.solver.loss_scale),
    skipping the update of an iteration whose gradients overflowed. Built after
    `distributed.init`, the solver is one worker of data-parallel training
    (docs/distributed.md): only rank 0 tests, snapshots and writes the JSON log.
    """

    rule_class: ClassVar[type[UpdateRule] | None] = None   # None: from param.type

    def __init__(self, param, device=None, *, action: Callable[[], str] | None = None,
                 log_json: str | None = None, progress: bool = False,
                 source: str | None = None, nan_effect: str = STOP,
                 precision: str = "fp32"):
        self.source = source or _source_name(param)
        self.param = _read_solver_param(param)
        if nan_effect not in (STOP, CONTINUE):
            raise SolverError(f"nan_effect must be '{STOP}' or '{CONTINUE}', got '{nan_effect}'")
        self.nan_effect = nan_effect
        self.precision = _check_precision(precision)
        # fp16 gradients underflow without a dynamic loss scale; bf16 and fp32 need none.
        self.loss_scaler = LossScaler() if precision == "fp16" else None
        with _located(self.source):
            rule_class = self.rule_class or self._rule_for(self.param.type)
            rule_class.check(self.param)
            self._policy = make_policy(self.param)
            self._check_param()
        log.info("Initializing solver from parameters: \n%s", to_text(self.param))
        # Data-parallel workers (distributed.init): rank 0 alone tests, snapshots and logs.
        self.rank, self.world_size = distributed.rank_world()
        distributed.seed(self.param.random_seed)       # random_seed + rank, as Caffe
        self.device = torch.device(device) if device is not None else \
            nets.solver_device(self.param)
        with _located(self.source):
            self.train_module = nets.train_net(self.param, self.device)
            self.test_modules = nets.test_nets(self.param, self.train_module, self.device)
        if self.device.type == "cpu":      # NHWC convolution and pooling: faster there
            for module in (self.train_module, *self.test_modules):
                module.use_channels_last()
        log.info("Solver scaffolding done.")
        if self.precision != "fp32":
            log.info("Training in %s mixed precision (autocast)%s; params, gradients and "
                     "updates in float32", self.precision,
                     ", loss scaled dynamically" if self.loss_scaler is not None else "")
        self.iter = 0
        self.current_step = 0
        self.requested_early_exit = False
        self.action = action
        self.progress = progress and self.rank == 0
        self._json = JsonLog(log_json) if log_json and self.rank == 0 else None
        self._restored = False
        self._callbacks: list[tuple[Callable, Callable]] = []
        self._views = [Net.from_module(m, self.device)
                       for m in [self.train_module, *self.test_modules]]
        self._init_update(rule_class)
        self._sync = distributed.GradientSync(self) if self.world_size > 1 else None
        if self._sync is not None:
            self._callbacks.append((self._sync.on_start, self._sync.on_gradients_ready))
        self._losses: list[torch.Tensor] = []
        self._start_iter = 0
        self._bar = None
        self._display_record: dict | None = None
        self._hooks: dict[str, list[Callable]] = {"record": [], "update": [], "snapshot": []}

    # -- construction ---------------------------------------------------------------
    @staticmethod
    def _rule_for(type_name: str) -> type[UpdateRule]:
        rule = RULES.get(type_name)
        if rule is None:
            raise SolverError(f"unknown solver type '{type_name}'{closest(type_name, RULES)}; "
                              f"expected one of {', '.join(RULES)}")
        return rule

    def _check_param(self) -> None:
        p = self.param
        if p.average_loss < 1:
            raise SolverError(f"average_loss must be at least 1, got {p.average_loss}")
        if p.iter_size < 1:
            raise SolverError(f"iter_size must be at least 1, got {p.iter_size}")
        if p.regularization_type not in ("L1", "L2"):
            raise SolverError(f"unknown regularization_type '{p.regularization_type}'; "
                              "expected L1 or L2")
        if p.snapshot and distributed.is_root():     # only rank 0 writes (as Caffe)
            self._check_snapshot_prefix()

    def _check_snapshot_prefix(self) -> None:
        prefix = self.param.snapshot_prefix
        if not prefix:
            raise SolverError("snapshot is set but snapshot_prefix is not")
        folder = os.path.dirname(prefix) or "."
        if not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
            raise SolverError(f"cannot write to snapshot prefix '{prefix}': make sure the "
                              f"folder '{folder}' exists and is writable")

    def _init_update(self, rule_class: type[UpdateRule]) -> None:
        p = self.param
        learnable = self.train_module.learnable
        self._params = [entry.param for entry in learnable]
        self._lr_mults = [np.float32(entry.lr_mult) for entry in learnable]
        self._decay_groups = self._decay_groups_of(p)
        self._rule = rule_class(p, self._params)
        self._rates_for: float | None = None
        self._rates: list[float] = []
        self._param_seen = p.SerializeToString()

    def _decay_groups_of(self, p) -> list[tuple[float, list[int]]]:
        """Params grouped by their local decay (weight_decay * decay_mult)."""
        groups: dict[float, list[int]] = {}
        for i, entry in enumerate(self.train_module.learnable):
            decay = f32(np.float32(p.weight_decay) * np.float32(entry.decay_mult))
            if decay:
                groups.setdefault(decay, []).append(i)
        return list(groups.items())

    # -- pycaffe view -----------------------------------------------------------------
    @property
    def net(self) -> Net:
        """The train net as a pycaffe Net (blobs show the last iteration's values)."""
        return self._views[0]

    @property
    def test_nets(self) -> list[Net]:
        return self._views[1:]

    @property
    def lr(self) -> float:
        """The learning rate the next update would use."""
        self._follow_param()
        return self._policy(self.iter, self.current_step)[0]

    def _module(self, index: int) -> NetModule:
        return self.train_module if index == 0 else self.test_modules[index - 1]

    def add_callback(self, on_start: Callable[[], None],
                     on_gradients_ready: Callable[[], None]) -> None:
        """pycaffe's add_callback: called before each iteration and before each update."""
        self._callbacks.append((on_start, on_gradients_ready))

    def add_hook(self, event: str, fn: Callable) -> None:
        """Extensions (protonet.solver.tensorboard, .ema): "record" fn(record) gets each
        display/test record the JSON log gets, "update" fn() runs after each update,
        "snapshot" fn(model_path) after each snapshot is written."""
        self._hooks[event].append(fn)

    # -- forward passes -----------------------------------------------------------------
    def _forward(self, index: int):
        """One forward pass of net `index` (0: train); its pycaffe view keeps the blobs
        (and supplies the input blobs), as Caffe's nets keep theirs."""
        module, view = self._module(index), self._views[index]
        values, loss = module(view.input_tensors())
        view.adopt(values)
        return values, loss

    def _forward_backward(self, debug: bool):
        with autocast(self.precision, self.device):
            values, loss = self._forward(0)
        if debug:
            forward_debug(self.train_module, values)
        if loss is None:
            return values, torch.zeros((), device=self.device)
        if self.nan_effect == STOP and not bool(torch.isfinite(loss.detach())):
            raise nonfinite_error(self.train_module, values, float(loss.detach()),
                                  self.source, self.iter)
        if loss.requires_grad:
            scaler = self.loss_scaler       # fp16: the diffs stay scaled until the update
            (loss if scaler is None else scaler.scale_loss(loss)).backward()
        if debug:
            backward_debug(self.train_module)
        return values, loss.detach().float()

    # -- the loop -----------------------------------------------------------------------
    def step(self, iters: int) -> None:
        """Run `iters` iterations (Caffe's Solver::Step)."""
        hostsync.push_pending()
        self._stepping = True
        try:
            self._step(iters)
        finally:
            self._stepping = False
            self._own_diffs()
            self._params_changed()

    def _params_changed(self) -> None:
        """Off the CPU: the params' host buffers that scripts read (solver.net.params)
        are stale after an update (see hostsync)."""
        for view in self._views:
            view._params_changed(data=True, diff=True)

    def _own_diffs(self) -> None:
        """Inside step() a param's diff may be the update rule's history buffer
        (each iteration releases it first); outside, scripts read the diffs and
        backward() adds to them, so each param gets its own copy again."""
        history = {id(h) for h in getattr(self._rule, "history", ())}
        for param in self._params:
            if param.grad is not None and id(param.grad) in history:
                param.grad = param.grad.clone()

    def _step(self, iters: int) -> None:
        self._start_iter, stop_iter = self.iter, self.iter + iters
        self._losses = []
        self._timer, self._iter_last = time.perf_counter(), self.iter
        p = self.param
        while self.iter < stop_iter:
            self._clear_diffs()
            if p.test_interval and self.iter % p.test_interval == 0 and (
                    self.iter > 0 or p.test_initialization):
                if self.rank == 0:
                    self.test_all()
                if self._sync is not None:
                    self.requested_early_exit = self._sync.agree(self.requested_early_exit)
                if self.requested_early_exit:
                    break
            for on_start, _ in self._callbacks:
                on_start()
            display = bool(p.display) and self.iter % p.display == 0
            values, loss = self._accumulate(display and p.debug_info)
            self._smooth(loss)
            if display:
                self._display(values)
            del values
            for _, on_gradients_ready in self._callbacks:
                on_gradients_ready()
            self.apply_update()
            for fn in self._hooks["update"]:
                fn()
            if self._bar is not None:
                self._bar.update()
            request = self._request()
            if (p.snapshot and self.iter % p.snapshot == 0) or request == SNAPSHOT:
                self.snapshot()
            if request == STOP:
                self.requested_early_exit = True
                break

    def _grads(self) -> list[torch.Tensor]:
        """Every learnable param's .grad (Caffe's diff), made where missing."""
        for param in self._params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        return [param.grad for param in self._params]

    def _clear_diffs(self) -> None:
        """Caffe zeroes every diff before the backward passes; releasing them instead
        lets the first backward store its gradient where it is made, rather than
        zero-filling the diff and adding to it (two passes over every param)."""
        for param in self._params:
            param.grad = None

    def _accumulate(self, debug: bool):
        """iter_size forward/backward passes; returns the last values and mean loss."""
        total = None
        for _ in range(self.param.iter_size):
            values, loss = self._forward_backward(debug)
            total = loss if total is None else total + loss
        return values, total / self.param.iter_size

    def _request(self) -> str:
        if self._sync is not None:          # rank 0's request, on every worker alike
            return self._sync.request()
        return self.action() if self.action is not None else NONE

    # -- the update ----------------------------------------------------------------------
    def _follow_param(self) -> None:
        """`self.param` is live, as pycaffe's solver.param: an edit (base_lr, lr_policy,
        momentum, weight_decay, ...) takes effect on the next update, as in Caffe,
        where every update reads the SolverParameter anew."""
        current = self.param.SerializeToString()
        if current == self._param_seen:
            return
        with _located(self.source):
            self._rule.check(self.param)
            self._policy = make_policy(self.param)
        self._rule.param = self.param
        self._decay_groups = self._decay_groups_of(self.param)
        self._rates_for = None
        self._param_seen = current

    def share_weights(self, net) -> None:
        """Make `net` use the train net's params (pycaffe's Solver.share_weights)."""
        net.share_with(self.net)

    def apply_update(self) -> None:
        """Caffe's SGDSolver::ApplyUpdate, then count the iteration. Off the CPU,
        param arrays a script read or wrote since the last pass show the update
        (Caffe's Blob::Update runs on the host memory when the head is there)."""
        held = hostsync.held(self._params, diff=False) + hostsync.held(self._params, diff=True)
        hostsync.push_pending()        # diffs and weights a script wrote (on a GPU)
        self._follow_param()
        rate, self.current_step = self._policy(self.iter, self.current_step)
        display = bool(self.param.display) and self.iter % self.param.display == 0
        grads = self._grads()
        with torch.no_grad():
            finite = self._unscale(grads)   # fp16: before the display's histograms see them
        if display:
            log.info("Iteration %d, lr = %g", self.iter, rate)
            self._emit_display(rate)
        if grads and finite:
            with torch.no_grad():
                self._update(grads, rate, display and self.param.debug_info)
            if not getattr(self, "_stepping", False):
                self._own_diffs()
        self.iter += 1
        if not getattr(self, "_stepping", False):
            self._params_changed()
        for copy in held:
            copy.refresh()

    def _unscale(self, grads: list[torch.Tensor]) -> bool:
        """fp16: divide the diffs by the loss scale; False when they are not finite
        (the update is skipped, the scale backs off). Data-parallel workers check the
        averaged diffs, the same on every worker, so all of them skip together."""
        scaler = self.loss_scaler
        if scaler is None:
            return True
        scale = scaler.scale
        if scaler.unscale(grads):
            return True
        if self.rank == 0:
            log.warning("fp16 gradients overflowed at loss scale %g: skipped the update of "
                        "iteration %d; loss scale now %g", scale, self.iter, scaler.scale)
        return False

    def _update(self, grads: list[torch.Tensor], rate: float, debug: bool) -> None:
        """Clip, normalize, regularize, apply the rule, then data -= diff."""
        self._clip(grads)
        if self.param.iter_size > 1:
            torch._foreach_mul_(grads, f32(np.float32(1) / np.float32(self.param.iter_size)))
        self._regularize(grads)
        steps = self._rule.apply(grads, self._local_rates(rate), self.iter)
        if steps is None:
            steps = grads
        else:           # the step is the rule's own buffer (SGD's history): it is the diff
            for param, step in zip(self._params, steps):
                param.grad = step
        if debug:
            update_debug(self.train_module, steps)
        torch._foreach_sub_(self._params, steps)

    def _clip(self, grads: list[torch.Tensor]) -> None:
        clip = self.param.clip_gradients
        if clip < 0:
            return
        norm = float(torch.stack(torch._foreach_norm(grads)).square().sum().sqrt())
        if norm > clip:
            scale = f32(np.float32(clip) / np.float32(norm))
            log.info("Gradient clipping: scaling down gradients (L2 norm %g > %g) by scale "
                     "factor %g", norm, clip, scale)
            torch._foreach_mul_(grads, scale)

    def _regularize(self, grads: list[torch.Tensor]) -> None:
        """diff += local_decay * data (L2) or * sign(data) (L1), one fused op per decay."""
        l1 = self.param.regularization_type == "L1"
        for decay, members in self._decay_groups:
            params = [self._params[i] for i in members]
            if l1:
                params = torch._foreach_sign(params)
            torch._foreach_add_([grads[i] for i in members], params, alpha=decay)

    def _local_rates(self, rate: float) -> list[float]:
        if rate != self._rates_for:
            self._rates_for = rate
            self._rates = [f32(np.float32(rate) * m) for m in self._lr_mults]
        return self._rates

    # -- solving ----------------------------------------------------------------------------
    def solve(self, resume_file: str | None = None) -> None:
        """Caffe's Solver::Solve: (restore,) step to max_iter, snapshot, final display/test."""
        log.info("Solving %s", self.train_module.name)
        log.info("Learning Rate Policy: %s", self.param.lr_policy)
        self.requested_early_exit = False
        if resume_file:
            log.info("Restoring previous solver status from %s", resume_file)
            self.restore(resume_file)
        try:
            with progress_bar(self):
                self.step(self.param.max_iter - self.iter)
            self._finish()
        finally:
            if self._json is not None:
                self._json.close()

    def _finish(self) -> None:
        if self.rank != 0:          # Caffe's other workers only Step; rank 0 finishes
            return
        p = self.param
        if p.snapshot_after_train and (not p.snapshot or self.iter % p.snapshot != 0):
            self.snapshot()
        if self.requested_early_exit:
            log.info("Optimization stopped early.")
            return
        if p.display and self.iter % p.display == 0:
            with torch.no_grad(), autocast(self.precision, self.device):
                _, loss = self._forward(0)
            self._smooth(loss if loss is not None else torch.zeros((), device=self.device))
            log.info("Iteration %d, loss = %g", self.iter, self.smoothed_loss)
        if p.test_interval and self.iter % p.test_interval == 0:
            self.test_all()
        log.info("Optimization Done.")

    # -- snapshots --------------------------------------------------------------------------
    def snapshot(self) -> str:
        """Write the model and the solver state for the current iteration; returns the
        solver state's path. Only rank 0 of data-parallel workers writes (the others,
        holding the same params, return "")."""
        if self.rank != 0:
            return ""
        p = self.param
        if not p.snapshot_prefix:
            raise SolverError("cannot snapshot: snapshot_prefix is not set")
        hdf5 = p.snapshot_format == SP.HDF5
        kind = "HDF5" if hdf5 else "binary proto"
        model = snapshot_filename(p.snapshot_prefix, self.iter,
                                  ".caffemodel.h5" if hdf5 else ".caffemodel")
        log.info("Snapshotting to %s file %s", kind, model)
        hostsync.push_pending()
        save_caffemodel(self.train_module, model, write_diff=p.snapshot_diff)
        state_path = snapshot_filename(p.snapshot_prefix, self.iter,
                                       ".solverstate.h5" if hdf5 else ".solverstate")
        log.info("Snapshotting solver state to %s file %s", kind, state_path)
        history = [h.detach().cpu().numpy() for h in self._rule.history]
        write_state(state_path, SolverStateData(self.iter, model, self.current_step, history))
        for fn in self._hooks["snapshot"]:
            fn(model)
        return state_path

    def restore(self, state_file: str) -> None:
        """Resume from a .solverstate or .solverstate.h5 (Caffe's or ours)."""
        state_file = os.fspath(state_file)
        state = read_state(state_file)
        if state.iter < 0 or state.current_step < 0:
            raise SolverError(f"{state_file}: iter {state.iter} and current_step "
                              f"{state.current_step} must not be negative")
        check_history(self._rule.history, state.history, state_file)  # before any change
        if state.learned_net:
            model = resolve_learned_net(state_file, state.learned_net)
            hostsync.push_pending()
            copy_weights(self.train_module.layers, model)
            self._params_changed()
        log.info("%s: restoring history", type(self).__name__)
        load_history(self._rule.history, state.history, state_file)
        self.iter = state.iter
        self.current_step = state.current_step
        self._restored = True


# -- pycaffe's solver classes --------------------------------------------------------------
class SGDSolver(Solver):
    rule_class = RULES["SGD"]


class NesterovSolver(SGDSolver):
    rule_class = RULES["Nesterov"]


class AdaGradSolver(SGDSolver):
    rule_class = RULES["AdaGrad"]


class RMSPropSolver(SGDSolver):
    rule_class = RULES["RMSProp"]


class AdaDeltaSolver(SGDSolver):
    rule_class = RULES["AdaDelta"]


class AdamSolver(SGDSolver):
    rule_class = RULES["Adam"]


SOLVERS: dict[str, type[Solver]] = {
    "SGD": SGDSolver, "Nesterov": NesterovSolver, "AdaGrad": AdaGradSolver,
    "RMSProp": RMSPropSolver, "AdaDelta": AdaDeltaSolver, "Adam": AdamSolver,
}


def get_solver(param, device=None, **options) -> Solver:
    """The solver class its `type` names (Caffe's SolverRegistry), built from a
    prototxt path or a SolverParameter; `options` are Solver's keywords (e.g.
    `precision="bf16"` for mixed-precision training)."""
    options.setdefault("source", _source_name(param))
    param = _read_solver_param(param)
    with _located(options["source"]):
        Solver._rule_for(param.type)
    return SOLVERS[param.type](param, device, **options)
