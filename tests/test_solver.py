"""The solver beyond the Caffe trajectories: policies, rules, loop, logs, snapshots, CLI.

Everything runs on a tiny HDF5-fed net in a temporary folder, so the whole file
takes a few seconds.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from protonet.cli import main as cli_main
from protonet.commands.train import SignalActions
from protonet.errors import ParseError, SolverError
from protonet.io.text import parse_text
from protonet.proto import caffe_pb2
from protonet.solver import (AdamSolver, NesterovSolver, SGDSolver, Solver, get_solver)
from protonet.solver.lr_policy import make_policy
from protonet.solver.snapshot import read_state
from protonet.solver.updates import RULES

REPO = Path(__file__).resolve().parents[1]
ROWS, FEATURES, CLASSES = 12, 5, 3

NET = """
name: "tiny"
layer { name: "data" type: "HDF5Data" top: "data" top: "label"
  hdf5_data_param { source: "train.txt" batch_size: 4 } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  param { lr_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 }
                        bias_filler { type: "constant" value: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc"
  include { phase: TEST } }
"""


def _solver_text(**fields) -> str:
    base = dict(net="net.prototxt", base_lr=0.1, momentum=0.9, lr_policy="fixed",
                max_iter=6, display=0, snapshot_prefix="snap/tiny", random_seed=1,
                snapshot_after_train=False)
    base.update(fields)
    lines = []
    for key, value in base.items():
        for v in (value if isinstance(value, list) else [value]):
            if isinstance(v, bool):
                v = str(v).lower()
            elif isinstance(v, str) and key not in ("snapshot_format", "solver_type",
                                                    "solver_mode"):
                v = json.dumps(v)
            lines.append(f"{key}: {v}")
    return "\n".join(lines)


def param(**fields) -> caffe_pb2.SolverParameter:
    return parse_text(_solver_text(**fields), caffe_pb2.SolverParameter())


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A folder with the tiny net, its data and a snapshot folder; the cwd."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    with h5py.File("data.h5", "w") as f:
        f["data"] = rng.normal(size=(ROWS, FEATURES)).astype(np.float32)
        f["label"] = (np.arange(ROWS) % CLASSES).astype(np.float32)
    Path("train.txt").write_text("data.h5\n")
    Path("net.prototxt").write_text(NET)
    Path("snap").mkdir()
    return tmp_path


def weights(solver: Solver) -> list[np.ndarray]:
    return [p.data.copy() for blobs in solver.net.params.values() for p in blobs]


def assert_same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


# -- learning rate policies ---------------------------------------------------------------
POLICY_CASES = {
    "fixed": (dict(), lambda it: 1.0),
    "step": (dict(gamma=0.5, stepsize=3), lambda it: 0.5 ** (it // 3)),
    "exp": (dict(gamma=0.9), lambda it: 0.9 ** it),
    "inv": (dict(gamma=0.1, power=0.75), lambda it: (1 + 0.1 * it) ** -0.75),
    "multistep": (dict(gamma=0.1, stepvalue=[2, 5]),
                  lambda it: 0.1 ** sum(it >= v for v in (2, 5))),
    "poly": (dict(power=2.0, max_iter=10), lambda it: (1 - it / 10) ** 2),
    "sigmoid": (dict(gamma=0.5, stepsize=4), lambda it: 1 / (1 + math.exp(-0.5 * (it - 4)))),
}


@pytest.mark.parametrize("policy", sorted(POLICY_CASES))
def test_lr_policy_formula(policy):
    fields, expected = POLICY_CASES[policy]
    p = param(lr_policy=policy, base_lr=1.0, **fields)
    rate, step = make_policy(p), 0
    for it in range(10):
        value, step = rate(it, step)
        assert value == pytest.approx(expected(it), rel=1e-6), (policy, it)


def test_step_policies_track_current_step():
    rate = make_policy(param(lr_policy="multistep", gamma=0.1, stepvalue=[2, 5]))
    steps, step = [], 0
    for it in range(7):
        _, step = rate(it, step)
        steps.append(step)
    assert steps == [0, 0, 1, 1, 1, 2, 2]
    assert make_policy(param(lr_policy="step", gamma=0.5, stepsize=3))(7, 0)[1] == 2


@pytest.mark.parametrize("fields, message", [
    (dict(lr_policy="stpe"), "unknown lr_policy 'stpe'.*did you mean 'step'"),
    (dict(lr_policy="step", gamma=0.5), "needs stepsize > 0"),
    (dict(lr_policy="exp", gamma=-1.0), "needs gamma >= 0"),
    (dict(lr_policy="sigmoid", gamma=1.0), "needs stepsize > 0"),
])
def test_bad_lr_policy(fields, message):
    with pytest.raises(SolverError, match=message):
        make_policy(param(**fields))


# -- update rules against numpy -----------------------------------------------------------
def _numpy_rule(kind: str, p, g, state, rate, it):
    """One step of each rule in float64 (the textbook forms Caffe implements)."""
    m, d = p.momentum, p.delta
    if kind == "SGD":
        state[0] = m * state[0] + rate * g
        return state[0]
    if kind == "Nesterov":
        old = state[0].copy()
        state[0] = m * state[0] + rate * g
        return (1 + m) * state[0] - m * old
    if kind == "AdaGrad":
        state[0] = state[0] + g * g
        return rate * g / (np.sqrt(state[0]) + d)
    if kind == "RMSProp":
        state[0] = p.rms_decay * state[0] + (1 - p.rms_decay) * g * g
        return rate * g / (np.sqrt(state[0]) + d)
    if kind == "AdaDelta":
        state[0] = m * state[0] + (1 - m) * g * g
        step = g * np.sqrt((state[1] + d) / (state[0] + d))
        state[1] = m * state[1] + (1 - m) * step * step
        return rate * step
    state[0] = m * state[0] + (1 - m) * g
    state[1] = p.momentum2 * state[1] + (1 - p.momentum2) * g * g
    t = it + 1
    correction = math.sqrt(1 - p.momentum2 ** t) / (1 - m ** t)
    return rate * correction * state[0] / (np.sqrt(state[1]) + d)


@pytest.mark.parametrize("kind", sorted(RULES))
def test_update_rule_matches_numpy(kind):
    momentum = 0.0 if kind in ("AdaGrad", "RMSProp") else 0.9
    p = param(type=kind, momentum=momentum, momentum2=0.999, delta=1e-6, rms_decay=0.9)
    rng = np.random.default_rng(1)
    shapes = [(3, 4), (4,)]
    params = [torch.zeros(s) for s in shapes]
    rule = RULES[kind](p, params)
    states = [[np.zeros(s), np.zeros(s)] for s in shapes]
    rates = [0.1, 0.2]
    for it in range(4):
        grads64 = [rng.normal(size=s) for s in shapes]
        grads = [torch.tensor(g, dtype=torch.float32) for g in grads64]
        steps = rule.apply(grads, rates, it) or grads     # the step: returned or in place
        for g, g64, st, r in zip(steps, grads64, states, rates):
            want = _numpy_rule(kind, p, g64.astype(np.float32).astype(np.float64), st, r, it)
            np.testing.assert_allclose(g.numpy(), want, rtol=2e-5, atol=1e-7)
    assert len(rule.history) == len(shapes) * RULES[kind].slots


@pytest.mark.parametrize("kind, fields, message", [
    ("AdaGrad", dict(momentum=0.9), "momentum cannot be used with AdaGrad"),
    ("RMSProp", dict(momentum=0.9), "momentum cannot be used with RMSProp"),
    ("RMSProp", dict(momentum=0.0, rms_decay=1.0), "rms_decay should lie in"),
])
def test_rule_sanity_checks(work, kind, fields, message):
    with pytest.raises(SolverError, match=message):
        get_solver(param(type=kind, **fields))


# -- construction -------------------------------------------------------------------------
@pytest.mark.parametrize("fields, message", [
    (dict(type="Adamm"), "unknown solver type 'Adamm'.*did you mean 'Adam'"),
    (dict(regularization_type="L3"), "unknown regularization_type 'L3'"),
    (dict(average_loss=0), "average_loss must be at least 1"),
    (dict(iter_size=0), "iter_size must be at least 1"),
    (dict(snapshot=2, snapshot_prefix="missing/dir/x"), "cannot write to snapshot prefix"),
    (dict(train_net="net.prototxt"), "exactly one of net, net_param, train_net"),
    (dict(test_iter=[1], test_interval=0), "test_interval must be positive"),
    (dict(test_net=["net.prototxt"]), "test_iter must be given once per test net"),
])
def test_bad_solver_parameters(work, fields, message):
    with pytest.raises(SolverError, match=message):
        get_solver(param(**fields))


def test_test_state_count_must_match_the_test_nets(work):
    p = param(test_iter=[1, 1], test_interval=1)
    p.test_state.add()
    with pytest.raises(SolverError, match="test_state must be unspecified or given once"):
        get_solver(p)


def test_missing_net_file_is_named(work):
    with pytest.raises(ParseError, match="nothere.prototxt"):
        get_solver(param(net="nothere.prototxt"))


def test_get_solver_picks_the_class_by_type(work):
    assert type(get_solver(param(type="Nesterov"))) is NesterovSolver
    Path("legacy.prototxt").write_text(_solver_text(solver_type="ADAM", momentum2=0.999))
    with pytest.warns(UserWarning, match="solver_type"):
        solver = get_solver("legacy.prototxt")
    assert type(solver) is AdamSolver and len(solver._rule.history) == 4
    assert solver.param.snapshot_prefix == "snap/tiny"
    assert type(SGDSolver(param(type="Adam"))._rule).__name__ == "SGD"


def test_snapshot_prefix_defaults_to_the_solver_path(work):
    text = _solver_text()
    Path("s.prototxt").write_text(text.replace('snapshot_prefix: "snap/tiny"\n', ""))
    assert get_solver("s.prototxt").param.snapshot_prefix == "s"


def test_test_nets_share_the_train_params(work):
    net = parse_text(NET, caffe_pb2.NetParameter())
    p = param(test_iter=[1, 2], test_interval=100)
    p.test_net_param.add().CopyFrom(net)
    solver = get_solver(p)
    assert len(solver.test_nets) == 2
    for test in solver.test_modules:
        for a, b in zip(test.layers[1].blobs, solver.train_module.layers[1].blobs):
            assert a is b
    solver.step(2)
    np.testing.assert_array_equal(solver.test_nets[1].params["ip"][0].data,
                                  solver.net.params["ip"][0].data)


def test_inline_train_net_and_states(work):
    net = parse_text(NET, caffe_pb2.NetParameter())
    extra = net.layer.add()
    extra.CopyFrom(parse_text('name: "only_deep" type: "ReLU" bottom: "ip" top: "r" '
                              'include { stage: "deep" min_level: 2 }',
                              caffe_pb2.LayerParameter()))
    p = param()
    p.ClearField("net")
    p.net_param.CopyFrom(net)
    p.test_iter.append(1)
    p.test_interval = 10
    p.train_state.stage.append("deep")
    p.train_state.level = 2
    p.test_state.add().stage.append("deep")
    solver = get_solver(p)
    assert "only_deep" in solver.train_module.layer_names
    assert "only_deep" not in solver.test_modules[0].layer_names      # level 0
    assert "acc" in solver.test_modules[0].layer_names
    assert "acc" not in solver.train_module.layer_names


def test_weights_field_loads_every_listed_file_in_order(work):
    first = get_solver(param())
    for value, name in ((0.5, "a.caffemodel"), (0.25, "b.caffemodel")):
        first.net.params["ip"][0].data[...] = value
        first.net.save(name)
    solver = get_solver(param(weights=["a.caffemodel, b.caffemodel"], test_iter=[1],
                              test_interval=5))
    assert (solver.net.params["ip"][0].data == 0.25).all()
    assert (solver.test_nets[0].params["ip"][0].data == 0.25).all()


def test_solver_mode_gpu_without_cuda_warns_and_uses_cpu(work, caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, "protonet"):
        solver = get_solver(param(solver_mode="GPU"))
    assert solver.device.type == "cpu"
    assert "CUDA is not available" in caplog.text


# -- the loop ----------------------------------------------------------------------------
def test_same_seed_gives_identical_weights(work):
    Path("net.prototxt").write_text(NET.replace("batch_size: 4", "batch_size: 4 shuffle: true"))
    runs = []
    for _ in range(2):
        solver = get_solver(param(random_seed=42))
        solver.step(5)
        runs.append(weights(solver))
    assert_same(*runs)


@pytest.mark.parametrize("fmt, kind", [("BINARYPROTO", "SGD"), ("HDF5", "Adam"),
                                       ("BINARYPROTO", "AdaDelta")])
def test_resume_from_own_snapshot_is_bit_identical(work, fmt, kind):
    fields = dict(type=kind, snapshot_format=fmt, lr_policy="step", gamma=0.5, stepsize=2,
                  momentum2=0.999, weight_decay=0.01)
    whole = get_solver(param(**fields))
    whole.step(6)
    first = get_solver(param(**fields))
    first.step(3)                              # 3 batches of 4 = one pass over 12 rows
    state = first.snapshot()
    assert state.endswith(".solverstate.h5" if fmt == "HDF5" else ".solverstate")
    resumed = get_solver(param(**fields, random_seed=99))
    resumed.restore(state)
    assert (resumed.iter, resumed.current_step) == (3, 1)
    resumed.step(3)
    assert_same(weights(whole), weights(resumed))


def test_hdf5_snapshot_has_caffes_layout(work):
    solver = get_solver(param(snapshot_format="HDF5", type="Adam", momentum2=0.999))
    solver.step(2)
    path = solver.snapshot()
    assert path == "snap/tiny_iter_2.solverstate.h5"
    with h5py.File(path, "r") as f:
        assert f["iter"][()].tolist() == [2] and f["current_step"][()].tolist() == [0]
        assert f["learned_net"][()] == b"snap/tiny_iter_2.caffemodel.h5"
        assert sorted(f["history"].keys()) == ["0", "1", "2", "3"]
        assert f["history/0"].shape == (3, FEATURES)
    with h5py.File("snap/tiny_iter_2.caffemodel.h5", "r") as f:
        np.testing.assert_array_equal(f["data/ip/0"][()], solver.net.params["ip"][0].data)
    state = read_state(path)
    np.testing.assert_array_equal(state.history[0], solver._rule.history[0].numpy())


def test_restore_rejects_a_state_for_another_solver(work):
    sgd = get_solver(param())
    sgd.step(1)
    state = sgd.snapshot()
    with pytest.raises(SolverError, match="2 history blobs, this solver needs 4"):
        get_solver(param(type="Adam", momentum2=0.999)).restore(state)


def test_snapshot_interval_and_after_train(work):
    solver = get_solver(param(snapshot=4, max_iter=6, snapshot_after_train=True))
    solver.solve()
    names = sorted(os.listdir("snap"))
    assert names == ["tiny_iter_4.caffemodel", "tiny_iter_4.solverstate",
                     "tiny_iter_6.caffemodel", "tiny_iter_6.solverstate"]


def test_snapshot_diff_writes_the_update(work):
    solver = get_solver(param(snapshot_diff=True))
    solver.step(1)
    solver.snapshot()
    from protonet.io.weights import blob_to_array, read_weights
    layer = next(l for l in read_weights("snap/tiny_iter_1.caffemodel").layer if l.name == "ip")
    np.testing.assert_array_equal(blob_to_array(layer.blobs[0], diff=True),
                                  solver.net.params["ip"][0].diff)


def test_iter_size_averages_gradients(work):
    one = get_solver(param(iter_size=1, momentum=0.0))
    Path("net2.prototxt").write_text(NET.replace("batch_size: 4", "batch_size: 2"))
    two = get_solver(param(net="net2.prototxt", iter_size=2, momentum=0.0))
    one.step(3)
    two.step(3)
    for a, b in zip(weights(one), weights(two)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_clip_gradients_bounds_the_global_norm(work, caplog):
    solver = get_solver(param(clip_gradients=1e-3, momentum=0.0, base_lr=1.0))
    with caplog.at_level(logging.INFO, "protonet"):
        solver.step(1)
    weight_step, bias_step = (p.diff for p in solver.net.params["ip"])   # lr_mult 1, 2
    norm = math.sqrt((weight_step ** 2).sum() + ((bias_step / 2) ** 2).sum())
    assert norm == pytest.approx(1e-3, rel=1e-4)
    assert "Gradient clipping: scaling down gradients (L2 norm" in caplog.text


def test_lr_mult_zero_params_stay_fixed(work):
    Path("net.prototxt").write_text(NET.replace("param { lr_mult: 1 }", "param { lr_mult: 0 }"))
    solver = get_solver(param(weight_decay=0.1))
    w = solver.net.params["ip"][0].data.copy()
    solver.step(3)
    np.testing.assert_array_equal(solver.net.params["ip"][0].data, w)


def test_callbacks_and_pycaffe_attributes(work):
    solver = get_solver(param(lr_policy="step", gamma=0.5, stepsize=2))
    calls = []
    solver.add_callback(lambda: calls.append(("start", solver.iter)),
                        lambda: calls.append(("grads", solver.iter)))
    solver.step(2)
    assert calls == [("start", 0), ("grads", 0), ("start", 1), ("grads", 1)]
    assert solver.iter == 2 and solver.lr == pytest.approx(0.05)
    assert solver.net.blobs["loss"].data.size == 1
    assert solver.net.params["ip"][0].data.shape == (3, FEATURES)


def test_net_without_learnable_params_still_steps(work):
    Path("plain.prototxt").write_text("""
    layer { name: "data" type: "HDF5Data" top: "data" top: "label"
            hdf5_data_param { source: "train.txt" batch_size: 4 } }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "data" bottom: "label" top: "loss" }
    """)
    solver = get_solver(param(net="plain.prototxt", display=1))
    solver.step(2)
    assert solver.iter == 2 and solver.snapshot().endswith("tiny_iter_2.solverstate")


def test_input_blobs_set_through_pycaffe_feed_training(work):
    Path("input.prototxt").write_text("""
    layer { name: "in" type: "Input" top: "data" top: "label"
            input_param { shape { dim: 4 dim: 5 } shape { dim: 4 } } }
    layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
            inner_product_param { num_output: 3 weight_filler { type: "gaussian" } } }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
    """)
    solver = get_solver(param(net="input.prototxt"))
    solver.net.blobs["data"].data[...] = 1.0
    solver.net.blobs["label"].data[...] = [0, 1, 2, 0]
    solver.step(1)
    ip = solver.net.blobs["ip"].data
    np.testing.assert_allclose(ip[0], ip[1])


# -- testing, logs and actions ------------------------------------------------------------
def test_test_scores_are_means_over_test_iter(work, caplog):
    solver = get_solver(param(test_iter=[3], test_interval=100, test_compute_loss=True))
    with caplog.at_level(logging.INFO, "protonet"):
        scores = solver.test(0)
    test_net = get_solver(param(test_iter=[3], test_interval=100)).test_modules[0]
    acc, loss = [], []
    with torch.no_grad():
        for _ in range(3):
            values, _ = test_net()
            acc.append(float(values[test_net.blob_index["acc"]]))
            loss.append(float(values[test_net.blob_index["loss"]]))
    assert scores["acc"] == pytest.approx(np.mean(acc), rel=1e-6)
    assert scores["loss"] == pytest.approx(np.mean(loss), rel=1e-6)
    assert "Test loss: " in caplog.text
    assert re.search(r"    Test net output #1: loss = [\d.]+ \(\* 1 = [\d.]+ loss\)", caplog.text)


LOG_PATTERNS = {
    "train": re.compile(r"Iteration (\d+) \(([\d.e+-]+) iter/s, ([\d.e+-]+)s/(\d+) iters\), "
                        r"loss = ([\d.e+-]+)"),
    "output": re.compile(r"    Train net output #(\d+): (\S+) = ([\d.e+-]+)"),
    "lr": re.compile(r"Iteration (\d+), lr = ([\d.e+-]+)"),
    "testing": re.compile(r"Iteration (\d+), Testing net \(#(\d+)\)"),
    "test": re.compile(r"    Test net output #(\d+): (\S+) = ([\d.e+-]+)"),
}


def test_log_lines_follow_caffe(work, caplog):
    solver = get_solver(param(display=2, max_iter=4, test_iter=[1], test_interval=2,
                              test_initialization=True, snapshot_after_train=True,
                              average_loss=2))
    with caplog.at_level(logging.INFO, "protonet"):
        solver.solve()
    lines = caplog.messages
    found = {k: [m.groups() for line in lines if (m := p.search(line))]
             for k, p in LOG_PATTERNS.items()}
    assert [g[0] for g in found["train"]] == ["0", "2"]
    assert [g[0] for g in found["lr"]] == ["0", "2"]
    assert [g[0] for g in found["testing"]] == ["0", "2", "4"]
    assert [g[1] for g in found["output"]] == ["loss", "loss"]
    assert {g[1] for g in found["test"]} == {"acc", "loss"}
    assert "Snapshotting to binary proto file snap/tiny_iter_4.caffemodel" in lines
    assert lines[-1] == "Optimization Done."
    assert any(line.startswith("Iteration 4, loss = ") for line in lines)
    assert any(line.startswith("Solving tiny") for line in lines)


def test_json_log_has_one_object_per_event(work):
    solver = get_solver(param(display=2, max_iter=4, test_iter=[1], test_interval=2),
                        log_json="snap/log.jsonl")
    solver.solve()
    records = [json.loads(line) for line in Path("snap/log.jsonl").read_text().splitlines()]
    assert [(r["event"], r["iter"]) for r in records] == [
        ("test", 0), ("train", 0), ("test", 2), ("train", 2), ("test", 4)]
    assert set(records[1]) >= {"loss", "lr", "iter_per_s", "outputs", "time"}
    assert set(records[0]["outputs"]) == {"acc", "loss"}


def test_progress_bar_shows_rate_and_eta(work, capsys):
    get_solver(param(max_iter=3, display=1), progress=True).solve()
    err = capsys.readouterr().err
    assert "train: 100%" in err and "3/3" in err and "it/s" in err


def test_debug_info_logs_layer_statistics(work, caplog):
    with caplog.at_level(logging.INFO, "protonet"):
        get_solver(param(display=1, debug_info=True)).step(1)
    text = caplog.text
    assert "[Forward] Layer ip, top blob ip data:" in text
    assert "[Backward] Layer ip, param blob 0 diff:" in text
    assert "[Update] Layer ip, param 0 data:" in text


def test_stop_action_snapshots_and_stops(work, caplog):
    requests = iter(["none", "none", "stop"])
    solver = get_solver(param(max_iter=10, snapshot_after_train=True),
                        action=lambda: next(requests, "none"))
    with caplog.at_level(logging.INFO, "protonet"):
        solver.solve()
    assert solver.iter == 3
    assert os.path.exists("snap/tiny_iter_3.solverstate")
    assert "Optimization stopped early." in caplog.messages


def test_snapshot_action_snapshots_and_goes_on(work):
    requests = iter(["snapshot"])
    solver = get_solver(param(max_iter=3), action=lambda: next(requests, "none"))
    solver.solve()
    assert solver.iter == 3
    assert sorted(os.listdir("snap")) == ["tiny_iter_1.caffemodel", "tiny_iter_1.solverstate"]


# -- atomic snapshots ---------------------------------------------------------------------
KILLED_WRITER = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
from protonet.io.upgrade import read_solver
from protonet.solver import get_solver
solver = get_solver(read_solver("solver.prototxt"))
solver.snapshot()
with open("first_done", "w"):
    pass
os.fsync = lambda fd: time.sleep(120)       # hang after the data is written
solver.net.params["ip"][0].data[...] = 7.0
solver.snapshot()
"""


