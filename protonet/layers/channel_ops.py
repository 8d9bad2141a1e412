"""Channel fork layers of mobile and attention nets: ShuffleChannel, Axpy and
ConvolutionDepthwise.

* ShuffleChannel follows farmingyard/ShuffleNet (shuffle_channel_layer.cpp): with
  `group` g, channel i * (C / g) + j moves to j * g + i; its backward is the inverse
  permutation, which autograd gives.
* Axpy follows SENet's hujie-frank/SENet (axpy_layer.cpp): top = a * X + Y with a
  of shape (N, C) or (N, C, 1, 1) scaling X's channels, bottoms (a, X, Y). Note that
  OpenCV 4's importer computes a * Y + X instead (it scales bottom 2); protonet
  follows the fork. Gradients (sum over space of dtop * X, a * dtop, dtop) are
  autograd's.
* ConvolutionDepthwise follows conv_dw_layer.cpp of the MobileNet/ShuffleNet Caffe
  builds (farmingyard/caffe-mobilenet, copied into many forks): one kh x kw filter
  per input channel, weight (C, 1, kh, kw), bias (C); the top has the bottom's
  channel count whatever num_output says. It is BVLC's Convolution with group = C,
  so it runs on torch's depthwise kernels (cuDNN on CUDA).
"""
from __future__ import annotations

import torch

from .base import Layer
from .conv import Convolution
from .registry import register


@register("ShuffleChannel")
class ShuffleChannel(Layer):
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom_shapes):
        self.group = self.param.shuffle_channel_param.group
        if self.group <= 0:
            raise self.error(f"shuffle_channel_param group must be > 0, got {self.group}")

    def reshape(self, bottom_shapes):
        shape = bottom_shapes[0]
        if len(shape) < 2 or shape[1] % self.group:
            raise self.shape_error(f"group {self.group} must divide the channels of "
                                   f"bottom {list(shape)}")
        return [tuple(shape)]

    def forward(self, x):
        n, c = x.shape[:2]
        rest = tuple(x.shape[2:])
        return (x.reshape((n, self.group, c // self.group) + rest).transpose(1, 2)
                .reshape((n, c) + rest))


@register("Axpy")
class Axpy(Layer):
    exact_bottoms = 3
    exact_tops = 1

    def reshape(self, bottom_shapes):
        a, x, y = (tuple(s) for s in bottom_shapes)
        if len(x) < 2 or len(a) < 2 or a[:2] != x[:2] or any(d != 1 for d in a[2:]):
            raise self.shape_error(f"scale bottom {list(a)} must be (N, C) or (N, C, 1, 1) "
                                   f"for X {list(x)}")
        if x != y:
            raise self.shape_error(f"X {list(x)} and Y {list(y)} must have the same shape")
        return [x]

    def forward(self, a, x, y):
        scale = a.reshape(tuple(a.shape[:2]) + (1,) * (x.dim() - 2))
        return torch.addcmul(y, scale, x)


@register("ConvolutionDepthwise")
class ConvolutionDepthwise(Convolution):
    def setup(self, bottom_shapes):
        shape = bottom_shapes[0]
        if len(shape) != 4:
            raise self.shape_error(f"takes a 4-d bottom (N, C, H, W), got {list(shape)}")
        param = type(self.param)()
        param.CopyFrom(self.param)
        p = param.convolution_param
        if p.axis != 1:
            raise self.error("ConvolutionDepthwise convolves over axis 1 only")
        p.num_output = p.group = shape[1]       # one filter per channel
        self.param = param
        super().setup(bottom_shapes)
