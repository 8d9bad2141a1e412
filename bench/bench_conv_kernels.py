"""oneDNN (torch's CPU convolution) against the kernels protonet.layers.conv_kernels
picks, on the convolution shapes of ResNet-50 (batch 1), GoogLeNet (batch 10) and
LeNet (batch 64), channels-last as protonet trains on the CPU.

For each shape: median ms of the forward, of the weight gradient alone (what
`caffe time` asks of a deploy net) and of the bottom and weight gradients together
(a training step), by F.conv2d and by protonet's choice, with the kernel chosen.

    python bench/bench_conv_kernels.py [--iterations 20] [--threads N]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protonet.layers import conv_kernels  # noqa: E402
from protonet.speed import keep_freed_memory, to_channels_last  # noqa: E402

# (net, batch, in, out, size, kernel, stride, pad)
SHAPES = [
    ("ResNet-50", 1, 64, 256, 56, 1, 1, 0), ("ResNet-50", 1, 256, 64, 56, 1, 1, 0),
    ("ResNet-50", 1, 64, 64, 56, 3, 1, 1), ("ResNet-50", 1, 256, 128, 56, 1, 2, 0),
    ("ResNet-50", 1, 128, 128, 28, 3, 1, 1), ("ResNet-50", 1, 512, 128, 28, 1, 1, 0),
    ("ResNet-50", 1, 1024, 256, 14, 1, 1, 0), ("ResNet-50", 1, 256, 256, 14, 3, 1, 1),
    ("ResNet-50", 1, 2048, 512, 7, 1, 1, 0), ("ResNet-50", 1, 512, 512, 7, 3, 1, 1),
    ("ResNet-50", 1, 512, 2048, 7, 1, 1, 0),
    ("GoogLeNet", 10, 192, 64, 28, 1, 1, 0), ("GoogLeNet", 10, 96, 128, 28, 3, 1, 1),
    ("GoogLeNet", 10, 480, 192, 14, 1, 1, 0), ("GoogLeNet", 10, 96, 208, 14, 3, 1, 1),
    ("GoogLeNet", 10, 832, 384, 7, 1, 1, 0), ("GoogLeNet", 10, 192, 384, 7, 3, 1, 1),
    ("LeNet", 64, 1, 20, 28, 5, 1, 0), ("LeNet", 64, 20, 50, 12, 5, 1, 0),
]


def median_ms(fn, iterations: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def figures(conv, x, w, b, stride, pad, iterations: int) -> tuple[float, float, float]:
    args = ((stride, stride), (pad, pad), (1, 1), 1)
    with torch.no_grad():
        forward = median_ms(lambda: conv(x.detach(), w, b, *args), iterations)
    dy = torch.ones_like(conv(x.detach(), w, b, *args))

    def weight_grad():
        y = conv(x.detach(), w, b, *args)
        torch.autograd.grad(y, [w, b], dy)

    def both():
        y = conv(x, w, b, *args)
        torch.autograd.grad(y, [x, w, b], dy)
    return forward, median_ms(weight_grad, iterations), median_ms(both, iterations)


def torch_conv(x, w, b, stride, pad, dilation, groups):
    return F.conv2d(x, w, b, stride, pad, dilation, groups)


def chosen(n, cin, size, k, stride, pad) -> str:
    if k == 1 and pad == 0 and cin > 1:
        return "GEMM (1x1)"
    out = (size + 2 * pad - k) // stride + 1
    positions = n * out * out
    if cin > 1 and positions <= conv_kernels.IM2COL_POSITIONS:
        return "im2col + GEMM"
    if cin > 1 and positions <= conv_kernels.GEMM_WEIGHT_GRAD_POSITIONS:
        return "oneDNN + GEMM dW"
    return "oneDNN"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median ms of "
          f"{args.iterations}; oneDNN = F.conv2d, ours = conv_kernels.conv2d")
    print(f"{'shape':42s} {'forward':>15s} {'weight grad':>15s} {'both grads':>15s}  kernel")
    print(f"{'':42s} {'oneDNN   ours':>15s} {'oneDNN   ours':>15s} {'oneDNN   ours':>15s}")
    totals = [0.0] * 6
    for net, n, cin, cout, size, k, stride, pad in SHAPES:
        gen = torch.Generator().manual_seed(0)
        x = to_channels_last(torch.randn(n, cin, size, size, generator=gen)).requires_grad_()
        w = (torch.randn(cout, cin, k, k, generator=gen) * 0.05).requires_grad_()
        b = torch.zeros(cout, requires_grad=True)
        theirs = figures(torch_conv, x, w, b, stride, pad, args.iterations)
        ours = figures(conv_kernels.conv2d, x, w, b, stride, pad, args.iterations)
        for i in range(3):
            totals[2 * i] += theirs[i]
            totals[2 * i + 1] += ours[i]
        label = f"{net} b{n} {cin}->{cout} {size}x{size} k{k} s{stride}"
        cells = " ".join(f"{a:7.2f}{o:7.2f} " for a, o in zip(theirs, ours))
        print(f"{label:42s} {cells} {chosen(n, cin, size, k, stride, pad)}")
    cells = " ".join(f"{totals[2 * i]:7.2f}{totals[2 * i + 1]:7.2f} " for i in range(3))
    print(f"{'sum':42s} {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
