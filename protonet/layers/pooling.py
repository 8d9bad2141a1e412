"""Pooling (MAX, AVE, STOCHASTIC) and SPP with Caffe's window arithmetic.

Caffe rounds the output size up by default (round_mode CEIL), drops a last window
that would start in the right padding, lets windows hang over the image edge, and
divides AVE sums by the window clipped to the padded image (not by the kernel
area). Torch's own padding and ceil arithmetic produce exactly those windows (and
AVE divisors) whenever the pad is at most half the kernel; other geometries are padded
explicitly first. Torch's CPU max pooling is several times faster on channels-last
data, so 4-axis NCHW bottoms take a detour through that layout.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..proto import caffe_pb2
from .base import TRAIN, Layer
from .registry import register

P = caffe_pb2.PoolingParameter


def pooled_size(size: int, kernel: int, pad: int, stride: int, ceil: bool) -> int:
    span = (size + 2 * pad - kernel) / stride
    out = (math.ceil(span) if ceil else math.floor(span)) + 1
    if pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _pad_to_windows(x, kernel, pad, stride, out, fill):
    """Pad (or crop) H and W so that plain strided windows equal Caffe's."""
    pads = []
    for axis in (3, 2):           # F.pad lists the last axis first
        k, p, s, o = kernel[axis - 2], pad[axis - 2], stride[axis - 2], out[axis - 2]
        right = (o - 1) * s + k - x.shape[axis] - p
        pads += [p, right]
    return F.pad(x, pads, value=fill)


def _ave_divisor(size, kernel, pad, stride, out, device):
    """Caffe's per-window AVE divisor along one axis."""
    start = torch.arange(out, device=device) * stride - pad
    end = torch.clamp(start + kernel, max=size + pad)
    return (end - start).to(torch.float32)


