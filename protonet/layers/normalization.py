"""Normalizing and affine layers: BatchNorm, MVN, Scale, Bias.

BatchNorm keeps Caffe's three-blob running statistics (sums plus a scale factor, not
averages) so caffemodels load unchanged; it has no learned affine part, which
Caffe nets add with a following Scale layer. MVN carries its own autograd Function
because Caffe's backward omits a term of the true derivative (the one eps brings in).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..proto import caffe_pb2
from .base import Layer, Shape
from .registry import register


@register("BatchNorm")
class BatchNorm(Layer):
    """(x - mean) / sqrt(var + eps) per channel (axis 1), over the batch and spatial axes.

    Blobs: running mean sum, running variance sum, and their scale factor [1]; the
    stored statistics are sum / factor (0 when the factor is 0). TRAIN (unless
    use_global_stats) normalizes with the batch statistics and updates the sums.
    """
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom_shapes):
        p = self.param.batch_norm_param
        self.use_global_stats = (p.use_global_stats if p.HasField("use_global_stats")
                                 else self.phase == caffe_pb2.TEST)
        self.channels = self._channels(bottom_shapes[0])
        self.add_blob((self.channels,))
        self.add_blob((self.channels,))
        self.add_blob((1,))
        self._freeze_statistics()

    def _freeze_statistics(self):
        """The statistics are not learned: give each blob lr_mult 0 (Caffe does the same)."""
        specs = self.param.param
        for i in range(len(self.blobs)):
            if i == len(specs):
                specs.add(lr_mult=0.0)
            elif specs[i].lr_mult != 0:
                raise self.error(f"param {i} has lr_mult {specs[i].lr_mult}; BatchNorm's "
                                 "statistics cannot be learned, use lr_mult: 0 (or no "
                                 "param spec)")

    def _channels(self, shape: Shape) -> int:
        if len(shape) < 2:
            raise self.shape_error(f"needs a bottom with at least 2 axes (channels on "
                                   f"axis 1), got {list(shape)}")
        return shape[1]

    def reshape(self, bottom_shapes):
        channels = self._channels(bottom_shapes[0])
        if channels != self.channels:
            raise self.shape_error(f"was set up for {self.channels} channels, the bottom "
                                   f"{list(bottom_shapes[0])} has {channels}")
        return [tuple(bottom_shapes[0])]

    def forward(self, x):
        eps = self.param.batch_norm_param.eps
        if self.use_global_stats:
            mean, var = self._stored_statistics()
            return F.batch_norm(x, mean, var, training=False, eps=eps)
        m = x.numel() // self.channels
        if m == 1:      # torch's kernel refuses one value per channel; the output is 0
            with torch.no_grad():
                var, mean = torch.var_mean(x, dim=[a for a in range(x.dim()) if a != 1],
                                           unbiased=False)
            self._update_running_statistics(mean, var, m)
            return x - x.mean(dim=[a for a in range(x.dim()) if a != 1], keepdim=True)
        # (x - batch mean) / sqrt(biased batch variance + eps), as Caffe, in one fused
        # kernel whose backward is Caffe's full gradient through the batch statistics.
        # The same pass leaves the batch mean and unbiased variance in the two buffers
        # (momentum 1 replaces their zeros): one pass over x for the statistics, where
        # a separate var_mean took 10x the kernel's time on NHWC activations.
        mean, var = (torch.zeros_like(b) for b in self.blobs[:2])
        y = F.batch_norm(x, mean, var, training=True, momentum=1.0, eps=eps)
        self._update_running_statistics(mean, var, m, unbiased=True)
        return y

    def with_scale(self, scale: "Scale", x: torch.Tensor):
        """This layer followed by the per-channel `scale`, as one batch-norm pass with
        Scale's blobs as its affine part (NetModule runs an in-place BatchNorm + Scale
        pair so); None where it does not apply. On batch statistics (TRAIN) the fused
        kernel's backward gives the same three gradients as the two layers' backwards
        in one pass over the activations instead of two."""
        gamma = scale.blobs[0]
        beta = scale.blobs[1] if scale.param.scale_param.bias_term else None
        if x.dtype != gamma.dtype:
            return None
        eps = self.param.batch_norm_param.eps
        if self.use_global_stats:
            mean, var = self._stored_statistics()
            return lambda x: F.batch_norm(x, mean, var, gamma, beta, False, 0.0, eps)
        m = x.numel() // self.channels
        if m == 1:
            return None

        def batch_statistics_affine(x):
            mean, var = (torch.zeros_like(b) for b in self.blobs[:2])
            y = F.batch_norm(x, mean, var, gamma, beta, True, 1.0, eps)
            self._update_running_statistics(mean, var, m, unbiased=True)
            return y
        return batch_statistics_affine

    def _stored_statistics(self):
        mean_sum, var_sum, factor = (b.detach() for b in self.blobs)
        scale = torch.where(factor == 0, torch.zeros_like(factor), 1 / factor)
        return mean_sum * scale, var_sum * scale

    def _update_running_statistics(self, mean, var, m: int, unbiased: bool = False):
        """Caffe's running sums: sum = fraction * sum + batch value (the variance with
        Bessel's correction m / (m - 1)); factor = fraction * factor + 1."""
        fraction = self.param.batch_norm_param.moving_average_fraction
        correction = 1.0 if unbiased or m == 1 else m / (m - 1)
        mean_sum, var_sum, factor = self.blobs
        with torch.no_grad():
            factor.mul_(fraction).add_(1)
            mean_sum.mul_(fraction).add_(mean.detach())
            var_sum.mul_(fraction).add_(var.detach() * correction)


