"""`protonet sweep` (protonet.sweep): trial plans, field checks, scores from JSON logs,
and a few tiny trials in their own processes with the table and the winning solver."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from protonet import sweep
from protonet.cli import main as cli_main
from protonet.errors import ProtonetError
from protonet.io.upgrade import read_solver

from test_solver import work  # noqa: F401  (the tiny HDF5 net)

SOLVER = ('net: "net.prototxt"\nbase_lr: 0.1\nmomentum: 0.9\nlr_policy: "fixed"\n'
          'max_iter: 6\ndisplay: 0\ntest_iter: 3\ntest_interval: 3\n'
          'snapshot_prefix: "snap/tiny"\nrandom_seed: 1\n')


def test_grid_is_the_product_in_order_and_cycles():
    grid = sweep.parse_grid(["base_lr=0.1,0.01", "lr_policy=fixed,inv", "max_iter=10"])
    assert grid == [("base_lr", [0.1, 0.01]), ("lr_policy", ["fixed", "inv"]),
                    ("max_iter", [10])]
    plan = sweep.plan(grid, [], None)
    assert [(t["base_lr"], t["lr_policy"]) for t in plan] == [
        (0.1, "fixed"), (0.1, "inv"), (0.01, "fixed"), (0.01, "inv")]
    assert [t["base_lr"] for t in sweep.plan(grid, [], 6)] == [0.1, 0.1, 0.01, 0.01, 0.1, 0.1]


def test_random_draws_stay_in_range_and_are_seeded():
    fields = sweep.parse_random(["weight_decay=1e-5:1e-3", "stepsize=10:20:uniform"],
                                log_uniform=True)
    assert [(f.log, f.integer) for f in fields] == [(True, False), (False, True)]
    plan = sweep.plan([], fields, 200, seed=3)
    decays = np.array([t["weight_decay"] for t in plan])
    steps = [t["stepsize"] for t in plan]
    assert decays.min() >= 1e-5 and decays.max() <= 1e-3
    assert all(isinstance(s, int) and 10 <= s <= 20 for s in steps)
    assert set(steps) == set(range(10, 21))
    # log-uniform: about half the draws below the geometric middle, 1e-4
    assert 0.35 < np.mean(decays < 1e-4) < 0.65
    assert all(float(f"{d:.4g}") == d for d in decays)
    assert sweep.plan([], fields, 5, seed=3) == plan[:5]
    linear = sweep.plan([], sweep.parse_random(["momentum=0.5:0.9"]), 200, seed=1)
    assert 0.35 < np.mean([t["momentum"] < 0.7 for t in linear]) < 0.65


@pytest.mark.parametrize("call, message", [
    (lambda: sweep.parse_grid(["base_rl=0.1"]), "not a solver field (did you mean 'base_lr'"),
    (lambda: sweep.parse_grid(["net=a.prototxt"]), "cannot be swept"),
    (lambda: sweep.parse_grid(["stepvalue=1,2"]), "cannot be swept"),
    (lambda: sweep.parse_grid(["base_lr"]), "takes FIELD=VALUES"),
    (lambda: sweep.parse_grid(["max_iter=1.5"]), "max_iter: '1.5' is not an integer"),
    (lambda: sweep.parse_grid(["solver_mode=TPU"]), "'TPU' is not one of CPU, GPU"),
    (lambda: sweep.parse_random(["base_lr=0:1"], log_uniform=True), "must be positive"),
    (lambda: sweep.parse_random(["base_lr=1:0.1"]), "is above HIGH"),
    (lambda: sweep.parse_random(["lr_policy=a:b"]), "numeric FIELD=LOW:HIGH"),
    (lambda: sweep.plan([], sweep.parse_random(["base_lr=0.1:1"]), None), "needs --trials"),
    (lambda: sweep.plan(sweep.parse_grid(["base_lr=1"]), sweep.parse_random(["base_lr=0:1"]),
                        2), "both --grid and --random"),
])
def test_bad_specs_are_explained(call, message):
    with pytest.raises(ProtonetError, match=message.replace("(", r"\(").replace("[", r"\[")):
        call()


def test_best_score_from_records():
    records = [{"event": "train", "iter": 0, "outputs": {"accuracy": 9.0}},
               {"event": "test", "iter": 0, "net": 0, "outputs": {"accuracy": 0.5, "loss": 2}},
               {"event": "test", "iter": 5, "net": 0, "outputs": {"accuracy": 0.8, "loss": 1}},
               {"event": "test", "iter": 5, "net": 1, "outputs": {"accuracy": 0.9}},
               {"event": "test", "iter": 9, "net": 0, "outputs": {"accuracy": 0.7, "loss": 0.5,
                                                                   "scores": [1.0, 3.0]}}]
    assert sweep.best_score(records, "accuracy", "max") == (0.8, 5)
    assert sweep.best_score(records, "loss", "min") == (0.5, 9)
    assert sweep.best_score(records, "accuracy", "max", net=1) == (0.9, 5)
    assert sweep.best_score(records, "scores#1", "max") == (3.0, 9)
    assert sweep.best_score(records, "missing", "max") is None
    assert sweep.default_metric(["loss", "accuracy"]) == "accuracy"
    assert sweep.default_metric(["loss", "top1_acc"]) == "top1_acc"
    assert sweep.default_metric(["mse_loss"]) == "mse_loss"
    assert sweep.goal_for("mse_loss", None) == "min" and sweep.goal_for("acc", None) == "max"
    with pytest.raises(ProtonetError, match="give --metric"):
        sweep.default_metric(["mse"])


def test_sweep_command_runs_trials_and_writes_the_best_solver(work, capsys):
    Path("solver.prototxt").write_text(SOLVER)
    code = cli_main(["-q", "sweep", "--solver", "solver.prototxt",
                     "--grid", "base_lr=0.5,0.0", "--random", "momentum=0.5:0.9",
                     "--trials", "3", "--parallel", "2", "--out", "runs"])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].split() == ["trial", "base_lr", "momentum", "acc", "(max)", "at", "iter",
                                "status"]
    assert len(lines) == 5 and lines[-1].startswith("best: trial ")
    results = json.loads(Path("runs/results.json").read_text())
    assert results["metric"] == "acc" and results["goal"] == "max"
    trials = results["trials"]
    assert [t["status"] for t in trials] == ["ok"] * 3
    assert [t["values"]["base_lr"] for t in trials] == [0.5, 0.0, 0.5]
    for t in trials:
        folder = Path(t["folder"])
        solver = read_solver(str(folder / "solver.prototxt"))
        assert solver.snapshot_prefix == str(folder / "tiny")
        assert solver.base_lr == pytest.approx(t["values"]["base_lr"])
        assert solver.momentum == pytest.approx(t["values"]["momentum"])
        assert (folder / "tiny_iter_6.caffemodel").is_file()
        records = [json.loads(x) for x in (folder / "train.log.jsonl").read_text().splitlines()]
        accs = [r["outputs"]["acc"] for r in records if r["event"] == "test"]
        assert t["score"] == pytest.approx(max(accs))
    best = trials[results["best"]]
    assert best["score"] == max(t["score"] for t in trials)
    assert best["index"] == min(t["index"] for t in trials if t["score"] == best["score"])
    written = read_solver("runs/best.solver.prototxt")
    assert written.base_lr == pytest.approx(best["values"]["base_lr"])
    assert written.momentum == pytest.approx(best["values"]["momentum"])
    assert written.snapshot_prefix == "snap/tiny"          # the original's


def test_a_failing_trial_is_reported_not_chosen(work, capsys):
    Path("solver.prototxt").write_text(SOLVER)
    code = cli_main(["-q", "sweep", "--solver", "solver.prototxt", "--grid",
                     "regularization_type=L2,L3", "--out", "runs", "--metric", "loss",
                     "--goal", "min"])
    out = capsys.readouterr().out
    assert code == 0, out
    results = json.loads(Path("runs/results.json").read_text())
    first, second = results["trials"]
    assert first["status"] == "ok" and second["status"] == "failed"
    assert "regularization_type" in second["error"] and results["best"] == 0
    assert "failed" in out.splitlines()[2]
