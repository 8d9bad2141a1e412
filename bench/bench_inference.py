"""Inference paths of one deploy net, A/B in one run: NetModule.forward (Caffe-exact,
every blob), NetModule.forward_for_inference (the plan that keeps every blob), the
outputs-only inference plan, pycaffe's Net.forward() (which runs forward_for_inference's
plan where it may, docs/pycaffe.md) and the same held to its layer-by-layer path, and
ONNX Runtime on the file `protonet export` writes (when onnxruntime is installed). Rounds interleave the paths; each figure is the
median over rounds of a median of --iterations calls. Also checks that
forward_for_inference's blobs match NetModule.forward's (max relative error).

Weights are random (bench_nets.randomize), which timing does not mind.

    python bench/bench_inference.py [--model protonet/model_zoo/resnet_50/deploy.prototxt]
                                    [--threads 2] [--iterations 5] [--rounds 3]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import bench_nets  # noqa: E402
import protonet  # noqa: E402
from protonet.io.upgrade import read_net  # noqa: E402
from protonet.net.module import NetModule  # noqa: E402
from protonet.proto import caffe_pb2  # noqa: E402
from protonet.speed import keep_freed_memory  # noqa: E402
from protonet.timing import median_ms, random_inputs  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "protonet" / "model_zoo" / "resnet_50"
                                               / "deploy.prototxt"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    net = NetModule(read_net(args.model), phase=caffe_pb2.TEST).use_channels_last()
    bench_nets.randomize(net)
    inputs = random_inputs(net, "cpu")
    with torch.no_grad():
        want, _ = net(inputs)
    got, _ = net.forward_for_inference(inputs)
    err = max(float((g - w).abs().max() / w.abs().max().clamp(min=1e-30))
              for g, w in zip(got, want) if w is not None and w.is_floating_point())
    missing = sum(1 for g, w in zip(got, want) if (g is None) != (w is None))
    print(f"{args.model}: {len(want)} blobs, forward_for_inference max relative error "
          f"{err:.1e}, {missing} missing; {args.threads} threads")
    plan = net.optimize_for_inference()

    def exact():
        with torch.no_grad():
            net(inputs)

    paths = {"NetModule.forward": exact,
             "forward_for_inference": lambda: net.forward_for_inference(inputs),
             "inference plan (outputs)": lambda: plan(inputs)}
    for name, plannable in (("Net.forward()", True), ("Net.forward() layer by layer", False)):
        pynet = protonet.Net(args.model, protonet.TEST)
        bench_nets.randomize(pynet.module)
        for blob, tensor in inputs.items():
            pynet.blobs[blob].data[...] = tensor.numpy()
        pynet._plannable = plannable        # False: what Net.forward ran before the plan
        pynet.forward()
        pynet.forward()                     # the plan is built on the second
        paths[name] = pynet.forward
    with tempfile.TemporaryDirectory() as tmp:
        try:
            import onnxruntime as ort
            onnx = Path(tmp) / "net.onnx"
            subprocess.run([sys.executable, "-m", "protonet", "-q", "export", "--model",
                            args.model, "--onnx", str(onnx)], check=True, cwd=REPO)
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
            session = ort.InferenceSession(str(onnx), options,
                                           providers=["CPUExecutionProvider"])
            feed = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
            paths["ONNX Runtime"] = lambda: session.run(None, feed)
        except ImportError:
            print("onnxruntime not installed: no ONNX Runtime figure")
        times = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, fn in paths.items():
                times[name].append(median_ms(fn, args.iterations, torch.device("cpu"),
                                             warmup=1))
    for name, values in times.items():
        values.sort()
        print(f"  {name:<30} {values[len(values) // 2]:8.1f} ms   rounds "
              + " ".join(f"{v:.1f}" for v in values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
