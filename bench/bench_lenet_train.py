"""Time `protonet train` on LeNet with the published MNIST solver settings.

The LeNet example trains from LMDB through Data layers; until those land, this
bench builds an HDF5 version of the same training: examples/mnist/lenet.prototxt
with its Input layer replaced by HDF5Data layers (TRAIN batch 64, TEST batch 100)
and its Softmax by SoftmaxWithLoss + Accuracy, fed 6000/1000 synthetic 28x28
records (noisy class templates, so accuracy climbs as it would on MNIST). The
solver is lenet_solver.prototxt's (SGD, momentum 0.9, inv policy, weight decay
5e-4) with a shorter run. The LMDB version of this bench follows when the Data
layer lands.

It runs the CLI as a child process and prints the overall and steady-state
iterations/s, the final test accuracy, and the child's peak RSS.

    python bench/bench_lenet_train.py [--iterations 1000] [--gpu 0]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from protonet.io.text import parse_text, to_text  # noqa: E402
from protonet.proto import caffe_pb2  # noqa: E402

SOLVER = """net: "lenet_train_test.prototxt"
test_iter: 10
test_interval: 500
base_lr: 0.01
momentum: 0.9
weight_decay: 0.0005
lr_policy: "inv"
gamma: 0.0001
power: 0.75
display: 100
max_iter: {iterations}
snapshot_prefix: "snap/lenet"
random_seed: 1
"""


def write_records(folder: Path, name: str, count: int, rng) -> None:
    """`count` 28x28 images in [0, 1) with labels 0..9, as one HDF5 file + list."""
    templates = np.random.default_rng(0).random((10, 1, 28, 28), dtype=np.float32)
    labels = rng.integers(0, 10, count)
    noise = rng.random((count, 1, 28, 28), dtype=np.float32)
    with h5py.File(folder / f"{name}.h5", "w") as f:
        f["data"] = 0.5 * templates[labels] + 0.5 * noise
        f["label"] = labels.astype(np.float32)
    (folder / f"{name}.txt").write_text(f"{name}.h5\n")


def train_test_net() -> caffe_pb2.NetParameter:
    """The bundled LeNet with HDF5Data inputs and training/testing heads."""
    net = parse_text((REPO / "examples/mnist/lenet.prototxt").read_text(),
                     caffe_pb2.NetParameter())
    body = [layer for layer in net.layer if layer.type not in ("Input", "Softmax")]
    del net.layer[:]
    for phase, batch in ((caffe_pb2.TRAIN, 64), (caffe_pb2.TEST, 100)):
        source = "train" if phase == caffe_pb2.TRAIN else "test"
        layer = net.layer.add(name="mnist", type="HDF5Data", top=["data", "label"])
        layer.include.add(phase=phase)
        layer.hdf5_data_param.source = f"{source}.txt"
        layer.hdf5_data_param.batch_size = batch
    net.layer.extend(body)
    accuracy = net.layer.add(name="accuracy", type="Accuracy", bottom=["ip2", "label"],
                             top=["accuracy"])
    accuracy.include.add(phase=caffe_pb2.TEST)
    net.layer.add(name="loss", type="SoftmaxWithLoss", bottom=["ip2", "label"], top=["loss"])
    return net


def prepare(folder: Path, iterations: int) -> None:
    rng = np.random.default_rng(1)
    write_records(folder, "train", 6000, rng)
    write_records(folder, "test", 1000, rng)
    (folder / "lenet_train_test.prototxt").write_text(to_text(train_test_net()))
    (folder / "lenet_solver.prototxt").write_text(SOLVER.format(iterations=iterations))
    (folder / "snap").mkdir(exist_ok=True)


def run(folder: Path, gpu: str | None) -> float:
    cmd = [sys.executable, "-m", "protonet", "-q", "train", "--solver",
           "lenet_solver.prototxt", "--log-json", "log.jsonl"]
    if gpu is not None:
        cmd += ["--gpu", gpu]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    subprocess.run(cmd, cwd=folder, env=env, check=True)
    return time.perf_counter() - start


def report(folder: Path, iterations: int, wall: float) -> None:
    events = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"]
    tests = [e for e in events if e["event"] == "test"]
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"iterations:          {iterations} (+ {len(tests)} tests of 10 batches)")
    print(f"wall time:           {wall:.1f} s (process start to exit)")
    print(f"overall:             {iterations / wall:.1f} iter/s")
    if len(train) > 2:
        rates = [e["iter_per_s"] for e in train[2:]]
        print(f"steady state:        {np.median(rates):.1f} iter/s (median over displays)")
    if tests:
        print(f"final test accuracy: {tests[-1]['outputs']['accuracy']:.3f}")
    print(f"peak RSS (child):    {peak_mib:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--gpu", help="GPU id for protonet train --gpu")
    parser.add_argument("--workdir", help="keep the files here (default: a temp folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.workdir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        prepare(folder, args.iterations)
        wall = run(folder, args.gpu)
        report(folder, args.iterations, wall)


if __name__ == "__main__":
    main()
