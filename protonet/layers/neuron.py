"""Element-wise ("neuron") layers: one bottom, one top of the same shape.

Most of them are a torch expression whose autograd equals Caffe's backward. Where
Caffe's backward is not the derivative of its forward (Power's formula through the
output, Threshold's missing backward) a small autograd Function carries Caffe's
rule, and where the two agree only for a particular choice at a kink (ReLU at 0,
Clip at its bounds) the forward is written so that autograd makes Caffe's choice.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .. import rng
from ..proto import caffe_pb2
from .base import Layer
from .registry import register


class Neuron(Layer):
    """Caffe's NeuronLayer: exactly one bottom and one top, shaped like the bottom."""
    exact_bottoms = 1
    exact_tops = 1


@register("ReLU")
class ReLU(Neuron):
    """max(x, 0) + negative_slope * min(x, 0); the gradient at 0 is the slope."""

    def forward(self, x):
        # relu's and leaky_relu's gradients take the slope side at 0, as Caffe does.
        slope = self.param.relu_param.negative_slope
        return torch.relu(x) if slope == 0 else F.leaky_relu(x, slope)


@register("PReLU")
class PReLU(Neuron):
    """ReLU with a learned negative slope per channel (axis 1) or one shared slope."""

    def setup(self, bottom_shapes):
        self._check_axes(bottom_shapes[0])
        p = self.param.prelu_param
        shape = () if p.channel_shared else (bottom_shapes[0][1],)
        filler = p.filler if p.HasField("filler") else \
            caffe_pb2.FillerParameter(type="constant", value=0.25)
        self.add_blob(shape, filler)

    def reshape(self, bottom_shapes):
        self._check_axes(bottom_shapes[0])
        channels = bottom_shapes[0][1]
        if not self.param.prelu_param.channel_shared and self.blobs[0].numel() != channels:
            raise self.shape_error(f"has {self.blobs[0].numel()} slopes for a bottom with "
                                   f"{channels} channels")
        return [tuple(bottom_shapes[0])]

    def _check_axes(self, shape):
        if len(shape) < 2:
            raise self.shape_error(f"needs a bottom with at least 2 axes, got {list(shape)}")

    def forward(self, x):
        slope = self.blobs[0]
        if slope.dim() == 1:
            slope = slope.reshape((1, -1) + (1,) * (x.dim() - 2))
        return torch.where(x > 0, x, x * slope)


@register("ELU")
class ELU(Neuron):
    """x for x > 0, alpha * (exp(x) - 1) otherwise; the gradient at 0 is alpha."""

    def forward(self, x):
        alpha = self.param.elu_param.alpha
        return torch.where(x > 0, x, alpha * (torch.exp(x.clamp(max=0)) - 1))


@register("Sigmoid")
class Sigmoid(Neuron):
    """1 / (1 + exp(-x))."""

    def forward(self, x):
        return torch.sigmoid(x)


@register("TanH")
class TanH(Neuron):
    """tanh(x)."""

    def forward(self, x):
        return torch.tanh(x)


@register("AbsVal")
class AbsVal(Neuron):
    """|x|, with gradient sign(x) (0 at 0). Caffe forbids running it in place."""

    def setup(self, bottom_shapes):
        if self.param.top[0] == self.param.bottom[0]:
            raise self.error("does not allow in-place computation (top and bottom "
                             f"are both '{self.param.top[0]}')")

    def forward(self, x):
        return torch.abs(x)


class _CaffePower(torch.autograd.Function):
    """(shift + scale * x) ** power with Caffe's backward, which divides the output by
    the base (NaN where the base is 0, except for power 1 and 2)."""

    @staticmethod
    def forward(ctx, x, power, scale, shift):
        ctx.constants = power, scale, shift
        if power * scale == 0:
            return torch.full_like(x, shift).pow_(power)
        y = torch.pow(x * scale + shift, power)
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, grad):
        power, scale, shift = ctx.constants
        diff_scale = power * scale
        if diff_scale == 0:
            return torch.zeros_like(grad), None, None, None
        x, y = ctx.saved_tensors
        if power == 1:
            local = torch.full_like(x, diff_scale)
        elif power == 2:
            local = x * (diff_scale * scale) + diff_scale * shift
        elif shift == 0:
            local = y / x * power
        else:
            local = y / (x * scale + shift) * diff_scale
        return grad * local, None, None, None


