"""protonet against BVLC Caffe on the same prototxt files, in the same run.

For each net (bench/nets/, made by bench/make_train_nets.py) it prints the table of
issue 15, every figure what a command prints:

- inference: `caffe time --phase TEST` on the deploy net, its "Average Forward pass",
  against `protonet time --phase TEST` on the same file, its whole-net "forward
  (inference plan)" median;
- train step: `caffe time` on the *_train net (DummyData + SoftmaxWithLoss), its
  "Average Forward-Backward", against `protonet time` on it, its whole-net
  "forward+backward" median (the same gradients as Caffe's, see protonet.timing).

Each command runs --rounds times, interleaved (caffe, protonet, caffe, ...), and the
table holds the median of the rounds: the machine may be shared, and interleaving
spreads load changes over both sides. Both get the same thread count (OMP, OpenBLAS,
MKL). Ratios are Caffe ms / protonet ms (> 1: protonet faster). Without a caffe
binary (--caffe, else `caffe` on PATH) only protonet's columns are printed.

With --onnx, two more inference columns: ONNX Runtime on the file `protonet export`
writes for the deploy net, and pycaffe-style `Net.forward()`, both timed in this
process (median of --iterations after a warm-up).

    python bench/bench_caffe.py [--nets alexnet,googlenet,resnet50,lenet]
        [--iterations 10] [--rounds 3] [--threads 2] [--caffe PATH] [--onnx]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NETS = REPO / "bench" / "nets"
ZOO = REPO / "protonet" / "model_zoo"
DEPLOY = {"alexnet": ZOO / "bvlc_alexnet" / "deploy.prototxt",
          "googlenet": ZOO / "bvlc_googlenet" / "deploy.prototxt",
          "resnet50": ZOO / "resnet_50" / "deploy.prototxt",
          "lenet": NETS / "lenet_deploy.prototxt"}
TITLES = {"alexnet": "AlexNet (10)", "googlenet": "GoogLeNet (10)",
          "resnet50": "ResNet-50 (1)", "lenet": "LeNet (64)"}

CAFFE_FORWARD = re.compile(r"Average Forward pass: ([\d.]+) ms")
CAFFE_BOTH = re.compile(r"Average Forward-Backward: ([\d.]+) ms")
PROTONET_WHOLE = re.compile(r"Whole net, median: forward \(inference plan\) ([\d.]+) ms, "
                            r"forward\+backward ([\d.]+) ms")


def thread_env(threads: int) -> dict:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")]
                                                       if p])
    return env


def run(cmd: list[str], env: dict) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(cmd)} failed:\n  " + "\n  ".join(tail))
    return done.stdout + done.stderr


def caffe_time(caffe: str, model: Path, iterations: int, phase: str, env: dict) -> str:
    return run([caffe, "time", f"--model={model}", f"--iterations={iterations}",
                f"--phase={phase}"], env)


def protonet_time(model: Path, iterations: int, phase: str, env: dict) -> str:
    return run([sys.executable, "-m", "protonet", "time", "--model", str(model),
                "--iterations", str(iterations), "--phase", phase], env)


def figure(pattern: re.Pattern, text: str, group: int = 1) -> float:
    found = pattern.search(text)
    if not found:
        raise RuntimeError(f"no '{pattern.pattern}' in the output:\n{text[-2000:]}")
    return float(found.group(group))


def measure(name: str, args, caffe: str | None, env: dict) -> dict[str, list[float]]:
    """{column: figures of each round}."""
    deploy, train = DEPLOY[name], NETS / f"{name}_train.prototxt"
    out: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        if caffe:
            out.setdefault("caffe_fwd", []).append(figure(
                CAFFE_FORWARD, caffe_time(caffe, deploy, args.iterations, "TEST", env)))
        out.setdefault("ours_fwd", []).append(figure(
            PROTONET_WHOLE, protonet_time(deploy, args.iterations, "TEST", env)))
        if caffe:
            out.setdefault("caffe_train", []).append(figure(
                CAFFE_BOTH, caffe_time(caffe, train, args.iterations, "TRAIN", env)))
        out.setdefault("ours_train", []).append(figure(
            PROTONET_WHOLE, protonet_time(train, args.iterations, "TRAIN", env), 2))
    return out


def onnx_and_net_forward(name: str, iterations: int, workdir: Path,
                         env: dict) -> tuple[float | None, float]:
    """(ONNX Runtime ms on `protonet export`'s file or None, Net.forward() ms)."""
    import numpy as np
    import torch

    import protonet
    from protonet.timing import median_ms
    deploy = DEPLOY[name]
    net = protonet.Net(str(deploy), protonet.TEST)
    data = np.random.default_rng(0).standard_normal(net.blobs["data"].data.shape,
                                                    dtype=np.float32)
    net.blobs["data"].data[...] = data
    forward = median_ms(net.forward, iterations, torch.device("cpu"), warmup=2)
    try:
        import onnxruntime as ort
    except ImportError:
        return None, forward
    path = workdir / f"{name}.onnx"
    run([sys.executable, "-m", "protonet", "export", "--model", str(deploy), "--onnx",
         str(path)], env)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: data}
    return median_ms(lambda: session.run(None, feed), iterations, torch.device("cpu"),
                     warmup=2), forward


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default="alexnet,googlenet,resnet50,lenet")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--caffe", default=shutil.which("caffe"),
                        help="caffe binary (default: `caffe` on PATH)")
    parser.add_argument("--onnx", action="store_true",
                        help="also ONNX Runtime and Net.forward() inference")
    args = parser.parse_args(argv)
    names = [n for n in args.nets.split(",") if n]
    for n in names:
        if n not in DEPLOY:
            parser.error(f"unknown net '{n}' (known: {', '.join(DEPLOY)})")
    env = thread_env(args.threads)
    os.environ.update({k: env[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                           "MKL_NUM_THREADS")})
    caffe = args.caffe if args.caffe and Path(args.caffe).exists() else None
    print(f"{args.threads} threads, {args.iterations} iterations per command, median of "
          f"{args.rounds} interleaved rounds; caffe: {caffe or 'not found'}; load average "
          f"{os.getloadavg()[0]:.1f}")
    head = f"{'net (batch)':<16}{'inference ms: Caffe':>20}{'protonet':>10}{'ratio':>7}" \
           f"{'train step ms: Caffe':>22}{'protonet':>10}{'ratio':>7}"
    if args.onnx:
        head += f"{'ORT':>9}{'Net.forward':>13}"
    print(head)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            got = {k: statistics.median(v) for k, v in measure(name, args, caffe,
                                                                env).items()}
            line = f"{TITLES[name]:<16}"
            for side in ("fwd", "train"):
                ours, theirs = got[f"ours_{side}"], got.get(f"caffe_{side}")
                width = 20 if side == "fwd" else 22
                line += (f"{theirs:>{width}.1f}" if theirs else f"{'-':>{width}}") + \
                    f"{ours:>10.1f}" + (f"{theirs / ours:>6.2f}x" if theirs else f"{'-':>7}")
            if args.onnx:
                ort_ms, forward_ms = onnx_and_net_forward(name, args.iterations, Path(tmp),
                                                          env)
                line += (f"{ort_ms:>9.1f}" if ort_ms else f"{'-':>9}") + f"{forward_ms:>13.1f}"
            print(line, flush=True)
    print(f"load average after {os.getloadavg()[0]:.1f}; {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
