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


def test_bench_train_nets_are_what_the_generator_writes(tmp_path, monkeypatch):
    """bench/nets/*_train.prototxt are their deploy nets with the training head."""
    import make_train_nets
    from protonet.io.text import read_text, to_text
    from protonet.proto import caffe_pb2
    for name, deploy in make_train_nets.DEPLOY.items():
        written = read_text(str(BENCH / "nets" / f"{name}_train.prototxt"),
                            caffe_pb2.NetParameter())
        made = make_train_nets.train_net(read_text(str(deploy), caffe_pb2.NetParameter()))
        assert to_text(written) == to_text(made), name
        assert written.layer[0].type == "DummyData" and written.layer[-1].type == \
            "SoftmaxWithLoss"


def test_caffe_bench_runs_protonet_time_on_the_files(capsys):
    import bench_caffe
    assert bench_caffe.main(["--nets", "lenet", "--iterations", "1", "--rounds", "1",
                             "--caffe", ""]) == 0
    row = [line for line in capsys.readouterr().out.splitlines()
           if line.startswith("LeNet")][0].split()
    assert row[2] == "-" and float(row[3]) > 0 and float(row[6]) > 0


def test_inference_bench_checks_blobs_and_times_the_paths(capsys):
    import bench_inference
    assert bench_inference.main(["--model", str(BENCH / "nets" / "lenet_deploy.prototxt"),
                                 "--iterations", "1", "--rounds", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert ", 0 missing;" in out and "forward_for_inference " in out
    error = float(out.split("max relative error ")[1].split(",")[0])
    assert error < 1e-5
