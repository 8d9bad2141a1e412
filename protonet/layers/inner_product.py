"""InnerProduct and Embed: dense layers with Caffe's weight layouts.

InnerProduct flattens every axis from `axis` on into K inputs; its weight is
[num_output, K], or [K, num_output] with `transpose: true`. Embed looks up rows of
an [input_dim, num_output] table by integer-valued float indices.

On CPU in float32, the forward product runs on oneDNN, which is 2-2.5x faster than
the BLAS GEMM torch would call for the small batches of fully connected layers
(AlexNet's fc6: 8 ms against 18 ms); the backward is the same two GEMMs and sum
as Caffe's (and autograd's).
"""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

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
        return self.product(x, self.blobs[0], self.blobs[1] if self.bias_term else None)

    def product(self, x, weight, bias):
        """This layer's inner product of `x` with the given (Caffe-layout) weight and bias."""
        lead = x.shape[:self.axis]
        flat = x.reshape(math.prod(lead), self.k)
        if self.transpose:
            y = F.linear(flat, weight.t(), bias)
        elif _onednn_applies(flat, weight):
            y = _OneDnnLinear.apply(flat, weight, bias)
        else:
            y = F.linear(flat, weight, bias)
        return y.reshape(tuple(lead) + (y.shape[1],))


_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and \
    hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_applies(flat: torch.Tensor, weight: torch.Tensor) -> bool:
    """Plain float32 on CPU, run eagerly (autocast, torch.compile, tracing and ONNX
    export get F.linear)."""
    return _ONEDNN_LINEAR and flat.device.type == "cpu" and \
        flat.dtype == weight.dtype == torch.float32 and weight.is_contiguous() and \
        flat.shape[0] > 0 and not torch.is_autocast_enabled("cpu") and \
        not torch.compiler.is_compiling() and not torch.jit.is_tracing() and \
        not torch.jit.is_scripting() and not _exporting_onnx()


def _exporting_onnx() -> bool:
    """torch.onnx.is_in_onnx_export(), without importing torch.onnx (some MB and
    hundreds of modules) in a process that never exports."""
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


class _OneDnnLinear(torch.autograd.Function):
    """x @ weight.T + bias on oneDNN; backward: grad @ weight, grad.T @ x, sum(grad)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x = x.contiguous()      # kept for the weight gradient too: MKL's product with a
        ctx.save_for_backward(x, weight)    # column-major operand is 2-3x slower
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = _bottom_grad(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = grad.t().mm(x) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


# Multiply-adds (rows x weight elements) from which grad @ weight is oneDNN's.
ONEDNN_BOTTOM_GRAD_WORK = 1 << 18


def _bottom_grad(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad @ weight, by oneDNN where that pays. MKL's sgemm takes a product with a few
    rows about as long as that many matrix-vector products (AlexNet's fc6 backward, 10
    rows: 24 ms against oneDNN's 8.6 ms; ResNet-50's 1x1 convolutions 16% slower, on two
    Zen 4 cores). One row, or a product too small to amortise oneDNN's ~15 us call,
    stays MKL's."""
    if grad.shape[0] >= 2 and grad.shape[0] * weight.numel() >= ONEDNN_BOTTOM_GRAD_WORK:
        return torch.ops.mkldnn._linear_pointwise(grad.contiguous(), weight.t(), None,
                                                  "none", [], "")
    return grad.mm(weight)


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