@register("Power")
class Power(Neuron):
    """(shift + scale * x) ** power."""

    def forward(self, x):
        p = self.param.power_param
        return _CaffePower.apply(x, p.power, p.scale, p.shift)


def _log_of_base(layer: Layer, base: float) -> float:
    """ln(base), with base -1 meaning e; rejects bases Caffe rejects."""
    if base == -1:
        return 1.0
    if not base > 0 or math.isinf(base):
        raise layer.error(f"base must be -1 (for e) or a finite positive number, got {base}")
    return math.log(base)


@register("Exp")
class Exp(Neuron):
    """base ** (shift + scale * x); base -1 means e."""

    def setup(self, bottom_shapes):
        p = self.param.exp_param
        log_base = _log_of_base(self, p.base)
        self.inner_scale = log_base * p.scale
        base = math.e if p.base == -1 else p.base
        self.outer_scale = 1.0 if p.shift == 0 else math.pow(base, p.shift)

    def forward(self, x):
        return torch.exp(x * self.inner_scale) * self.outer_scale


@register("Log")
class Log(Neuron):
    """log_base(shift + scale * x); base -1 means e."""

    def setup(self, bottom_shapes):
        p = self.param.log_param
        log_base = _log_of_base(self, p.base)
        if log_base == 0:
            raise self.error("base 1 has no logarithm (1/log(1) is infinite)")
        self.base_scale = 1.0 / log_base

    def forward(self, x):
        p = self.param.log_param
        return torch.log(x * p.scale + p.shift) * self.base_scale


@register("BNLL")
class BNLL(Neuron):
    """Binomial normal log likelihood: log(1 + exp(x)), computed without overflow."""

    def forward(self, x):
        return F.softplus(x)


class _CaffeThreshold(torch.autograd.Function):
    """x > threshold as 1/0; Caffe has no backward for it, so asking for one fails."""

    @staticmethod
    def forward(ctx, x, threshold, layer):
        ctx.layer = layer
        return (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        raise ctx.layer.error("has no backward pass in Caffe; keep it off the path "
                              "from a loss to anything that needs a gradient")


@register("Threshold")
class Threshold(Neuron):
    """1 where x > threshold, else 0."""

    def forward(self, x):
        return _CaffeThreshold.apply(x, self.param.threshold_param.threshold, self)


@register("Dropout")
class Dropout(Neuron):
    """TRAIN: keep each unit with probability 1 - p and scale kept units by 1/(1 - p);
    TEST: identity (a copy when top and bottom are separate blobs, else the bottom)."""

    def setup(self, bottom_shapes):
        p = self.param.dropout_param
        if not 0 <= p.dropout_ratio < 1:
            raise self.error(f"dropout_ratio must be in [0, 1), got {p.dropout_ratio}")
        self.in_place = list(self.param.top) == list(self.param.bottom)

    def forward(self, x):
        ratio = self.param.dropout_param.dropout_ratio
        if self.phase == caffe_pb2.TRAIN:
            scale = float(np.float32(1.0 / (1.0 - ratio)))     # Caffe's float scale_
            if rng.seeded() and not torch.jit.is_tracing() and \
                    not torch.compiler.is_compiling():
                # Caffe's CPU draw, caffe_rng_bernoulli(count, 1. - threshold_) (a double
                # p), made on the host and moved; GPU Caffe draws with curand instead.
                keep = rng.caffe_rng().bernoulli(x.numel(), 1.0 - ratio, double=True)
                mask = torch.from_numpy(keep).reshape(x.shape).to(device=x.device,
                                                                  dtype=x.dtype).mul_(scale)
                return x * mask
            # The kept mask times the scale is 0 or 1/(1 - p) exactly: one pass over x.
            mask = torch.empty_like(x).bernoulli_(1.0 - ratio).mul_(scale)
            return x * mask
        return x if self.in_place else x.clone()


@register("Clip")
class Clip(Neuron):
    """max(min, min(x, max)); the gradient passes where min <= x <= max."""

    def forward(self, x):
        p = self.param.clip_param
        return x.clamp(max=p.max).clamp(min=p.min)


@register("Swish")
class Swish(Neuron):
    """x * sigmoid(beta * x)."""

    def forward(self, x):
        return x * torch.sigmoid(x * self.param.swish_param.beta)
