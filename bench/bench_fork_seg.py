"""The segmentation fork layers on the sizes published nets give them: median ms of
forward and of forward + backward, by protonet's layer and by the plain alternative
it chose against (same run, same machine: compare within a row).

- Interp: PSPNet's last layer, 150 x 60 x 60 -> 473 x 473 (torch's align-corners
  kernel, what the layer runs).
- Upsample: SegNet's first decoder, 64 x 180 x 240 -> 360 x 480 with a kernel-2 mask
  (max_unpool2d after the repeat check), and a kernel-3 stride-2 mask, whose repeats
  take the explicit last-writer path; `max_unpool2d` alone is the floor.
- BN: 512 x 60 x 60, PSPNet's frozen statistics (one batch-norm pass without a
  gradient; the fork's steps with one) and SegNet's LEARN mode.

    python bench/bench_fork_seg.py [--iterations 5] [--gpu]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protonet.io.text import parse_text  # noqa: E402
from protonet.layers import layer_class  # noqa: E402
from protonet.proto import caffe_pb2  # noqa: E402


def layer(text: str, *shapes, device):
    bottoms = " ".join(f'bottom: "b{i}"' for i in range(len(shapes)))
    param = parse_text(f'name: "L" {bottoms} top: "t" {text}', caffe_pb2.LayerParameter())
    made = layer_class(param.type)(param, caffe_pb2.TRAIN)
    made.setup([tuple(s) for s in shapes])
    return made.to(device)


def median_ms(fn, iterations: int, device) -> float:
    times = []
    for _ in range(iterations + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[1:])


def forward_backward(fn, x):
    def run():
        x.grad = None
        fn(x).sum().backward()
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if args.gpu else "cpu")
    torch.manual_seed(0)
    rows = []

    x = torch.randn(1, 150, 60, 60, device=device, requires_grad=True)
    interp = layer('type: "Interp" interp_param { height: 473 width: 473 }', x.shape,
                   device=device)
    with torch.no_grad():
        rows.append(("Interp 150x60x60 -> 473x473", "forward",
                     median_ms(lambda: interp(x), args.iterations, device)))
    rows.append(("", "forward+backward",
                 median_ms(forward_backward(interp, x), args.iterations, device)))

    for kernel, stride in ((2, 2), (3, 2)):
        big = torch.randn(1, 64, 360, 480, device=device)
        pooled, index = F.max_pool2d(big, kernel, stride, ceil_mode=True, return_indices=True)
        pooled.requires_grad_()
        up = layer('type: "Upsample" upsample_param { upsample_h: 360 upsample_w: 480 }',
                   pooled.shape, pooled.shape, device=device)
        mask = index.float()
        name = f"Upsample 64x{pooled.shape[2]}x{pooled.shape[3]} (pool {kernel}/{stride})"
        with torch.no_grad():
            rows.append((name, "forward", median_ms(lambda: up(pooled, mask),
                                                    args.iterations, device)))
            if kernel == stride:
                rows.append(("", "max_unpool2d alone", median_ms(
                    lambda: F.max_unpool2d(pooled, index, kernel, stride,
                                           output_size=(360, 480)), args.iterations, device)))
        rows.append(("", "forward+backward", median_ms(
            forward_backward(lambda v: up(v, mask), pooled), args.iterations, device)))

    x = torch.randn(1, 512, 60, 60, device=device, requires_grad=True)
    for text, name in (('bn_param { frozen: true }', "BN PSPNet frozen 512x60x60"),
                       ('bn_param { bn_mode: LEARN }', "BN SegNet LEARN 512x60x60")):
        bn = layer(f'type: "BN" {text}', x.shape, device=device)
        with torch.no_grad():
            rows.append((name, "forward, no grad", median_ms(lambda: bn(x), args.iterations,
                                                             device)))
        rows.append(("", "forward+backward", median_ms(forward_backward(bn, x),
                                                       args.iterations, device)))

    print(f"device: {device}, threads: {torch.get_num_threads()}, median of "
          f"{args.iterations}")
    for name, what, ms in rows:
        print(f"{name:<40} {what:<20} {ms:10.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