def test_killed_snapshot_leaves_the_old_files_whole(work):
    Path("solver.prototxt").write_text(_solver_text())
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(REPO)],
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 60
        while not list(Path("snap").glob(".tiny_iter_0.caffemodel.*.tmp")):
            assert child.poll() is None and time.time() < deadline, "writer did not start"
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        child.kill()
        child.wait()
    assert Path("first_done").exists()
    from protonet.io.weights import read_weights
    layer = next(l for l in read_weights("snap/tiny_iter_0.caffemodel").layer
                 if l.name == "ip")
    assert 7.0 not in list(layer.blobs[0].data)
    assert read_state("snap/tiny_iter_0.solverstate").iter == 0
    assert sorted(p.name for p in Path("snap").iterdir() if not p.name.startswith(".")) == [
        "tiny_iter_0.caffemodel", "tiny_iter_0.solverstate"]


# -- command line ---------------------------------------------------------------------------
def _cli_messages(err: str) -> list[str]:
    """Log messages from the CLI's stderr, without the 'I1123 15:41:51.801 ' prefix."""
    return [line.split(" ", 2)[2] for line in err.splitlines()
            if re.match(r"[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ ", line)]


def test_cli_train_then_resume_then_test(work, capsys):
    Path("solver.prototxt").write_text(_solver_text(
        max_iter=4, snapshot=2, display=2, test_iter=[1], test_interval=4))
    assert cli_main(["train", "--solver", "solver.prototxt", "--log-json", "log.jsonl"]) == 0
    assert os.path.exists("snap/tiny_iter_4.caffemodel")
    assert [json.loads(x)["event"] for x in Path("log.jsonl").read_text().splitlines()] == [
        "test", "train", "train", "test"]
    assert cli_main(["train", "--solver", "solver.prototxt",
                     "--snapshot", "snap/tiny_iter_2.solverstate"]) == 0
    assert os.path.exists("snap/tiny.log.jsonl")
    capsys.readouterr()
    assert cli_main(["test", "--model", "net.prototxt", "--weights",
                     "snap/tiny_iter_4.caffemodel", "--iterations", "3"]) == 0
    messages = _cli_messages(capsys.readouterr().err)
    assert sum(m.startswith("Batch ") and ", acc = " in m for m in messages) == 3
    assert any(m.startswith("Loss: ") for m in messages)
    assert any(re.fullmatch(r"loss = [\d.]+ \(\* 1 = [\d.]+ loss\)", m) for m in messages)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
def test_signals_become_solver_actions():
    previous = signal.getsignal(signal.SIGINT)
    with SignalActions("stop", "snapshot") as actions:
        assert actions() == "none"
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.01)
        assert [actions(), actions(), actions()] == ["snapshot", "stop", "none"]
    assert signal.getsignal(signal.SIGINT) is previous


def test_cli_weights_and_snapshot_are_exclusive(work, capsys):
    Path("solver.prototxt").write_text(_solver_text())
    code = cli_main(["train", "--solver", "solver.prototxt", "--weights", "a.caffemodel",
                     "--snapshot", "b.solverstate"])
    assert code == 1
    assert "not both" in capsys.readouterr().err


def test_cli_gpu_without_cuda_falls_back_to_cpu(work, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    Path("solver.prototxt").write_text(_solver_text(max_iter=1))
    assert cli_main(["train", "--solver", "solver.prototxt", "--gpu", "0",
                     "--stage", "a,b", "--stage", "c", "--level", "1"]) == 0
    messages = _cli_messages(capsys.readouterr().err)
    assert any("CUDA is not available" in m for m in messages)
    assert "Use CPU." in messages
    assert any(m.startswith("Optimization Done.") for m in messages)
