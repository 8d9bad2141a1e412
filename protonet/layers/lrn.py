"""Local response normalization, both of Caffe's regions.

ACROSS_CHANNELS: x / (k + alpha/size * sum of x^2 over `size` neighbouring channels)^beta.
WITHIN_CHANNEL: Caffe composes square -> AVE pooling (its clipped divisor) -> power
with shift 1 (k is not used) -> product; we compute the same composition.

ACROSS_CHANNELS carries Caffe's backward in an autograd Function:
bottom_diff = top_diff * scale^-beta - (2 alpha beta / size) * x * window_sum(top_diff *
top / scale). The window sums are a few shifted in-place adds (any memory layout),
scale^-beta is exp(-beta * log(scale)) (vectorized, unlike pow with a float exponent),
and half-precision bottoms are normalized in float32.
"""
from __future__ import annotations

import torch

from ..proto import caffe_pb2
from .base import Layer
from .pooling import ave_pool, pooled_size
from .registry import register


@register("LRN")
class LRN(Layer):
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom_shapes):
        p = self.param.lrn_param
        if p.local_size % 2 != 1:
            raise self.error(f"local_size must be odd, got {p.local_size}")
        self.size, self.alpha, self.beta, self.k = p.local_size, p.alpha, p.beta, p.k
        self.pre_pad = (self.size - 1) // 2
        self.within = p.norm_region == caffe_pb2.LRNParameter.WITHIN_CHANNEL

    def reshape(self, bottom_shapes):
        shape = bottom_shapes[0]
        if len(shape) != 4:
            raise self.shape_error(f"needs a 4-axis bottom (num, channels, height, width), "
                                   f"got {list(shape)}")
        return [tuple(shape)]

    def forward(self, x):
        if self.within:
            return self._within(x)
        wide = x if x.dtype in (torch.float32, torch.float64) else x.float()
        if torch.is_grad_enabled() and x.requires_grad:
            top = _AcrossChannels.apply(wide, self.size, self.alpha, self.beta, self.k)
        else:
            top = _power_of_scale(wide, self.size, self.alpha, self.beta, self.k)[1].mul_(wide)
        return top.to(x.dtype)

    def _within(self, x):
        kernel, pad = (self.size, self.size), (self.pre_pad, self.pre_pad)
        out = tuple(pooled_size(x.shape[2 + i], self.size, self.pre_pad, 1, True)
                    for i in range(2))
        pooled = ave_pool(x * x, kernel, pad, (1, 1), out)
        return x * (1.0 + self.alpha * pooled).pow(-self.beta)


def channel_window_sum(t: torch.Tensor, size: int) -> torch.Tensor:
    """Sum over the `size` channels centred on each channel (axis 1), zeros beyond."""
    total = t.clone()
    channels = t.shape[1]
    for shift in range(1, min((size - 1) // 2, channels - 1) + 1):
        total[:, shift:] += t[:, :-shift]
        total[:, :-shift] += t[:, shift:]
    return total


def _power_of_scale(x, size, alpha, beta, k):
    """scale = k + alpha/size * window_sum(x^2), and scale^-beta."""
    scale = channel_window_sum(x * x, size).mul_(alpha / size).add_(k)
    return scale, torch.log(scale).mul_(-beta).exp_()


class _AcrossChannels(torch.autograd.Function):
    """x * scale^-beta with Caffe's backward (saving top / scale, not scale)."""

    @staticmethod
    def forward(ctx, x, size, alpha, beta, k):
        scale, power = _power_of_scale(x, size, alpha, beta, k)
        top = x * power
        ctx.save_for_backward(x, power, top / scale)
        ctx.constants = size, 2.0 * alpha * beta / size
        return top

    @staticmethod
    def backward(ctx, top_diff):
        x, power, top_over_scale = ctx.saved_tensors
        size, coefficient = ctx.constants
        accumulated = channel_window_sum(top_diff * top_over_scale, size)
        bottom_diff = (top_diff * power).addcmul_(x, accumulated, value=-coefficient)
        return bottom_diff, None, None, None, None
