"""EMA weights (protonet.solver.ema, `protonet train --ema`): the average against a
numpy recurrence, training unchanged by it, its snapshots, resume and EMA testing."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import protonet
from protonet.cli import main as cli_main
from protonet.errors import SolverError
from protonet.solver import get_solver
from protonet.solver.ema import WeightEMA, ema_path

from test_solver import param, work, weights  # noqa: F401  (the tiny HDF5 net)


def _solver(**fields):
    return get_solver(param(**fields))


def _params(solver) -> list[np.ndarray]:
    return [p.detach().numpy().copy() for p in solver._params]


def _recurrence(history: list[list[np.ndarray]], decays: list[float]) -> list[np.ndarray]:
    """ema_0 = the params before the first update; ema += (1 - d) * (param - ema)."""
    ema = [p.copy() for p in history[0]]
    for params, decay in zip(history[1:], decays):
        w = np.float32(1.0 - decay)
        ema = [e + w * (p - e) for e, p in zip(ema, params)]
    return ema


@pytest.mark.parametrize("warmup", [False, True])
def test_average_follows_the_recurrence(work, warmup):
    solver = _solver(max_iter=8, momentum=0.9, weight_decay=0.01)
    ema = WeightEMA(solver, 0.8, warmup=warmup).attach()
    history = []
    solver.add_callback(lambda: history.append(_params(solver)) if not history else None,
                        lambda: None)
    solver.add_hook("update", lambda: history.append(_params(solver)))
    solver.solve()
    assert len(history) == 9 and ema.updates == 8
    decays = [min(0.8, (1 + n) / (10 + n)) if warmup else 0.8 for n in range(8)]
    expected = _recurrence(history, decays)
    for got, want in zip(ema.averages(), expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # The average is not the weights, and lies between the start and the end.
    assert not np.array_equal(ema.averages()[0], history[-1][0])


def test_training_is_bit_identical_with_or_without_ema(work):
    plain = _solver(max_iter=9, test_iter=2, test_interval=3, snapshot=3,
                    snapshot_prefix="snap/plain")
    plain.solve()
    averaged = _solver(max_iter=9, test_iter=2, test_interval=3, snapshot=3,
                       snapshot_prefix="snap/ema")
    WeightEMA(averaged, 0.9, test=True).attach()
    averaged.solve()
    for a, b in zip(weights(plain), weights(averaged)):
        np.testing.assert_array_equal(a, b)
    for it in (3, 6, 9):
        assert Path(f"snap/plain_iter_{it}.caffemodel").read_bytes() == \
            Path(f"snap/ema_iter_{it}.caffemodel").read_bytes()
        assert Path(f"snap/ema_iter_{it}.ema.caffemodel").is_file()
        assert not Path(f"snap/plain_iter_{it}.ema.caffemodel").exists()


def test_snapshot_holds_the_averages_and_loads_as_weights(work):
    Path("deploy.prototxt").write_text(Path("net.prototxt").read_text())
    solver = _solver(max_iter=6, snapshot=6)
    ema = WeightEMA(solver, 0.7).attach()
    solver.solve()
    path = "snap/tiny_iter_6.ema.caffemodel"
    assert ema_path("snap/tiny_iter_6.caffemodel") == path
    net = protonet.Net("deploy.prototxt", path, protonet.TEST)
    saved = [b.data for blobs in net.params.values() for b in blobs]
    for got, want in zip(saved, ema.averages()):
        np.testing.assert_array_equal(got, want)


def test_resume_continues_from_the_ema_file(work):
    first = _solver(max_iter=4, snapshot=4)
    ema = WeightEMA(first, 0.9).attach()
    first.solve()
    at_four = ema.averages()
    second = _solver(max_iter=6)
    resumed = WeightEMA(second, 0.9).attach()
    assert resumed.resume("snap/tiny_iter_4.solverstate")
    for got, want in zip(resumed.averages(), at_four):
        np.testing.assert_array_equal(got, want)
    second.solve("snap/tiny_iter_4.solverstate")
    assert resumed.updates == 2
    fresh = WeightEMA(_solver(max_iter=6), 0.9)
    assert not fresh.resume("snap/missing_iter_4.solverstate")


def test_ema_paths_and_decay_checks(work):
    assert ema_path("a/x_iter_5.caffemodel.h5") == "a/x_iter_5.ema.caffemodel.h5"
    assert ema_path("x_iter_5.solverstate") == "x_iter_5.ema.caffemodel"
    assert ema_path("x_iter_5.solverstate.h5") == "x_iter_5.ema.caffemodel.h5"
    with pytest.raises(SolverError, match="not a snapshot"):
        ema_path("x_iter_5.ema.caffemodel")
    with pytest.raises(SolverError, match=r"must be in \[0, 1\)"):
        WeightEMA(_solver(), 1.0)


def test_train_command_writes_ema_files_and_ema_tests(work, capsys):
    Path("solver.prototxt").write_text(
        'net: "net.prototxt"\nbase_lr: 0.1\nmomentum: 0.9\nlr_policy: "fixed"\n'
        'max_iter: 6\ndisplay: 2\ntest_iter: 2\ntest_interval: 3\nsnapshot: 3\n'
        'snapshot_prefix: "snap/cli"\nrandom_seed: 1\n')
    assert cli_main(["-q", "train", "--solver", "solver.prototxt", "--ema", "0.9",
                     "--ema-test"]) == 0
    for it in (3, 6):
        assert Path(f"snap/cli_iter_{it}.ema.caffemodel").is_file()
    records = [json.loads(line) for line in Path("snap/cli.log.jsonl").read_text().splitlines()]
    tests = [(r["iter"], r["event"]) for r in records if r["event"].startswith("test")]
    assert tests == [(0, "test"), (0, "test_ema"), (3, "test"), (3, "test_ema"),
                     (6, "test"), (6, "test_ema")]
    ema_record = [r for r in records if r["event"] == "test_ema"][0]
    assert set(ema_record["outputs"]) == {"acc", "loss"} and ema_record["decay"] == 0.9
    # Resuming picks the EMA file up beside the solverstate.
    Path("solver.prototxt").write_text(Path("solver.prototxt").read_text()
                                       .replace("max_iter: 6", "max_iter: 8"))
    assert cli_main(["train", "--solver", "solver.prototxt", "--ema", "0.9",
                     "--snapshot", "snap/cli_iter_6.solverstate"]) == 0
    assert "Resuming the EMA weights from snap/cli_iter_6.ema.caffemodel" in \
        capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--ema", "1.5"], "--ema: the EMA decay must be in [0, 1)"),
    (["--ema-test"], "--ema-test and --ema-warmup need --ema DECAY"),
])
def test_train_command_flag_errors(work, capsys, flags, message):
    Path("solver.prototxt").write_text('net: "net.prototxt"\nbase_lr: 0.1\n'
                                       'lr_policy: "fixed"\nmax_iter: 1\n'
                                       'snapshot_prefix: "snap/x"\n')
    assert cli_main(["-q", "train", "--solver", "solver.prototxt", *flags]) == 1
    assert message in capsys.readouterr().err
