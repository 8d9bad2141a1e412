"""Hyperparameter sweeps over solver fields: `protonet sweep`.

A sweep is a list of trials. Each trial is the solver with some scalar fields changed,
written to `OUT/trial_K/solver.prototxt` (its snapshot_prefix moved into that folder),
and trained by its own `python -m protonet train` process, whose log goes to
`OUT/trial_K/train.log` and JSON-lines log to `OUT/trial_K/train.log.jsonl`.

- `--grid base_lr=0.01,0.001 --grid momentum=0.9,0.95` gives the Cartesian product of
  the values, in order (the last field varying fastest).
- `--random weight_decay=1e-5:1e-3` draws a value per trial, uniformly in [low, high]
  (integers for integer fields); `--log-uniform`, or `:log` after the range
  (`weight_decay=1e-5:1e-3:log`), draws uniformly in log space. Drawn floats are
  rounded to 4 significant digits. `--seed` fixes the draws.
- `--trials N` runs N trials: the grid points in order, cycling when N is larger, each
  with its own random draws. Without it a sweep runs each grid point once (and a
  sweep with only random fields needs --trials).

A trial's score is its best test score over the run, read from its JSON log: output
`--metric` (default: `accuracy`, else the first test output whose name has `acc`,
else the first with `loss`) of test net `--test-net` (default 0), maximized, or
minimized for a name with `loss` in it (`--goal` overrides). `OUT/results.json` keeps
every trial's fields, score, iteration and status, and `OUT/best.solver.prototxt` is
the original solver (snapshot_prefix and all) with the best trial's fields.

Relative paths inside the solver (net, data sources) are read from the current folder,
as Caffe does, so run the sweep from where `protonet train` would be run.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from google.protobuf.descriptor import FieldDescriptor

from .errors import ProtonetError, closest
from .io.atomic import atomic_write
from .io.text import write_text
from .io.upgrade import read_solver
from .proto import caffe_pb2

log = logging.getLogger("protonet")

SP = caffe_pb2.SolverParameter
# Fields a sweep does not vary: which nets, where files go, which test nets there are.
FIXED = {"net", "train_net", "snapshot_prefix", "net_param", "train_net_param"}
FLOATS = (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE)
INTS = (FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_INT64,
        FieldDescriptor.CPPTYPE_UINT32, FieldDescriptor.CPPTYPE_UINT64)


# -- what varies -------------------------------------------------------------------------
def solver_field(name: str) -> FieldDescriptor:
    """The SolverParameter scalar field `name`, or an error naming close ones."""
    fields = SP.DESCRIPTOR.fields_by_name
    f = fields.get(name)
    if f is None:
        raise ProtonetError(f"'{name}' is not a solver field{closest(name, fields)}")
    if name in FIXED or f.message_type is not None or f.is_repeated:
        raise ProtonetError(f"solver field '{name}' cannot be swept: a sweep varies "
                            "single-valued fields such as base_lr, momentum, weight_decay, "
                            "lr_policy, gamma, stepsize")
    return f


def convert(f: FieldDescriptor, text: str):
    """A value for field `f` from its command-line text."""
    text = text.strip()
    try:
        if f.cpp_type in FLOATS:
            return float(text)
        if f.cpp_type in INTS:
            value = float(text)
            if value != int(value):
                raise ValueError
            return int(value)
        if f.cpp_type == FieldDescriptor.CPPTYPE_BOOL:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if f.cpp_type == FieldDescriptor.CPPTYPE_ENUM:
            names = [v.name for v in f.enum_type.values]
            if text not in names:
                raise ProtonetError(f"{f.name}: '{text}' is not one of {', '.join(names)}")
            return text
        return text
    except ValueError:
        kind = "a number" if f.cpp_type in FLOATS else "an integer" \
            if f.cpp_type in INTS else "true or false"
        raise ProtonetError(f"{f.name}: '{text}' is not {kind}") from None


def _split_spec(spec: str, flag: str) -> tuple[FieldDescriptor, str]:
    name, sep, values = spec.partition("=")
    if not sep or not name.strip() or not values.strip():
        raise ProtonetError(f"{flag} takes FIELD=VALUES, e.g. {flag} base_lr=0.01,0.001; "
                            f"got '{spec}'")
    return solver_field(name.strip()), values


def parse_grid(specs: Sequence[str]) -> list[tuple[str, list]]:
    """`base_lr=0.01,0.001` -> [("base_lr", [0.01, 0.001])], for each spec."""
    grid = []
    for spec in specs:
        f, values = _split_spec(spec, "--grid")
        if any(name == f.name for name, _ in grid):
            raise ProtonetError(f"--grid {f.name} is given twice")
        grid.append((f.name, [convert(f, v) for v in values.split(",") if v.strip()]))
    return grid


@dataclass
class RandomField:
    """A field drawn per trial from [low, high], uniformly or in log space."""
    name: str
    low: float
    high: float
    log: bool
    integer: bool

    def draw(self, rng: np.random.Generator):
        if self.log:
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        if self.integer:
            return int(min(max(round(value), math.ceil(self.low)), math.floor(self.high)))
        # 4 significant digits: what the table shows is what the solver file gets
        return min(max(float(f"{value:.4g}"), self.low), self.high)


def parse_random(specs: Sequence[str], log_uniform: bool = False) -> list[RandomField]:
    """`weight_decay=1e-5:1e-3[:log|:uniform]` -> RandomField, for each spec."""
    fields = []
    for spec in specs:
        f, values = _split_spec(spec, "--random")
        parts = [p.strip() for p in values.split(":")]
        scale = "log" if log_uniform else "uniform"
        if len(parts) == 3 and parts[2] in ("log", "uniform"):
            scale = parts.pop()
        if len(parts) != 2 or not (f.cpp_type in FLOATS or f.cpp_type in INTS):
            raise ProtonetError(f"--random takes a numeric FIELD=LOW:HIGH[:log], e.g. "
                                f"weight_decay=1e-5:1e-3; got '{spec}'")
        low, high = (float(convert(f, p)) for p in parts)
        if not low <= high:
            raise ProtonetError(f"--random {f.name}: LOW {low:g} is above HIGH {high:g}")
        if scale == "log" and low <= 0:
            raise ProtonetError(f"--random {f.name}: a log-uniform range must be positive, "
                                f"got {low:g}:{high:g}")
        if any(r.name == f.name for r in fields):
            raise ProtonetError(f"--random {f.name} is given twice")
        fields.append(RandomField(f.name, low, high, scale == "log", f.cpp_type in INTS))
    return fields


def plan(grid: list[tuple[str, list]], randoms: list[RandomField], trials: int | None,
         seed: int = 0) -> list[dict]:
    """Each trial's field values: grid points in order (cycled), plus random draws."""
    both = {name for name, _ in grid} & {r.name for r in randoms}
    if both:
        raise ProtonetError(f"{', '.join(sorted(both))}: both --grid and --random")
    points = [dict(zip([n for n, _ in grid], values))
              for values in itertools.product(*[v for _, v in grid])]
    if trials is None:
        if randoms and not grid:
            raise ProtonetError("--random needs --trials N (how many draws)")
        trials = len(points)
    if trials < 1:
        raise ProtonetError(f"--trials must be at least 1, got {trials}")
    rng = np.random.default_rng(seed)
    chosen = []
    for k in range(trials):
        values = dict(points[k % len(points)])
        for r in randoms:
            values[r.name] = r.draw(rng)
        chosen.append(values)
    return chosen