class _CaffeMeanVarianceNorm(torch.autograd.Function):
    """Rows of x to (x - mean) / (std + eps), with Caffe's backward
    (g - mean(g) - y * mean(g * y)) / (std + eps)."""

    @staticmethod
    def forward(ctx, rows, eps):
        centered = rows - rows.mean(dim=1, keepdim=True)
        denominator = torch.sqrt((centered * centered).mean(dim=1, keepdim=True)) + eps
        y = centered / denominator
        ctx.save_for_backward(y, denominator)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, denominator = ctx.saved_tensors
        centered_grad = grad - grad.mean(dim=1, keepdim=True) \
            - y * (grad * y).mean(dim=1, keepdim=True)
        return centered_grad / denominator, None


@register("MVN")
class MVN(Layer):
    """Subtract the mean (and divide by std + eps) per image and channel, or per image
    across channels. Like Caffe, the top takes the bottom's 4-axis legacy shape
    (num, channels, height, width), padding missing axes with 1."""
    exact_bottoms = 1
    exact_tops = 1

    def reshape(self, bottom_shapes):
        shape = bottom_shapes[0]
        if len(shape) > 4:
            raise self.shape_error(f"works on blobs of at most 4 axes, got {list(shape)}")
        return [tuple(shape) + (1,) * (4 - len(shape))]

    def forward(self, x):
        p = self.param.mvn_param
        shape = tuple(x.shape) + (1,) * (4 - x.dim())
        groups = shape[0] if p.across_channels else shape[0] * shape[1]
        rows = x.reshape(groups, -1)
        if p.normalize_variance:
            out = _CaffeMeanVarianceNorm.apply(rows, p.eps)
        else:
            out = rows - rows.mean(dim=1, keepdim=True)
        return out.reshape(shape)


def _learned_shape(layer: Layer, bottom: Shape, axis: int, num_axes: int) -> Shape:
    """Shape of a learned operand covering `num_axes` bottom axes from `axis` (-1: all)."""
    start = layer.canonical_axis(axis, len(bottom))
    if num_axes < -1:
        raise layer.error(f"num_axes must be -1 (to the last axis) or >= 0, got {num_axes}")
    if num_axes != -1 and start + num_axes > len(bottom):
        raise layer.shape_error(f"num_axes {num_axes} from axis {start} extends past the "
                                f"bottom's {len(bottom)} axes {list(bottom)}")
    return tuple(bottom[start:] if num_axes == -1 else bottom[start:start + num_axes])


def _operand_axis(layer: Layer, bottom: Shape, operand: Shape, axis: int, what: str) -> int:
    """The bottom axis where `operand` starts, checking that its dims match the bottom's.
    A scalar operand (no axes) applies everywhere, whatever `axis` says."""
    if len(operand) == 0:
        return 0
    start = layer.canonical_axis(axis, len(bottom))
    if start + len(operand) > len(bottom) or \
            tuple(bottom[start:start + len(operand)]) != tuple(operand):
        raise layer.shape_error(f"{what} shape {list(operand)} does not match bottom shape "
                                f"{list(bottom)} from axis {start}")
    return start


