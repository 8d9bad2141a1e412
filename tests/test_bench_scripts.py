"""The benchmark scripts a GPU session is meant to run as they are: they must run.
(Smoke runs on tiny settings; tests never judge timings.)"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import bench_nets  # noqa: E402
import bench_train_data  # noqa: E402


@pytest.mark.skipif(not (bench_nets.NETS_DIR / "lenet" / "net.prototxt").exists(),
                    reason="needs the conformance nets (../shared/conformance)")
def test_train_data_bench_runs_both_feeds(tmp_path, capsys):
    assert bench_train_data.main(["--nets", "lenet", "--batch", "4", "--iterations", "2",
                                  "--warmup", "1", "--records", "12",
                                  "--workdir", str(tmp_path)]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.split()[0] == "lenet" and "memory" in line and "data path costs" in line


def test_train_net_gets_a_loss_and_a_data_layer():
    if not (bench_nets.NETS_DIR / "lenet" / "net.prototxt").exists():
        pytest.skip("needs the conformance nets (../shared/conformance)")
    net = bench_train_data.train_net("lenet", 4, "some_lmdb")
    assert net.layer[0].type == "Data" and list(net.layer[0].top) == ["data", "label"]
    assert net.layer[-1].type == "SoftmaxWithLoss" and list(net.layer[-1].bottom)[-1] == "label"
    memory = bench_train_data.train_net("lenet", 4, None)
    assert [list(s.dim) for s in memory.layer[0].input_param.shape] == [[4, 1, 28, 28], [4]]
