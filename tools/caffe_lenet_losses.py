"""Train from scratch (no weights, a fixed `random_seed`) with the reference Caffe and
with protonet, and compare the loss lines they print.

The data are synthetic 28x28 "digits" (a noisy template per class, from a fixed numpy
seed) written as raw Datums to two LMDBs, so Caffe and protonet read identical bytes
and the tests can remake them. Two runs:

- `lenet`: protonet's examples/mnist/lenet_train_test (Caffe's LeNet: conv 20, pool,
  conv 50, pool, ip 500, ReLU, ip 10) with Caffe's lenet_solver settings, plus
  `random_seed`, `display: 1`, CPU mode, 100 iterations and a short test every 50;
- `crop_dropout`: a small net with a random crop (24 of 28) and mirror in TRAIN, an
  msra/gaussian/xavier-filled conv and two InnerProducts with Dropout between them,
  30 iterations, a test every 10: every kind of draw a training run makes.

    python3 tools/caffe_lenet_losses.py --config lenet \\
        --caffe /work/caffe-ref/build/tools/caffe --write tests/data/lenet_caffe_losses.json

prints both runs' losses side by side; --write stores Caffe's (the fixtures
tests/test_rng_lenet.py pins protonet to).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LENET = ROOT / "examples" / "mnist" / "lenet_train_test.prototxt"
TRAIN_RECORDS, TEST_RECORDS = 640, 200

CROP_DROPOUT_NET = """name: "crop_dropout"
layer { name: "d" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { scale: 0.00390625 crop_size: 24 mirror: true }
  data_param { source: "train_lmdb" backend: LMDB batch_size: 32 } }
layer { name: "d" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { scale: 0.00390625 crop_size: 24 }
  data_param { source: "test_lmdb" backend: LMDB batch_size: 50 } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 8 kernel_size: 5 stride: 2
    weight_filler { type: "msra" } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip1" type: "InnerProduct" bottom: "conv" top: "ip1"
  inner_product_param { num_output: 64 weight_filler { type: "gaussian" std: 0.02 } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "drop" type: "Dropout" bottom: "ip1" top: "ip1" dropout_param { dropout_ratio: 0.5 } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "ip2" bottom: "label" top: "acc"
  include { phase: TEST } }
"""

CONFIGS = {
    "lenet": {"seed": 1701, "iterations": 100, "solver": """test_iter: 2
test_interval: 50
base_lr: 0.01
momentum: 0.9
weight_decay: 0.0005
lr_policy: "inv"
gamma: 0.0001
power: 0.75
"""},
    "crop_dropout": {"seed": 77, "iterations": 30, "solver": """test_iter: 2
test_interval: 10
base_lr: 0.05
momentum: 0.9
lr_policy: "fixed"
"""},
}


def write_lmdb(path: Path, count: int, state: np.random.RandomState) -> None:
    """Raw 1x28x28 uint8 Datums under keys %08d (as Caffe's MNIST converter)."""
    import lmdb
    sys.path.insert(0, str(ROOT))
    from protonet.proto import caffe_pb2
    templates = np.random.RandomState(0).randint(0, 256, (10, 28, 28))
    labels = state.randint(0, 10, count)
    images = ((templates[labels] + state.randint(0, 256, (count, 28, 28))) // 2)
    env = lmdb.open(str(path), map_size=64 << 20)
    with env.begin(write=True) as txn:
        for i in range(count):
            datum = caffe_pb2.Datum(channels=1, height=28, width=28, label=int(labels[i]),
                                    data=images[i].astype(np.uint8).tobytes())
            txn.put(f"{i:08d}".encode(), datum.SerializeToString())
    env.close()


def make_workdir(workdir: Path, config: str = "lenet") -> Path:
    """LMDBs, net and solver of `config` in `workdir`; returns the solver's path."""
    settings = CONFIGS[config]
    workdir.mkdir(parents=True, exist_ok=True)
    state = np.random.RandomState(1701)          # the same images for every config
    write_lmdb(workdir / "train_lmdb", TRAIN_RECORDS, state)
    write_lmdb(workdir / "test_lmdb", TEST_RECORDS, state)
    if config == "lenet":
        net = LENET.read_text()
        net = net.replace("runs/mnist/digits_train_lmdb", "train_lmdb")
        net = net.replace("runs/mnist/digits_test_lmdb", "test_lmdb")
    else:
        net = CROP_DROPOUT_NET
    (workdir / f"{config}.prototxt").write_text(net)
    solver = workdir / f"{config}_solver.prototxt"
    solver.write_text(f'net: "{config}.prototxt"\n' + settings["solver"] +
                      f"display: 1\nmax_iter: {settings['iterations']}\n"
                      'snapshot_after_train: false\nsnapshot_prefix: "unused"\n'
                      f"solver_mode: CPU\nrandom_seed: {settings['seed']}\n")
    return solver


_TRAIN = re.compile(r"Iteration (\d+)[^\n]*?, loss = ([-0-9.e+naif]+)")
_TEST = re.compile(r"Test net output #\d+: (\w+) = ([-0-9.e+naif]+)")


def parse(log: str) -> dict:
    """Per-iteration training losses and the test outputs, in the order printed."""
    train = {int(i): float(v) for i, v in _TRAIN.findall(log)}
    tests = [(name, float(v)) for name, v in _TEST.findall(log)]
    return {"loss": [train[i] for i in sorted(train)], "iterations": sorted(train),
            "test": tests}


def run(command: list[str], cwd: Path, env: dict | None = None) -> str:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=1200)
    if done.returncode:
        raise SystemExit(f"{command[0]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="lenet")
    parser.add_argument("--caffe", default="/work/caffe-ref/build/tools/caffe")
    parser.add_argument("--workdir", default="/tmp/protonet-rng-train")
    parser.add_argument("--write", help="store Caffe's losses as this JSON fixture")
    args = parser.parse_args()
    workdir = Path(args.workdir) / args.config
    solver = make_workdir(workdir, args.config)
    caffe = parse(run([args.caffe, "train", f"--solver={solver.name}"], workdir,
                      dict(os.environ, GLOG_logtostderr="1")))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ours = parse(run([sys.executable, "-m", "protonet", "train", "--solver", solver.name],
                     workdir, env))
    worst = 0.0
    for i, (a, b) in enumerate(zip(caffe["loss"], ours["loss"])):
        worst = max(worst, abs(a - b) / max(abs(a), 1e-12))
        print(f"{i:4d} caffe {a:<12g} protonet {b:<12g}")
    for (name, a), (_, b) in zip(caffe["test"], ours["test"]):
        print(f"test {name}: caffe {a:g} protonet {b:g}")
    print(f"{len(caffe['loss'])} Caffe loss lines, {len(ours['loss'])} protonet's; "
          f"worst relative difference {worst:.3g}")
    if args.write:
        settings = CONFIGS[args.config]
        fixture = {"config": args.config, "seed": settings["seed"],
                   "iterations": settings["iterations"], "train_records": TRAIN_RECORDS,
                   "test_records": TEST_RECORDS, "loss": caffe["loss"],
                   "test": caffe["test"],
                   "source": "BVLC Caffe master 9b89154 (CPU, OpenBLAS, Boost 1.74), "
                             "`caffe train` log lines, by tools/caffe_lenet_losses.py"}
        Path(args.write).write_text(json.dumps(fixture, indent=1) + "\n")
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
