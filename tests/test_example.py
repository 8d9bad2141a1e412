"""The bundled LeNet example: the published files, and training from LMDB via the CLI.

- the published net and solver hold Caffe's LeNet and its SGD settings;
- `protonet train --solver examples/mnist/lenet_solver.prototxt`, run from a folder
  laid out as the repository (the paths are relative to the current directory, as
  in Caffe), trains the published net from LMDBs of Datum records for a few dozen
  iterations: tests, snapshots, a falling loss;
- examples/mnist/run.py --smoke: PNG files to LMDB with protonet's converter, then
  training, log tables and plot (needs scikit-learn's bundled digits).

Training runs in child processes with one thread each (OMP_NUM_THREADS=1).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest

from protonet.data.datum import raw_datum
from protonet.io.text import read_text, write_text
from protonet.logs import parse_log
from protonet.proto import caffe_pb2

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "mnist"
NET = EXAMPLE / "lenet_train_test.prototxt"
SOLVER = EXAMPLE / "lenet_solver.prototxt"


def child_env() -> dict[str, str]:
    path = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path)}


def run_child(argv: list[str], cwd: Path, timeout: float = 120) -> str:
    """Run a Python child; returns its stdout + stderr, failing with their tail."""
    done = subprocess.run([sys.executable, *argv], cwd=cwd, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{output[-3000:]}"
    return output


def test_published_net_and_solver():
    net = read_text(str(NET), caffe_pb2.NetParameter())
    data = [layer for layer in net.layer if layer.type == "Data"]
    assert [(layer.include[0].phase, layer.data_param.batch_size) for layer in data] == \
        [(caffe_pb2.TRAIN, 64), (caffe_pb2.TEST, 100)]
    for layer in data:
        assert layer.data_param.backend == caffe_pb2.DataParameter.LMDB
        assert layer.transform_param.scale == pytest.approx(0.00390625)
    body = [(layer.type, layer.convolution_param.num_output or
             layer.inner_product_param.num_output) for layer in net.layer[2:]]
    assert body == [("Convolution", 20), ("Pooling", 0), ("Convolution", 50),
                    ("Pooling", 0), ("InnerProduct", 500), ("ReLU", 0),
                    ("InnerProduct", 10), ("Accuracy", 0), ("SoftmaxWithLoss", 0)]
    assert net.layer[-2].include[0].phase == caffe_pb2.TEST

    solver = read_text(str(SOLVER), caffe_pb2.SolverParameter())
    assert (solver.base_lr, solver.momentum, solver.weight_decay, solver.lr_policy,
            solver.gamma, solver.power, solver.display) == pytest.approx(
                (0.01, 0.9, 0.0005, "inv", 0.0001, 0.75, 100))
    assert solver.net == "examples/mnist/lenet_train_test.prototxt"
    # the test passes cover the bundled example's 300 test images exactly once
    assert solver.test_iter[0] * data[1].data_param.batch_size == 300
    assert solver.max_iter % solver.test_interval == 0
    assert solver.snapshot and solver.max_iter % solver.snapshot == 0


def write_records(path: Path, count: int, rng: np.random.Generator) -> None:
    """Raw 1x28x28 Datums (noisy class templates) under keys %08d, as Caffe's MNIST
    converter writes them, with the plain lmdb binding."""
    templates = np.random.default_rng(0).integers(0, 256, (10, 28, 28))
    labels = rng.integers(0, 10, count)
    images = ((templates[labels] + rng.integers(0, 256, (count, 28, 28))) // 2)
    path.mkdir(parents=True)
    env = lmdb.open(str(path), map_size=64 << 20)
    with env.begin(write=True) as txn:
        for i in range(count):
            datum = raw_datum(images[i].astype(np.uint8), int(labels[i]))
            txn.put(f"{i:08d}".encode(), datum.SerializeToString())
    env.close()


def test_published_lenet_trains_from_lmdb_with_the_cli(tmp_path):
    """The published solver and net, through `protonet train`, from the repository
    root layout; only the run's length is changed in the solver."""
    net = read_text(str(NET), caffe_pb2.NetParameter())
    rng = np.random.default_rng(1)
    for layer in net.layer:
        if layer.type == "Data":
            count = 640 if layer.include[0].phase == caffe_pb2.TRAIN else 300
            write_records(tmp_path / layer.data_param.source, count, rng)
    (tmp_path / "examples" / "mnist").mkdir(parents=True)
    shutil.copyfile(NET, tmp_path / "examples" / "mnist" / NET.name)
    solver = read_text(str(SOLVER), caffe_pb2.SolverParameter())
    solver.max_iter, solver.test_interval, solver.snapshot, solver.display = 40, 20, 20, 5
    write_text(str(tmp_path / "examples" / "mnist" / SOLVER.name), solver)
    prefix = tmp_path / solver.snapshot_prefix
    prefix.parent.mkdir(parents=True)

    output = run_child(["-m", "protonet", "train", "--solver",
                        "examples/mnist/lenet_solver.prototxt", "--log-json", "log.jsonl"],
                       cwd=tmp_path)
    assert "Optimization Done." in output
    for iteration in (20, 40):
        for suffix in (".caffemodel", ".solverstate"):
            assert Path(f"{prefix}_iter_{iteration}{suffix}").is_file()
    events = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    tests = [e for e in events if e["event"] == "test"]
    assert [e["iter"] for e in tests] == [0, 20, 40]
    assert all(0 <= e["outputs"]["accuracy"] <= 1 for e in tests)
    losses = [e["loss"] for e in events if e["event"] == "train"]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert tests[-1]["outputs"]["loss"] < tests[0]["outputs"]["loss"]


def test_example_smoke_run(tmp_path):
    pytest.importorskip("sklearn", reason="the example reads scikit-learn's digits")
    output = run_child([str(EXAMPLE / "run.py"), "--smoke", "--workdir", str(tmp_path)],
                       cwd=tmp_path)
    # PNG files to LMDB by protonet's converter: its keys, grey 28x28 raw Datums
    for name, count in (("train", 500), ("test", 100)):
        env = lmdb.open(str(tmp_path / f"digits_{name}_lmdb"), readonly=True, lock=False)
        with env.begin() as txn:
            assert txn.stat()["entries"] == count
            key, value = next(iter(txn.cursor()))
        env.close()
        assert key.decode().startswith(f"00000000_{name}/")
        datum = caffe_pb2.Datum.FromString(value)
        assert (datum.channels, datum.height, datum.width, datum.encoded) == (1, 28, 28, False)
        assert 0 <= datum.label <= 9
    # training ran through the CLI, from those LMDBs, and the loss fell
    assert "$ protonet train --solver" in output
    log = parse_log(str(tmp_path / "train.log"))
    losses = [row["loss"] for row in log.train]
    assert len(losses) >= 5
    assert losses[-1] < 0.5 * losses[0]
    assert log.test[-1]["NumIters"] == 60 and log.test[-1]["accuracy"] > 0.5
    assert "final test accuracy:" in output
    assert (tmp_path / "snapshots" / "lenet_iter_60.caffemodel").is_file()
    assert (tmp_path / "train.csv").is_file() and (tmp_path / "test.csv").is_file()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "curves.png").stat().st_size > 1000
