"""Convolution, Deconvolution and Im2col: Caffe's geometry on torch's kernels.

Caffe's ConvolutionParameter allows 1-, 2- and 3-D kernels (one value or one per
spatial axis), a channel `axis` with any number of leading batch axes, groups and
dilation. Weights keep Caffe's shapes: [out, in/group, *k] for Convolution and
[in, out/group, *k] for Deconvolution — which is also torch's layout for each.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import conv_kernels
from .base import Layer
from .registry import register

_CONV = {1: F.conv1d, 2: conv_kernels.conv2d, 3: F.conv3d}
_DECONV = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class ConvGeometry:
    """Kernel, stride, pad and dilation per spatial axis, checked like Caffe."""

    def __init__(self, layer: Layer, p, num_spatial: int):
        self.n = num_spatial
        self.kernel = self._values(layer, p, "kernel_size", "kernel_h", "kernel_w", None)
        self.stride = self._values(layer, p, "stride", "stride_h", "stride_w", 1)
        self.pad = self._values(layer, p, "pad", "pad_h", "pad_w", 0)
        if len(p.dilation) not in (0, 1, num_spatial):
            raise layer.error(f"dilation must be given once or once per spatial axis "
                              f"({num_spatial}), got {len(p.dilation)}")
        self.dilation = tuple(
            1 if not p.dilation else p.dilation[0 if len(p.dilation) == 1 else i]
            for i in range(num_spatial))
        for name in ("kernel", "stride", "dilation"):
            if any(v <= 0 for v in getattr(self, name)):
                raise layer.error(f"{name} must be positive, got {list(getattr(self, name))}")

    def _values(self, layer, p, repeated, h, w, default):
        if p.HasField(h) or p.HasField(w):
            if self.n != 2:
                raise layer.error(f"{h}/{w} work only for 2-D convolution "
                                  f"({self.n} spatial axes here)")
            if len(getattr(p, repeated)):
                raise layer.error(f"give either {repeated} or {h}/{w}, not both")
            return (getattr(p, h), getattr(p, w))
        values = list(getattr(p, repeated))
        allowed = (1, self.n) if default is None else (0, 1, self.n)
        if len(values) not in allowed:
            raise layer.error(f"{repeated} must be given once or once per spatial axis "
                              f"({self.n}), got {len(values)}")
        if not values:
            return (default,) * self.n
        return tuple(values[0 if len(values) == 1 else i] for i in range(self.n))

    def conv_out(self, size: int, i: int) -> int:
        extent = self.dilation[i] * (self.kernel[i] - 1) + 1
        return (size + 2 * self.pad[i] - extent) // self.stride[i] + 1

    def deconv_out(self, size: int, i: int) -> int:
        extent = self.dilation[i] * (self.kernel[i] - 1) + 1
        return self.stride[i] * (size - 1) + extent - 2 * self.pad[i]


def spatial_setup(layer: Layer, shape) -> tuple[int, ConvGeometry]:
    """The channel axis and the geometry of layer's convolution_param for this bottom."""
    p = layer.param.convolution_param
    axis = layer.canonical_axis(p.axis, len(shape))
    spatial = len(shape) - axis - 1
    if spatial not in _CONV:
        raise layer.shape_error(f"supports 1 to 3 spatial axes after channel axis {axis}; "
                                f"bottom {list(shape)} has {spatial}")
    return axis, ConvGeometry(layer, p, spatial)


