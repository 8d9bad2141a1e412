"""Local response normalization, both of Caffe's regions.

ACROSS_CHANNELS: x / (k + alpha/size * sum of x^2 over `size` neighbouring channels)^beta.
WITHIN_CHANNEL: Caffe composes square -> AVE pooling (its clipped divisor) -> power
with shift 1 (k is not used) -> product; we compute the same composition.
"""
from __future__ import annotations

import torch.nn.functional as F

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
        squares = F.pad((x * x).unsqueeze(1), (0, 0, 0, 0, self.pre_pad,
                                               self.size - 1 - self.pre_pad))
        window = F.avg_pool3d(squares, (self.size, 1, 1), stride=1,
                              divisor_override=1).squeeze(1)
        scale = self.k + (self.alpha / self.size) * window
        return x * scale.pow(-self.beta)

    def _within(self, x):
        kernel, pad = (self.size, self.size), (self.pre_pad, self.pre_pad)
        out = tuple(pooled_size(x.shape[2 + i], self.size, self.pre_pad, 1, True)
                    for i in range(2))
        pooled = ave_pool(x * x, kernel, pad, (1, 1), out)
        return x * (1.0 + self.alpha * pooled).pow(-self.beta)
