"""Memory over a long run: `protonet train` on LeNet for 10,000 iterations, RSS sampled.

A leak shows as resident memory that keeps growing with the iteration count. This
bench trains the published LeNet (examples/mnist/lenet_train_test.prototxt: Data
layers on LMDB with prefetch threads, batch 64) with the published solver settings
for --iterations iterations, testing every 500 (10 batches of 100) and
snapshotting every 2500, as a `protonet train` child process with its JSON log on.
The data are 6000 + 1000 synthetic 28x28 digits (noisy class templates) written as
raw Datums into LMDBs in a temporary folder.

The child logs a display line every --every iterations; at each one the bench
reads the child's VmRSS from /proc. It prints the samples and the least-squares
slope of RSS against iterations with its standard error, in KB per 1000
iterations, over all samples and over those after the warm-up (--warmup
iterations: allocator pools, the first test pass and the first snapshot settle
there). RSS moves by a few MB between samples (batches in flight, malloc's pools),
so a slope within two standard errors of 0 is reported as flat; a leak of 1 KB per
iteration would show as +1000 KB / 1000 iterations, well outside that band.

    python bench/bench_leak.py [--iterations 10000] [--every 500] [--warmup 2500] [--gpu 0]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from protonet.data.datum import raw_datum  # noqa: E402
from protonet.data.imageset import _LmdbWriter  # noqa: E402
from protonet.io.text import read_text, write_text  # noqa: E402
from protonet.proto import caffe_pb2  # noqa: E402

NET = REPO / "examples" / "mnist" / "lenet_train_test.prototxt"
SOLVER = REPO / "examples" / "mnist" / "lenet_solver.prototxt"
DISPLAY = re.compile(r"Iteration (\d+) \(")


def write_digits(path: Path, count: int, seed: int) -> None:
    """`count` 28x28 grey records (labels 0..9) as raw Datums, keys %08d."""
    templates = np.random.default_rng(0).integers(0, 256, (10, 28, 28))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, count)
    images = ((templates[labels] + rng.integers(0, 256, (count, 28, 28))) // 2)
    with _LmdbWriter(str(path)) as writer:
        for i in range(count):
            datum = raw_datum(images[i].astype(np.uint8), int(labels[i]))
            writer.put(f"{i:08d}".encode(), datum.SerializeToString())


def prepare(folder: Path, iterations: int, every: int) -> None:
    net = read_text(str(NET), caffe_pb2.NetParameter())
    for layer in net.layer:
        if layer.type == "Data":
            train = layer.include[0].phase == caffe_pb2.TRAIN
            db = folder / ("train_lmdb" if train else "test_lmdb")
            write_digits(db, 6000 if train else 1000, 1 if train else 2)
            layer.data_param.source = str(db)
    write_text(str(folder / "net.prototxt"), net)
    solver = read_text(str(SOLVER), caffe_pb2.SolverParameter())
    solver.net = str(folder / "net.prototxt")
    del solver.test_iter[:]
    solver.test_iter.append(10)
    solver.test_interval = 500
    solver.display = every
    solver.max_iter = iterations
    solver.snapshot = 2500
    solver.snapshot_prefix = str(folder / "snapshots" / "lenet")
    (folder / "snapshots").mkdir()
    write_text(str(folder / "solver.prototxt"), solver)


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc (Linux only)")


def train(folder: Path, gpu: str | None) -> tuple[list[tuple[int, int]], float]:
    """Run the child; returns (iteration, RSS KB) samples and the wall time."""
    command = [sys.executable, "-m", "protonet", "train", "--solver", "solver.prototxt",
               "--log-json", "log.jsonl"]
    if gpu is not None:
        command += ["--gpu", gpu]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=folder, env=env, stderr=subprocess.PIPE, text=True)
    samples = []
    for line in child.stderr:
        found = DISPLAY.search(line)
        if found:
            samples.append((int(found.group(1)), rss_kb(child.pid)))
            print(f"  iteration {samples[-1][0]:>6}: RSS {samples[-1][1] / 1024:8.1f} MiB",
                  flush=True)
    if child.wait() != 0:
        raise SystemExit(f"protonet train failed (exit {child.returncode})")
    return samples, time.perf_counter() - start


def slope(samples: list[tuple[int, int]]) -> tuple[float, float]:
    """Least-squares slope of RSS (KB) against iterations and its standard error,
    both per 1000 iterations."""
    x = np.array([s[0] for s in samples], dtype=np.float64)
    y = np.array([s[1] for s in samples], dtype=np.float64)
    if len(samples) < 3:
        return 0.0, float("inf")
    (b, a) = np.polyfit(x, y, 1)
    residual = y - (a + b * x)
    error = np.sqrt(residual @ residual / (len(x) - 2) / ((x - x.mean()) ** 2).sum())
    return float(b * 1000), float(error * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=500, help="RSS sample interval")
    parser.add_argument("--warmup", type=int, default=2500,
                        help="iterations left out of the second slope")
    parser.add_argument("--gpu", help="GPU id for protonet train --gpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="protonet-leak-") as tmp:
        folder = Path(tmp)
        prepare(folder, args.iterations, args.every)
        print(f"protonet train: LeNet, {args.iterations} iterations, RSS every {args.every}")
        samples, wall = train(folder, args.gpu)
    settled = [s for s in samples if s[0] >= args.warmup]
    print(f"wall time: {wall:.1f} s; RSS {samples[0][1] / 1024:.1f} -> "
          f"{samples[-1][1] / 1024:.1f} MiB (min {min(s[1] for s in samples) / 1024:.1f}, "
          f"max {max(s[1] for s in samples) / 1024:.1f})")
    for label, chosen in ((f"all {len(samples)} samples", samples),
                          (f"iterations >= {args.warmup} ({len(settled)} samples)", settled)):
        value, error = slope(chosen)
        verdict = "flat within noise" if abs(value) <= 2 * error else "GROWING"
        print(f"RSS slope, {label}: {value:+.1f} +- {error:.1f} KB / 1000 iterations "
              f"({verdict})")


if __name__ == "__main__":
    main()