class _BaseConvolution(Layer):
    min_bottoms = 1
    min_tops = 1
    equal_bottom_top = True
    transposed = False

    def setup(self, bottom_shapes):
        p = self.param.convolution_param
        shape = bottom_shapes[0]
        self.axis, self.geometry = spatial_setup(self, shape)
        channels = shape[self.axis]
        self.group = p.group
        if p.num_output <= 0:
            raise self.error("num_output must be positive")
        if self.group <= 0 or channels % self.group or p.num_output % self.group:
            raise self.error(f"group {self.group} must divide both the input channels "
                             f"({channels}) and num_output ({p.num_output})")
        out_ch, in_ch = (channels, p.num_output) if self.transposed else (p.num_output, channels)
        self.channels = channels
        self.add_blob((out_ch, in_ch // self.group) + self.geometry.kernel, p.weight_filler)
        if p.bias_term:
            self.add_blob((p.num_output,), p.bias_filler)
        self.bias_term = p.bias_term

    def _out_size(self, size: int, i: int) -> int:
        raise NotImplementedError

    def reshape(self, bottom_shapes):
        tops = []
        for shape in bottom_shapes:
            if shape != bottom_shapes[0]:
                raise self.shape_error(f"all bottoms must have the same shape; got "
                                       f"{[list(s) for s in bottom_shapes]}")
            if len(shape) != self.axis + 1 + self.geometry.n or \
                    shape[self.axis] != self.channels:
                raise self.shape_error(f"bottom {list(shape)} does not match the "
                                       f"{self.channels} input channels at axis {self.axis} "
                                       "the layer was set up for")
            spatial = tuple(self._out_size(s, i) for i, s in
                            enumerate(shape[self.axis + 1:]))
            if min(spatial) <= 0:
                raise self.shape_error(f"bottom {list(shape)} is too small for kernel "
                                       f"{list(self.geometry.kernel)}, pad "
                                       f"{list(self.geometry.pad)}, dilation "
                                       f"{list(self.geometry.dilation)}")
            tops.append(tuple(shape[:self.axis]) + (self.param.convolution_param.num_output,)
                        + spatial)
        return tops

    def forward(self, *bottoms):
        bias = self.blobs[1] if self.bias_term else None
        tops = [self.convolve(x, self.blobs[0], bias) for x in bottoms]
        return tops if len(tops) > 1 else tops[0]

    def convolve(self, x, weight, bias):
        """This layer's convolution of one bottom with the given weight and bias."""
        if self.axis == 1:
            return self._op(x, weight, bias)
        lead = x.shape[:self.axis]
        batch = math.prod(lead)
        y = self._op(x.reshape((batch,) + tuple(x.shape[self.axis:])), weight, bias)
        return y.reshape(tuple(lead) + tuple(y.shape[1:]))


@register("Convolution")
class Convolution(_BaseConvolution):
    def _out_size(self, size, i):
        return self.geometry.conv_out(size, i)

    def _op(self, x, weight, bias):
        g = self.geometry
        return _CONV[g.n](x, weight, bias, g.stride, g.pad, g.dilation, self.group)


@register("Deconvolution")
class Deconvolution(_BaseConvolution):
    transposed = True

    def _out_size(self, size, i):
        return self.geometry.deconv_out(size, i)

    def _op(self, x, weight, bias):
        g = self.geometry
        return _DECONV[g.n](x, weight, bias, g.stride, g.pad, 0, self.group, g.dilation)


@register("Im2col")
class Im2col(Layer):
    """Caffe's im2col as a layer: (N, C, *S) -> (N, C*prod(k), *S_out), channel-major.

    Computed as a grouped convolution with one-hot kernels, which is exact (each
    output is one input value or a padding zero) and gives col2im as its gradient.
    """
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom_shapes):
        shape = bottom_shapes[0]
        self.axis, self.geometry = spatial_setup(self, shape)
        self.channels = shape[self.axis]
        spatial = self.geometry.n
        taps = math.prod(self.geometry.kernel)
        eye = torch.eye(taps, dtype=torch.float32).reshape((taps, 1) + self.geometry.kernel)
        self.register_buffer("one_hot", eye.repeat((self.channels,) + (1,) * (spatial + 1)),
                             persistent=False)

    def reshape(self, bottom_shapes):
        shape = bottom_shapes[0]
        taps = math.prod(self.geometry.kernel)
        spatial = tuple(self.geometry.conv_out(s, i)
                        for i, s in enumerate(shape[self.axis + 1:]))
        if min(spatial) <= 0:
            raise self.shape_error(f"bottom {list(shape)} is too small for the kernel")
        return [tuple(shape[:self.axis]) + (shape[self.axis] * taps,) + spatial]

    def forward(self, x):
        g = self.geometry
        lead = x.shape[:self.axis]
        flat = x.reshape((math.prod(lead),) + tuple(x.shape[self.axis:]))
        y = _CONV[g.n](flat, self.one_hot, None, g.stride, g.pad, g.dilation, self.channels)
        return y.reshape(tuple(lead) + tuple(y.shape[1:]))