def _channel_affine(x: torch.Tensor, scale: torch.Tensor, bias) -> torch.Tensor:
    """x * scale + bias per channel (axis 1) as torch's batch norm with mean 0 and
    variance 1 (eps 0: the divisor is exactly 1): one pass forward, and one fused
    pass for all three gradients instead of a multiply, an add and two reductions
    (ResNet's Scale layers, forward + backward: ~30% faster)."""
    zeros = torch.zeros_like(scale)
    return F.batch_norm(x, zeros, torch.ones_like(scale), scale, bias, False, 0.0, 0.0)


def _broadcastable(operand: torch.Tensor, ndim: int, start: int) -> torch.Tensor:
    """`operand` viewed with singleton axes so it lines up with bottom axis `start`."""
    trailing = ndim - start - operand.dim()
    return operand.reshape((1,) * start + tuple(operand.shape) + (1,) * trailing)


@register("Scale")
class Scale(Layer):
    """Multiply by a scale over axes [axis, axis + num_axes) of bottom 0, then add an
    optional learned bias. The scale is bottom 1 when given, else a learned blob
    (filler default: constant 1). Blobs: [scale], [scale, bias] or [bias]."""
    min_bottoms = 1
    max_bottoms = 2
    exact_tops = 1

    def setup(self, bottom_shapes):
        p = self.param.scale_param
        bottom = bottom_shapes[0]
        if len(bottom_shapes) == 1:
            filler = p.filler if p.HasField("filler") else \
                caffe_pb2.FillerParameter(type="constant", value=1.0)
            self.add_blob(_learned_shape(self, bottom, p.axis, p.num_axes), filler)
        if p.bias_term:
            bias_axes = len(bottom_shapes[1]) if len(bottom_shapes) > 1 else p.num_axes
            self.add_blob(_learned_shape(self, bottom, p.axis, bias_axes), p.bias_filler)

    def reshape(self, bottom_shapes):
        bottom = tuple(bottom_shapes[0])
        axis = self.param.scale_param.axis
        scale_shape = tuple(bottom_shapes[1]) if len(bottom_shapes) > 1 else \
            tuple(self.blobs[0].shape)
        _operand_axis(self, bottom, scale_shape, axis, "scale")
        if self.param.scale_param.bias_term:
            _operand_axis(self, bottom, tuple(self.blobs[-1].shape), axis, "bias")
        return [bottom]

    def per_channel_of(self, shape: Shape) -> bool:
        """A learned scale (and bias) of one value per channel (axis 1) of `shape`."""
        p = self.param.scale_param
        if len(self.param.bottom) != 1 or len(shape) < 2 or \
                self.canonical_axis(p.axis, len(shape)) != 1:
            return False
        return all(tuple(b.shape) == (shape[1],) for b in self.blobs)

    def forward(self, *bottoms):
        x = bottoms[0]
        scale = bottoms[1] if len(bottoms) > 1 else self.blobs[0]
        bias = self.blobs[-1] if self.param.scale_param.bias_term else None
        axis = self.param.scale_param.axis
        start = _operand_axis(self, tuple(x.shape), tuple(scale.shape), axis, "scale")
        if start == 1 and scale.dim() == 1 and x.dim() >= 2 and x.dtype == scale.dtype and \
                (bias is None or bias.shape == scale.shape):
            return _channel_affine(x, scale, bias)
        out = x * _broadcastable(scale, x.dim(), start)
        if bias is not None:
            start = _operand_axis(self, tuple(x.shape), tuple(bias.shape), axis, "bias")
            out = out + _broadcastable(bias, x.dim(), start)
        return out


@register("Bias")
class Bias(Layer):
    """Add a bias over axes [axis, axis + num_axes) of bottom 0: bottom 1 when given,
    else a learned blob (filler default: constant 0)."""
    min_bottoms = 1
    max_bottoms = 2
    exact_tops = 1

    def setup(self, bottom_shapes):
        p = self.param.bias_param
        if len(bottom_shapes) == 1:
            self.add_blob(_learned_shape(self, bottom_shapes[0], p.axis, p.num_axes),
                          p.filler)

    def reshape(self, bottom_shapes):
        bias_shape = tuple(bottom_shapes[1]) if len(bottom_shapes) > 1 else \
            tuple(self.blobs[0].shape)
        _operand_axis(self, bottom_shapes[0], bias_shape, self.param.bias_param.axis, "bias")
        return [tuple(bottom_shapes[0])]

    def forward(self, *bottoms):
        x = bottoms[0]
        bias = bottoms[1] if len(bottoms) > 1 else self.blobs[0]
        start = _operand_axis(self, tuple(x.shape), tuple(bias.shape),
                              self.param.bias_param.axis, "bias")
        return x + _broadcastable(bias, x.dim(), start)
