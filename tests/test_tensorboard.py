"""TensorBoard events from `protonet train --tensorboard` (protonet.solver.tensorboard):
the scalars match the JSON-lines log; histograms on request; a clear error without
the package."""
from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest

from protonet.cli import main as cli_main
from protonet.errors import ProtonetError
from protonet.solver import tensorboard as tb

from test_solver import work  # noqa: F401  (the tiny HDF5 net)

SOLVER = ('net: "net.prototxt"\nbase_lr: 0.1\nmomentum: 0.9\nlr_policy: "step"\n'
          'gamma: 0.5\nstepsize: 2\nmax_iter: 6\ndisplay: 2\ntest_iter: 2\n'
          'test_interval: 3\nsnapshot_prefix: "snap/tb"\nrandom_seed: 1\n'
          'snapshot_after_train: false\n')


def _events(logdir: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    files = list(Path(logdir).glob("events.out.tfevents.*"))
    assert len(files) == 1, files
    acc = EventAccumulator(str(files[0]), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def _scalars(acc, tag) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_scalars_match_the_json_log(work):
    pytest.importorskip("tensorboard")
    Path("solver.prototxt").write_text(SOLVER)
    assert cli_main(["-q", "train", "--solver", "solver.prototxt", "--tensorboard", "tb",
                     "--ema", "0.9", "--ema-test"]) == 0
    records = [json.loads(line) for line in Path("snap/tb.log.jsonl").read_text().splitlines()]
    acc = _events("tb")
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/iter_per_s", "train_outputs/loss",
            "test/acc", "test/loss", "test_ema/acc", "test_ema/loss"} <= tags
    assert not acc.Tags()["histograms"]
    train = [r for r in records if r["event"] == "train"]
    assert _scalars(acc, "train/loss") == [(r["iter"], pytest.approx(r["loss"])) for r in train]
    assert _scalars(acc, "train/lr") == [(0, pytest.approx(0.1)), (2, pytest.approx(0.05)),
                                         (4, pytest.approx(0.025))]
    test = [r for r in records if r["event"] == "test"]
    assert _scalars(acc, "test/acc") == [(r["iter"], pytest.approx(r["outputs"]["acc"]))
                                         for r in test]
    assert [step for step, _ in _scalars(acc, "test_ema/loss")] == [0, 3, 6]


def test_histograms_of_weights_and_gradients(work):
    pytest.importorskip("tensorboard")
    Path("solver.prototxt").write_text(SOLVER)
    assert cli_main(["-q", "train", "--solver", "solver.prototxt", "--tensorboard", "tb",
                     "--tb-histograms"]) == 0
    acc = _events("tb")
    assert set(acc.Tags()["histograms"]) == {"weights/ip/0", "weights/ip/1",
                                             "gradients/ip/0", "gradients/ip/1"}
    weight = acc.Histograms("weights/ip/0")
    assert [h.step for h in weight] == [0, 2, 4]
    assert weight[0].histogram_value.num == 15        # 3 x 5 InnerProduct weights


def test_sink_tags_for_several_test_nets_and_list_outputs():
    class Writer:
        def __init__(self):
            self.scalars = []

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

        def flush(self):
            pass

    writer = Writer()
    sink = tb.TensorBoardSink("unused", writer=writer)
    sink.record({"event": "test", "iter": 7, "net": 1, "loss": 0.5,
                 "outputs": {"acc": 0.25, "scores": [1.0, 2.0]}})
    sink.record({"event": "other", "iter": 8})
    assert writer.scalars == [("test_net1/acc", 0.25, 7), ("test_net1/scores#0", 1.0, 7),
                              ("test_net1/scores#1", 2.0, 7), ("test_net1/total_loss", 0.5, 7)]


def test_without_tensorboard_the_error_says_how_to_install(work, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "tensorboard" or name.startswith("tensorboard.") or \
                name == "torch.utils.tensorboard":
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ProtonetError, match=r"pip install 'protonet\[tensorboard\]'"):
        tb.summary_writer_class()
    Path("solver.prototxt").write_text(SOLVER)
    assert cli_main(["-q", "train", "--solver", "solver.prototxt", "--tensorboard", "tb"]) == 1
    assert "needs the tensorboard package" in capsys.readouterr().err
    assert not Path("tb").exists()