# -- files ------------------------------------------------------------------------------------
def with_fields(base: caffe_pb2.SolverParameter, values: dict) -> caffe_pb2.SolverParameter:
    param = caffe_pb2.SolverParameter()
    param.CopyFrom(base)
    for name, value in values.items():
        f = solver_field(name)
        if f.cpp_type == FieldDescriptor.CPPTYPE_ENUM:
            value = f.enum_type.values_by_name[value].number
        setattr(param, name, value)
    return param


def write_trial(base: caffe_pb2.SolverParameter, values: dict, folder: str) -> str:
    """The trial's solver, with its snapshots inside `folder`; returns its path."""
    os.makedirs(folder, exist_ok=True)
    param = with_fields(base, values)
    stem = os.path.basename(base.snapshot_prefix) if base.snapshot_prefix else "snapshot"
    param.snapshot_prefix = os.path.join(folder, stem or "snapshot")
    path = os.path.join(folder, "solver.prototxt")
    write_text(path, param)
    return path


# -- scores ---------------------------------------------------------------------------------
def read_records(path: str) -> list[dict]:
    """The JSON-lines log's records (a torn last line, from a killed run, is skipped)."""
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
    except FileNotFoundError:
        pass
    return records


def _value(outputs: dict, metric: str):
    name, _, index = metric.partition("#")
    value = outputs.get(name)
    if isinstance(value, list):
        if not index:
            return None
        k = int(index)
        return value[k] if k < len(value) else None
    return value if not index else None