def torch_ceil_mode(shape, kernel, pad, stride, out):
    """The ceil_mode that makes torch's pooling windows Caffe's, or None if none does.

    Torch and Caffe agree on window starts, on clipping, and on dropping a last window
    that starts in the right padding; torch only refuses pads above half the kernel.
    """
    for ceil in (False, True):
        sizes = []
        for size, k, p, s in zip(shape[2:4], kernel, pad, stride):
            if 2 * p > k:
                return None
            span = size + 2 * p - k
            n = (-(-span // s) if ceil else span // s) + 1
            if ceil and (n - 1) * s >= size + p:
                n -= 1
            sizes.append(n)
        if tuple(sizes) == tuple(out):
            return ceil
    return None


def _channels_last_detour(pool):
    """Run `pool` on a channels-last copy of an NCHW bottom; tops come back NCHW.
    Not when the bottom needs a gradient: the layout copies in backward cost more
    than the faster kernel saves (LeNet training: 6% slower with the detour)."""
    def run(x, *args, **kwargs):
        if x.device.type != "cpu" or x.dim() != 4 or x.shape[1] < 2 or x.requires_grad or \
                x.is_contiguous(memory_format=torch.channels_last):
            return pool(x, *args, **kwargs)
        out = pool(x.contiguous(memory_format=torch.channels_last), *args, **kwargs)
        if isinstance(out, tuple):
            return tuple(t.contiguous() for t in out)
        return out.contiguous()
    return run


@_channels_last_detour
def max_pool(x, kernel, pad, stride, out, with_mask=False):
    ceil = torch_ceil_mode(x.shape, kernel, pad, stride, out)
    if ceil is not None:
        if not with_mask:
            return F.max_pool2d(x, kernel, stride, pad, ceil_mode=ceil)
        # torch's index is h * width + w in the unpadded bottom: Caffe's mask.
        top, index = F.max_pool2d(x, kernel, stride, pad, ceil_mode=ceil, return_indices=True)
        return top, index.to(torch.float32)
    padded = _pad_to_windows(x, kernel, pad, stride, out, -math.inf)
    if not with_mask:
        return F.max_pool2d(padded, kernel, stride)
    top, index = F.max_pool2d(padded, kernel, stride, return_indices=True)
    width = padded.shape[3]
    row = index.div(width, rounding_mode="floor") - pad[0]
    col = index.remainder(width) - pad[1]
    return top, (row * x.shape[3] + col).to(torch.float32)


@_channels_last_detour
def ave_pool(x, kernel, pad, stride, out):
    ceil = torch_ceil_mode(x.shape, kernel, pad, stride, out)
    if ceil is not None:   # torch's count_include_pad divisor is Caffe's clipped window
        return F.avg_pool2d(x, kernel, stride, pad, ceil_mode=ceil, count_include_pad=True)
    padded = _pad_to_windows(x, kernel, pad, stride, out, 0.0)
    sums = F.avg_pool2d(padded, kernel, stride, divisor_override=1)
    dh = _ave_divisor(x.shape[2], kernel[0], pad[0], stride[0], out[0], x.device)
    dw = _ave_divisor(x.shape[3], kernel[1], pad[1], stride[1], out[1], x.device)
    return sums / (dh[:, None] * dw[None, :]).to(sums.dtype)


def stochastic_pool(x, kernel, stride, out, train: bool):
    """Caffe's GPU-only STOCHASTIC pooling, on any device.

    TRAIN picks one activation per window with probability proportional to its
    value (gradient goes to the pick); TEST returns sum(x^2)/sum(x) per window.
    """
    padded = _pad_to_windows(x, kernel, (0, 0), stride, out, 0.0)
    n, c = x.shape[:2]
    windows = F.unfold(padded.reshape(n * c, 1, *padded.shape[2:]), kernel, stride=stride)
    total = windows.sum(dim=1, keepdim=True)                  # (n*c, 1, L)
    if not train:
        squares = (windows * windows).sum(dim=1, keepdim=True)
        value = torch.where(total > 0, squares / total, torch.zeros_like(total))
        return value.reshape(n, c, *out)
    threshold = torch.rand_like(total) * total
    reached = windows.cumsum(dim=1) >= threshold
    pick = torch.where(reached.any(dim=1, keepdim=True),
                       reached.to(torch.int8).argmax(dim=1, keepdim=True),
                       torch.zeros_like(total, dtype=torch.long))
    return windows.gather(1, pick).reshape(n, c, *out)


class _PoolingGeometry:
    """Kernel, pad and stride from a PoolingParameter, checked as Caffe does."""

    def __init__(self, layer: Layer, p: caffe_pb2.PoolingParameter):
        if p.global_pooling:
            if p.HasField("kernel_size") or p.HasField("kernel_h") or p.HasField("kernel_w"):
                raise layer.error("global_pooling takes no kernel size")
        elif p.HasField("kernel_size") == (p.HasField("kernel_h") and p.HasField("kernel_w")):
            raise layer.error("give kernel_size, or both kernel_h and kernel_w")
        if p.HasField("pad") and (p.HasField("pad_h") or p.HasField("pad_w")) or \
                p.HasField("pad_h") != p.HasField("pad_w"):
            raise layer.error("give pad, or both pad_h and pad_w")
        if p.HasField("stride") and (p.HasField("stride_h") or p.HasField("stride_w")) or \
                p.HasField("stride_h") != p.HasField("stride_w"):
            raise layer.error("give stride, or both stride_h and stride_w")
        self.global_pooling = p.global_pooling
        self.kernel = ((p.kernel_size, p.kernel_size) if p.HasField("kernel_size")
                       else (p.kernel_h, p.kernel_w))
        self.pad = (p.pad_h, p.pad_w) if p.HasField("pad_h") else (p.pad, p.pad)
        self.stride = (p.stride_h, p.stride_w) if p.HasField("stride_h") else (p.stride,) * 2
        self.ceil = p.round_mode == P.CEIL
        if self.global_pooling and (self.pad != (0, 0) or self.stride != (1, 1)):
            raise layer.error("global_pooling needs pad 0 and stride 1")
        if not self.global_pooling and min(self.kernel) <= 0:
            raise layer.error("kernel size must be positive")
        if min(self.stride) <= 0:
            raise layer.error("stride must be positive")
        if any(self.pad):
            if p.pool not in (P.MAX, P.AVE):
                raise layer.error("padding works only with MAX and AVE pooling")
            if not self.global_pooling and (self.pad[0] >= self.kernel[0] or
                                            self.pad[1] >= self.kernel[1]):
                raise layer.error(f"pad {list(self.pad)} must be smaller than the kernel "
                                  f"{list(self.kernel)}")

    def windows(self, shape):
        kernel = tuple(shape[2:4]) if self.global_pooling else self.kernel
        out = tuple(pooled_size(shape[2 + i], kernel[i], self.pad[i], self.stride[i],
                                self.ceil) for i in range(2))
        return kernel, out


@register("Pooling")
class Pooling(Layer):
    exact_bottoms = 1
    min_tops = 1

    @property
    def max_tops(self):  # MAX pooling may also output the argmax mask
        return 2 if self.param.pooling_param.pool == P.MAX else 1

    def setup(self, bottom_shapes):
        self.geometry = _PoolingGeometry(self, self.param.pooling_param)
        self.method = self.param.pooling_param.pool

    def reshape(self, bottom_shapes):
        shape = bottom_shapes[0]
        if len(shape) != 4:
            raise self.shape_error(f"needs a 4-axis bottom (num, channels, height, width), "
                                   f"got {list(shape)}")
        g = self.geometry
        kernel, out = g.windows(shape)
        if min(out) <= 0:
            raise self.shape_error(f"bottom {list(shape)} is too small for kernel "
                                   f"{list(kernel)} (output {list(out)})")
        for i in range(2):   # Caffe reads garbage for a window that starts past the image
            if (out[i] - 1) * g.stride[i] >= shape[2 + i] + g.pad[i]:
                raise self.shape_error(
                    f"with kernel {list(kernel)}, stride {list(g.stride)} and pad "
                    f"{list(g.pad)} the last of {out[i]} windows along axis {2 + i} starts "
                    f"outside the bottom {list(shape)}; Caffe would pool nothing there")
        return [(shape[0], shape[1]) + out] * self.num_tops

    def forward(self, x):
        g = self.geometry
        kernel, out = g.windows(x.shape)
        if self.method == P.MAX:
            return max_pool(x, kernel, g.pad, g.stride, out, with_mask=self.num_tops > 1)
        if self.method == P.AVE:
            return ave_pool(x, kernel, g.pad, g.stride, out)
        return stochastic_pool(x, kernel, g.stride, out, self.phase == TRAIN)


@register("SPP")
class SPP(Layer):
    """Spatial pyramid pooling: 2^l x 2^l bins per level, flattened and concatenated."""
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom_shapes):
        p = self.param.spp_param
        if p.pyramid_height < 1:
            raise self.error("pyramid_height must be at least 1")
        self.height = p.pyramid_height
        self.method = {caffe_pb2.SPPParameter.MAX: P.MAX, caffe_pb2.SPPParameter.AVE: P.AVE,
                       caffe_pb2.SPPParameter.STOCHASTIC: P.STOCHASTIC}[p.pool]

    def _levels(self, shape):
        h, w = shape[2], shape[3]
        for level in range(self.height):
            bins = 2 ** level
            kernel = (math.ceil(h / bins), math.ceil(w / bins))
            pad = ((kernel[0] * bins - h + 1) // 2, (kernel[1] * bins - w + 1) // 2)
            out = (pooled_size(h, kernel[0], pad[0], kernel[0], True),
                   pooled_size(w, kernel[1], pad[1], kernel[1], True))
            if (pad[0] >= kernel[0] or pad[1] >= kernel[1]) and any(pad):
                raise self.shape_error(f"bottom {list(shape)} too small for pyramid level "
                                       f"{level}")
            yield kernel, pad, out

    def reshape(self, bottom_shapes):
        shape = bottom_shapes[0]
        if len(shape) != 4:
            raise self.shape_error(f"needs a 4-axis bottom, got {list(shape)}")
        levels = list(self._levels(shape))
        if self.height == 1:
            return [(shape[0], shape[1]) + levels[0][2]]
        return [(shape[0], sum(shape[1] * o[0] * o[1] for _, _, o in levels))]

    def forward(self, x):
        pooled = []
        for kernel, pad, out in self._levels(x.shape):
            if self.method == P.MAX:
                y = max_pool(x, kernel, pad, kernel, out)
            elif self.method == P.AVE:
                y = ave_pool(x, kernel, pad, kernel, out)
            else:
                y = stochastic_pool(x, kernel, kernel, out, self.phase == TRAIN)
            pooled.append(y)
        if self.height == 1:
            return pooled[0]
        return torch.cat([y.flatten(1) for y in pooled], dim=1)
