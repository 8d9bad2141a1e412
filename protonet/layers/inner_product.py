"""InnerProduct and Embed: dense layers with Caffe's weight layouts.

InnerProduct flattens every axis from `axis` on into K inputs; its weight is
[num_output, K], or [K, num_output] with `transpose: true`. Embed looks up rows of
an [input_dim, num_output] table by integer-valued float indices.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Layer
from .registry import register


@register("InnerProduct")
class InnerProduct(Layer):
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom_shapes):
        p = self.param.inner_product_param
        shape = bottom_shapes[0]
        if p.num_output <= 0:
            raise self.error("num_output must be positive")
        self.axis = self.canonical_axis(p.axis, len(shape))
        self.k = math.prod(shape[self.axis:])
        self.transpose = p.transpose
        weight = (self.k, p.num_output) if p.transpose else (p.num_output, self.k)
        self.add_blob(weight, p.weight_filler)
        self.bias_term = p.bias_term
        if p.bias_term:
            self.add_blob((p.num_output,), p.bias_filler)

    def reshape(self, bottom_shapes):
        shape = bottom_shapes[0]
        k = math.prod(shape[self.axis:]) if len(shape) > self.axis else -1
        if k != self.k:
            raise self.shape_error(f"bottom {list(shape)} has {k} inputs from axis "
                                   f"{self.axis}; the weights were made for {self.k}")
        return [tuple(shape[:self.axis]) + (self.param.inner_product_param.num_output,)]

    def forward(self, x):
        lead = x.shape[:self.axis]
        flat = x.reshape(math.prod(lead), self.k)
        weight = self.blobs[0].t() if self.transpose else self.blobs[0]
        y = F.linear(flat, weight, self.blobs[1] if self.bias_term else None)
        return y.reshape(tuple(lead) + (y.shape[1],))


@register("Embed")
class Embed(Layer):
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom_shapes):
        p = self.param.embed_param
        if p.num_output <= 0 or p.input_dim <= 0:
            raise self.error("num_output and input_dim must be positive")
        self.add_blob((p.input_dim, p.num_output), p.weight_filler)
        self.bias_term = p.bias_term
        if p.bias_term:
            self.add_blob((p.num_output,), p.bias_filler)

    def reshape(self, bottom_shapes):
        return [tuple(bottom_shapes[0]) + (self.param.embed_param.num_output,)]

    def allow_force_backward(self, bottom_index):
        return False   # the bottom holds indices

    def forward(self, x):
        index = x.detach().long()
        if not torch.equal(index.to(x.dtype), x.detach()):
            raise self.error("bottom must hold integer indices")
        if index.numel() and (index.min() < 0 or index.max() >= self.blobs[0].shape[0]):
            raise self.error(f"index out of range [0, {self.blobs[0].shape[0]})")
        y = F.embedding(index, self.blobs[0])
        return y + self.blobs[1] if self.bias_term else y