def default_metric(names: Sequence[str]) -> str:
    """accuracy, else the first name with 'acc', else the first with 'loss'."""
    if "accuracy" in names:
        return "accuracy"
    for key in ("acc", "loss"):
        for name in names:
            if key in name.lower():
                return name
    raise ProtonetError(f"cannot tell which test output to score by (outputs: "
                        f"{', '.join(names) or 'none'}); give --metric NAME")


def goal_for(metric: str, goal: str | None) -> str:
    if goal is not None:
        return goal
    return "min" if "loss" in metric.lower() else "max"


def best_score(records: Sequence[dict], metric: str, goal: str, net: int = 0,
               event: str = "test") -> tuple[float, int] | None:
    """(best score, its iteration) over the test records, or None when there are none."""
    best = None
    for r in records:
        if r.get("event") != event or int(r.get("net", 0)) != net:
            continue
        value = _value(r.get("outputs", {}), metric)
        if value is None or not math.isfinite(value):
            continue
        better = best is None or (value > best[0] if goal == "max" else value < best[0])
        if better:
            best = (float(value), int(r.get("iter", 0)))
    return best


# -- running ----------------------------------------------------------------------------------
@dataclass
class Trial:
    index: int
    values: dict
    folder: str
    solver: str
    status: str = "pending"          # pending, running, ok, failed, no test
    returncode: int | None = None
    seconds: float = 0.0
    score: float | None = None
    iteration: int | None = None
    error: str = ""
    gpu: str | None = None
    _process: subprocess.Popen | None = field(default=None, repr=False)
    _started: float = field(default=0.0, repr=False)

    @property
    def log_path(self) -> str:
        return os.path.join(self.folder, "train.log")

    @property
    def json_path(self) -> str:
        return os.path.join(self.folder, "train.log.jsonl")


@dataclass
class Options:
    solver: str
    grid: list = field(default_factory=list)
    random: list = field(default_factory=list)
    log_uniform: bool = False
    trials: int | None = None
    parallel: int = 1
    out: str = "sweep"
    seed: int = 0
    metric: str | None = None
    goal: str | None = None
    test_net: int = 0
    weights: str | None = None
    gpus: list = field(default_factory=list)
    train_args: list = field(default_factory=list)


def train_command(trial: Trial, options: Options) -> list[str]:
    command = [sys.executable, "-m", "protonet", "train", "--solver", trial.solver,
               "--log-json", trial.json_path]
    if options.weights:
        command += ["--weights", options.weights]
    if trial.gpu is not None:
        command += ["--gpu", trial.gpu]
    return command + list(options.train_args)


def _child_env(parallel: int) -> dict:
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    if parallel > 1 and "OMP_NUM_THREADS" not in env:   # share the cores, not oversubscribe
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    return env


def _start(trial: Trial, options: Options, env: dict) -> None:
    command = train_command(trial, options)
    log.info("Trial %d: %s", trial.index, _describe(trial.values))
    with open(trial.log_path, "w", encoding="utf-8") as out:
        out.write("$ " + shlex.join(command) + "\n")
        out.flush()
        trial._process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=env)
    trial._started = time.monotonic()
    trial.status = "running"


def _finish(trial: Trial, returncode: int) -> None:
    trial.returncode = returncode
    trial.seconds = time.monotonic() - trial._started
    trial._process = None
    trial.status = "ok" if returncode == 0 else "failed"
    if returncode != 0:
        trial.error = _last_error(trial.log_path)
        log.warning("Trial %d failed (exit %d): %s", trial.index, returncode, trial.error)
    else:
        log.info("Trial %d done in %.1fs", trial.index, trial.seconds)


