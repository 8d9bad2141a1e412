"""Time `protonet train` on the published LeNet solver and net, reading LMDB.

The run is Caffe's MNIST example at the length of a quick check: the net is
examples/mnist/lenet_train_test.prototxt exactly as published (Data layers on
LMDB, batch 64 for TRAIN and 100 for TEST, scale 1/256), and the solver is
examples/mnist/lenet_solver.prototxt with Caffe's MNIST test settings (test_iter
100, test_interval 500) and max_iter 1000, so it runs 1000 training iterations and
3 test passes of 100 batches (at iterations 0, 500 and 1000), then writes the final
snapshot. The data are 6000 training and 1000 test records of 28x28 grey pixels
(noisy class templates, so the accuracy climbs as on MNIST), written as raw Caffe
Datums into LMDBs by protonet's own LMDB writer, where the net's relative sources
point (runs/mnist/digits_{train,test}_lmdb under the bench folder, which is the
child's working directory).

`protonet train` runs as a child process; the bench prints its wall time (process
start to exit), iterations/s overall and in steady state, the final test accuracy
and the child's peak RSS, beside BVLC Caffe's figures for the same run on the
development machine (2 cores): 23.4 to 28.4 s wall, 97 MB peak RSS. When a `caffe`
binary is on PATH, it runs the same solver on the same LMDBs right after, and its
wall time and peak RSS are printed beside ours (its log goes to caffe.log).

    python bench/bench_lenet_train.py [--iterations 1000] [--gpu 0] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
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

NET = REPO / "examples/mnist/lenet_train_test.prototxt"
SOLVER = REPO / "examples/mnist/lenet_solver.prototxt"
CAFFE = "BVLC Caffe, same run and machine: 23.4-28.4 s wall, 97 MB peak RSS"


def write_lmdb(path: Path, count: int, rng: np.random.Generator) -> None:
    """`count` 28x28 uint8 records, labels 0..9, keys %08d, as raw Datums."""
    templates = np.random.default_rng(0).integers(0, 256, (10, 28, 28))
    labels = rng.integers(0, 10, count)
    noise = rng.integers(0, 256, (count, 28, 28))
    images = ((templates[labels] + noise) // 2).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _LmdbWriter(str(path)) as writer:
        for i in range(count):
            writer.put(f"{i:08d}".encode(), raw_datum(images[i], int(labels[i]))
                       .SerializeToString())


def solver_for(iterations: int) -> caffe_pb2.SolverParameter:
    """The published solver with Caffe's MNIST test settings and `iterations`."""
    solver = read_text(str(SOLVER), caffe_pb2.SolverParameter())
    solver.net = str(NET)                   # the published net, unchanged
    del solver.test_iter[:]
    solver.test_iter.append(100)
    solver.test_interval = 500
    solver.max_iter = iterations
    solver.snapshot = 5000                  # as Caffe's: only the final snapshot
    solver.snapshot_prefix = "snapshots/lenet"
    return solver


def prepare(folder: Path, iterations: int) -> None:
    net = read_text(str(NET), caffe_pb2.NetParameter())
    sources = {layer.include[0].phase: layer.data_param.source
               for layer in net.layer if layer.type == "Data"}
    rng = np.random.default_rng(1)
    for phase, count in ((caffe_pb2.TRAIN, 6000), (caffe_pb2.TEST, 1000)):
        db = folder / sources[phase]
        if not db.exists():
            write_lmdb(db, count, rng)
    write_text(str(folder / "lenet_solver.prototxt"), solver_for(iterations))
    (folder / "snapshots").mkdir(exist_ok=True)


def child(cmd: list[str], folder: Path, env=None, log: Path | None = None) -> tuple[float, int]:
    """Run `cmd` in `folder`: (wall seconds, the child's own peak RSS in KiB)."""
    start = time.perf_counter()
    with open(log, "w") if log else open(os.devnull, "w") as sink:
        process = subprocess.Popen(cmd, cwd=folder, env=env,
                                   stderr=sink if log else None)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{cmd[0]} exited with {process.returncode}"
                         + (f"; see {log}" if log else ""))
    return wall, usage.ru_maxrss            # Linux: KiB


def run(folder: Path, gpu: str | None) -> tuple[float, int]:
    cmd = [sys.executable, "-m", "protonet", "-q", "train", "--solver",
           "lenet_solver.prototxt", "--log-json", "log.jsonl"]
    if gpu is not None:
        cmd += ["--gpu", gpu]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return child(cmd, folder, env)


def run_caffe(folder: Path, gpu: str | None) -> tuple[float, int] | None:
    """The same run by a `caffe` binary on PATH (same LMDBs and solver), if there is one."""
    caffe = shutil.which("caffe")
    if caffe is None:
        return None
    cmd = [caffe, "train", "--solver=lenet_solver.prototxt"]
    if gpu is not None:
        cmd.append(f"--gpu={gpu}")
    return child(cmd, folder, log=folder / "caffe.log")


def report(folder: Path, iterations: int, wall: float, peak_kib: int,
           caffe: tuple[float, int] | None) -> None:
    events = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"]
    tests = [e for e in events if e["event"] == "test"]
    print(f"run:                 {iterations} iterations + {len(tests)} tests of 100 "
          "batches")
    print(f"wall time:           {wall:.1f} s (process start to exit)")
    print(f"overall:             {iterations / wall:.1f} iter/s")
    if len(train) > 2:
        rates = [e["iter_per_s"] for e in train[2:]]
        print(f"steady state:        {np.median(rates):.1f} iter/s (median over displays)")
    if tests:
        print(f"final test accuracy: {tests[-1]['outputs']['accuracy']:.3f}")
    print(f"peak RSS (child):    {peak_kib * 1024 / 1e6:.0f} MB "
          f"({peak_kib / 1024:.0f} MiB)")
    if caffe is not None:
        caffe_wall, caffe_kib = caffe
        print(f"caffe, same run now: {caffe_wall:.1f} s wall ({caffe_wall / wall:.2f}x ours), "
              f"peak RSS {caffe_kib * 1024 / 1e6:.0f} MB (log: {folder / 'caffe.log'})")
    print(f"reference:           {CAFFE}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--gpu", help="GPU id for protonet train --gpu")
    parser.add_argument("--workdir", help="keep the files here (default: a temp folder); "
                        "LMDBs already there are reused")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.workdir or tmp).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        prepare(folder, args.iterations)
        wall, peak_kib = run(folder, args.gpu)
        caffe = run_caffe(folder, args.gpu)
        report(folder, args.iterations, wall, peak_kib, caffe)


if __name__ == "__main__":
    main()
