"""Which kernel computes a 2-D convolution on the CPU, chosen by shape.

torch's CPU convolution is oneDNN's, which is fast for large images but not for two
shapes that dominate CPU training of deep nets (measured on 2 AVX-512 cores, torch
2.13; bench/bench_conv_kernels.py prints the figures):

- a 1x1 convolution (ResNet's bottlenecks, GoogLeNet's reductions) is a matrix product
  over channels, which is how Caffe computes it too (no im2col). On channels-last
  activations it is one GEMM with no copy at all, for the forward and both gradients;
  oneDNN reorders the weight on every call and its weight gradient is 3-10x slower
  when the image is small (1024->256 at 14x14: 0.94 ms against 0.35 ms);
- a kxk convolution over few output positions (N*OH*OW small: the last stages of
  ResNet at batch 1): oneDNN's weight gradient takes 6.7 ms for 512->512 3x3 at 7x7
  where Caffe's im2col + GEMM takes 1 ms, and its forward reorders the 9 MB weight on
  every call. Up to `IM2COL_POSITIONS` output positions the whole convolution is
  im2col + GEMM (the gradients GEMM + col2im); up to `GEMM_WEIGHT_GRAD_POSITIONS`
  only the weight gradient is, the forward and bottom gradient staying oneDNN's.
  (ResNet-50 batch 1, forward + param gradients: 146 ms with neither, 131 ms with both;
  the limits were swept on the nets of bench/bench_nets.py.)

Both apply to channels-last bottoms (what protonet trains with on the CPU) with one
group and no dilation; everything else is F.conv2d. Values agree with F.conv2d to
float rounding (summation order differs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .inner_product import _OneDnnLinear, _onednn_applies

# Output positions (N*OH*OW) at or under which a kxk convolution is im2col + GEMM
# throughout, and its weight gradient alone.
IM2COL_POSITIONS = 64
GEMM_WEIGHT_GRAD_POSITIONS = 256


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias, stride, pad, dilation,
           groups: int) -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride, pad, dilation, groups), by the fastest kernel."""
    if groups == 1 and x.device.type == "cpu" and x.dim() == 4 and \
            tuple(dilation) == (1, 1) and _channels_last(x):
        kernel = weight.shape[2:]
        if tuple(kernel) == (1, 1) and tuple(pad) == (0, 0):
            return _pointwise(x, weight, bias, stride)
        out = (_out(x.shape[2], kernel[0], stride[0], pad[0]),
               _out(x.shape[3], kernel[1], stride[1], pad[1]))
        positions = x.shape[0] * out[0] * out[1]
        if positions <= IM2COL_POSITIONS:
            return _im2col(x, weight, bias, stride, pad, out)
        if positions <= GEMM_WEIGHT_GRAD_POSITIONS and torch.is_grad_enabled() and \
                weight.requires_grad:
            return _GemmWeightGradConv.apply(x, weight, bias, tuple(stride), tuple(pad))
    return F.conv2d(x, weight, bias, stride, pad, dilation, groups)


def _channels_last(x: torch.Tensor) -> bool:
    """Channels are the innermost axis in memory (true NHWC, not merely ambiguous)."""
    return x.stride(1) == 1 and x.shape[1] > 1


def _out(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


def _pointwise(x, weight, bias, stride):
    """A 1x1 convolution as one matrix product on the [N, H, W, C] view of x."""
    if tuple(stride) != (1, 1):
        x = _Subsample.apply(x, tuple(stride))
    rows = x.permute(0, 2, 3, 1)                   # contiguous when x is NHWC and unstrided
    weight = weight.reshape(weight.shape[0], weight.shape[1])
    flat = rows.reshape(-1, rows.shape[-1])
    if _onednn_applies(flat, weight):
        y = _OneDnnLinear.apply(flat, weight, bias)
    else:
        y = F.linear(flat, weight, bias)
    return y.reshape(rows.shape[:3] + (weight.shape[0],)).permute(0, 3, 1, 2)


def _im2col(x, weight, bias, stride, pad, out):
    """Caffe's convolution: im2col, then one matrix product with the [Cout, C*kh*kw]
    weight, giving NHWC rows (oneDNN's in float32, as for a 1x1: at ResNet's 7x7 its
    bottom gradient takes 1.07 ms against MKL's 1.67); the gradients are GEMMs and
    col2im."""
    n, cout = x.shape[0], weight.shape[0]
    cols = F.unfold(_ChannelsLastGrad.apply(x), weight.shape[2:], padding=pad, stride=stride)     # [N, C*kh*kw, L]
    flat = cols.transpose(1, 2).reshape(-1, cols.shape[1])             # [N*L, C*kh*kw]
    weight = weight.reshape(cout, -1)
    if _onednn_applies(flat, weight):
        y = _OneDnnLinear.apply(flat, weight, bias)
    else:
        y = F.linear(flat, weight, bias)
    return y.reshape(n, out[0], out[1], cout).permute(0, 3, 1, 2)


class _Subsample(torch.autograd.Function):
    """x[:, :, ::sh, ::sw], whose gradient is channels-last like x: autograd's slice
    backward scatters into a zeroed NCHW tensor, and one NCHW gradient makes every
    element-wise backward after it (ReLU, the residual sums) mix layouts, several
    times slower than on matching ones."""

    @staticmethod
    def forward(ctx, x, stride):
        ctx.geometry = (x.shape, stride)
        return x[:, :, ::stride[0], ::stride[1]]

    @staticmethod
    def backward(ctx, grad):
        shape, stride = ctx.geometry
        out = torch.empty(shape, dtype=grad.dtype, device=grad.device,
                          memory_format=torch.channels_last).zero_()
        out[:, :, ::stride[0], ::stride[1]] = grad
        return out, None


class _ChannelsLastGrad(torch.autograd.Function):
    """The identity, whose backward hands on a channels-last gradient (F.unfold's
    backward, col2im, writes NCHW; see _Subsample for why that matters)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous(memory_format=torch.channels_last)


class _GemmWeightGradConv(torch.autograd.Function):
    """oneDNN forward and bottom gradient; weight gradient by im2col and one GEMM per
    image (summed), as Caffe computes it. Under autocast the arithmetic runs in the
    autocast dtype, as F.conv2d's would."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, pad):
        dtype = _autocast_dtype(x)
        if dtype is not None:
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        with torch.autocast("cpu", enabled=False):
            y = F.conv2d(x, weight, bias, stride, pad)
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, pad)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        stride, pad = ctx.geometry
        dy = dy.to(x.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                dy, x, weight, None, stride, pad, (1, 1), False, (0, 0), 1,
                (True, False, False))[0]
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(x, dy, weight.shape, stride, pad)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = dy.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


def _weight_grad(x, dy, shape, stride, pad) -> torch.Tensor:
    """sum over images of dY_n [Cout, L] @ cols_n^T [L, C*kh*kw], reshaped to `shape`."""
    cols = F.unfold(x, shape[2:], padding=pad, stride=stride)     # [N, C*kh*kw, L]
    n, out = dy.shape[0], dy.shape[1]
    rows = dy.permute(0, 2, 3, 1).reshape(n, -1, out)              # [N, L, Cout]
    if n == 1:
        grad = torch.mm(rows[0].t(), cols[0].t())
    else:
        grad = torch.bmm(rows.transpose(1, 2), cols.transpose(1, 2)).sum(0)
    return grad.reshape(shape)


def _autocast_dtype(x: torch.Tensor):
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return None