def _last_error(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    for line in reversed(lines):
        if "error" in line.lower():
            return line
    return lines[-1] if lines else ""


def run_trials(trials: list[Trial], options: Options) -> None:
    """Run the trials, `options.parallel` at a time; GPUs (if any) by slot."""
    env = _child_env(options.parallel)
    pending = list(trials)
    slots: list[Trial | None] = [None] * max(1, options.parallel)
    try:
        while pending or any(slots):
            for s, trial in enumerate(slots):
                if trial is not None:
                    code = trial._process.poll()
                    if code is None:
                        continue
                    _finish(trial, code)
                    slots[s] = None
                if pending:
                    nxt = pending.pop(0)
                    if options.gpus:
                        nxt.gpu = options.gpus[s % len(options.gpus)]
                    _start(nxt, options, env)
                    slots[s] = nxt
            if any(slots):
                time.sleep(0.05)
    except BaseException:
        for trial in slots:
            if trial is not None and trial._process is not None:
                trial._process.terminate()
                try:
                    trial._process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    trial._process.kill()
                    trial._process.wait()
                trial.status = "stopped"
        raise


@dataclass
class SweepResult:
    trials: list[Trial]
    metric: str | None
    goal: str
    best: Trial | None
    fields: list[str]
    best_solver: str | None


def sweep(options: Options) -> SweepResult:
    """Plan, write, run and score the trials; write results.json and best.solver.prototxt."""
    base = read_solver(options.solver)
    grid = parse_grid(options.grid)
    randoms = parse_random(options.random, options.log_uniform)
    if options.parallel < 1:
        raise ProtonetError(f"--parallel must be at least 1, got {options.parallel}")
    values = plan(grid, randoms, options.trials, options.seed)
    fields = [n for n, _ in grid] + [r.name for r in randoms]
    os.makedirs(options.out, exist_ok=True)
    trials = []
    for k, v in enumerate(values):
        folder = os.path.join(options.out, f"trial_{k}")
        trials.append(Trial(k, v, folder, write_trial(base, v, folder)))
    log.info("Sweep of %d trial(s), %d at a time, in %s", len(trials), options.parallel,
             options.out)
    run_trials(trials, options)
    metric, goal, best = score_trials(trials, options)
    best_solver = None
    if best is not None:
        best_solver = os.path.join(options.out, "best.solver.prototxt")
        write_text(best_solver, with_fields(base, best.values))
    result = SweepResult(trials, metric, goal, best, fields, best_solver)
    atomic_write(os.path.join(options.out, "results.json"), json.dumps(_summary(result),
                                                                          indent=2) + "\n")
    return result


def score_trials(trials: list[Trial], options: Options):
    """The metric, the goal and the best trial, with each trial's best score filled in."""
    logs = {t.index: read_records(t.json_path) for t in trials}
    metric = options.metric
    if metric is None:
        names: list[str] = []
        for t in trials:
            for r in logs[t.index]:
                if r.get("event") == "test" and int(r.get("net", 0)) == options.test_net:
                    names += [n for n in r.get("outputs", {}) if n not in names]
        if not names:
            return None, goal_for("", options.goal), None
        metric = default_metric(names)
    goal = goal_for(metric, options.goal)
    best = None
    for t in trials:
        found = best_score(logs[t.index], metric, goal, options.test_net)
        if found is None:
            if t.status == "ok":
                t.status = "no test"
            continue
        t.score, t.iteration = found
        if t.status != "ok":
            continue          # scored, but a run that failed is not one to repeat
        if best is None or (t.score > best.score if goal == "max" else t.score < best.score):
            best = t
    return metric, goal, best


# -- reporting --------------------------------------------------------------------------------
def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _describe(values: dict) -> str:
    return ", ".join(f"{k} = {_format(v)}" for k, v in values.items()) or "(the solver as is)"


def table(result: SweepResult) -> str:
    """The trials as an aligned text table, the best marked with *."""
    metric = result.metric or "score"
    head = ["trial", *result.fields, f"{metric} ({result.goal})", "at iter", "status"]
    rows = [head]
    for t in result.trials:
        mark = "*" if t is result.best else ""
        rows.append([f"{t.index}{mark}", *[_format(t.values[f]) for f in result.fields],
                     _format(t.score) if t.score is not None else "-",
                     str(t.iteration) if t.iteration is not None else "-", t.status])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if result.best is not None:
        lines.append(f"best: trial {result.best.index} ({metric} = "
                     f"{_format(result.best.score)} at iteration {result.best.iteration}); "
                     f"solver: {result.best_solver}")
    else:
        lines.append("no trial has a test score: nothing to choose from")
    return "\n".join(lines)


def _summary(result: SweepResult) -> dict:
    def trial(t: Trial) -> dict:
        return {"index": t.index, "values": t.values, "folder": t.folder,
                "solver": t.solver, "status": t.status, "returncode": t.returncode,
                "seconds": round(t.seconds, 3), "score": t.score, "iteration": t.iteration,
                "error": t.error, "gpu": t.gpu}
    return {"metric": result.metric, "goal": result.goal, "fields": result.fields,
            "best": result.best.index if result.best is not None else None,
            "best_solver": result.best_solver, "trials": [trial(t) for t in result.trials]}
