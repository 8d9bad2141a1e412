"""The fork layer type `BN`, which two Caffe forks define differently.

- SegNet's (alexgkendall/caffe-segnet bn_layer.cpp; TimoSaemann/caffe-enet carries the
  same file, so ENet's nets use it too): two blobs, scale and shift, each (1, C, 1, 1).
  `bn_mode: LEARN` (the default) normalizes with the batch's statistics in either phase,
  variance as E(x^2) - E(x)^2 and a fixed eps of 1e-9; it keeps no running averages
  (SegNet's compute_bn_statistics.py folds them into scale and shift afterwards and
  switches the layer to `bn_mode: INFERENCE`, which is then just x * scale + shift).
  Optional tops 1 and 2 carry the batch mean and variance, (1, C, 1, 1).
- PSPNet's (hszhao/PSPNet bn_layer.cpp, which TSN's caffe shares): four blobs, slope,
  bias, moving mean and moving variance, each (1, C, 1, 1). TRAIN (unless `frozen`)
  normalizes with the batch's statistics (biased variance) and moves the stored ones
  by `stat = (1 - momentum) * batch + momentum * stat`; TEST or `frozen` uses the stored
  ones. The statistics never learn (lr_mult 0) and `frozen` stops slope and bias too;
  the fork sets those multipliers itself, whatever the prototxt says, and so do we.

Which one a layer is: the fields its bn_param sets (bn_mode, scale_filler and
shift_filler are SegNet's; momentum, eps,
frozen, engine, slope_filler and bias_filler are PSPNet's), else more than two param
specs (PSPNet), else SegNet's, until a weights file with four blobs for the layer says
PSPNet (see `adapt_to_stored_blobs`). docs/forks.md lists the collision.

Backward is each fork's: the gradient through the batch statistics whenever the fork
saved them (SegNet LEARN; PSPNet not frozen, even in TEST, where the fork's backward
uses the stored statistics' normalized values in the same formula), the plain
per-channel scale otherwise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..proto import caffe_pb2
from .base import Layer
from .registry import register

SEGNET, PSPNET = "SegNet", "PSPNet"
SEGNET_EPS = 1e-9                   # var_eps_ in SegNet's LayerSetUp, not a field
_PSPNET_FIELDS = ("momentum", "eps", "frozen", "engine", "slope_filler", "bias_filler")
_SEGNET_FIELDS = ("bn_mode", "scale_filler", "shift_filler")


def _has(message, field: str) -> bool:
    """HasField for a field this schema may not define (then: not set)."""
    try:
        return message.HasField(field)
    except ValueError:
        return False


def bn_variant(param: caffe_pb2.LayerParameter) -> str | None:
    """SEGNET or PSPNET when the layer's own fields say which, else None."""
    p = param.bn_param
    if any(_has(p, f) for f in _PSPNET_FIELDS) or len(param.param) > 2:
        return PSPNET
    if any(_has(p, f) for f in _SEGNET_FIELDS):
        return SEGNET
    return None


def _channel_dims(x: torch.Tensor) -> list[int]:
    return [a for a in range(x.dim()) if a != 1]


class _NormalizeAffine(torch.autograd.Function):
    """y = (x - mean) * inv_std * slope + bias per channel, with the forks' backward:
    through the batch statistics (`through_batch`) or the plain per-channel scale."""

    @staticmethod
    def forward(ctx, x, slope, bias, mean, std, divide: bool, through_batch: bool,
                param_grads: bool):
        centered = x - mean
        x_norm = centered / std if divide else centered * std
        inv_std = 1 / std if divide else std
        ctx.save_for_backward(x_norm, inv_std, slope)
        ctx.flags = (through_batch, param_grads)
        return x_norm * slope + bias

    @staticmethod
    def backward(ctx, grad):
        x_norm, inv_std, slope = ctx.saved_tensors
        through_batch, param_grads = ctx.flags
        dims = _channel_dims(grad)
        d_slope = d_bias = None
        if param_grads and ctx.needs_input_grad[1]:
            d_slope = (grad * x_norm).sum(dim=dims, keepdim=True).reshape(slope.shape)
        if param_grads and ctx.needs_input_grad[2]:
            d_bias = grad.sum(dim=dims, keepdim=True).reshape(slope.shape)
        d_x = None
        if ctx.needs_input_grad[0]:
            scaled = grad * slope
            if through_batch:
                scaled = scaled - scaled.mean(dim=dims, keepdim=True) \
                    - x_norm * (scaled * x_norm).mean(dim=dims, keepdim=True)
            d_x = scaled * inv_std
        return d_x, d_slope, d_bias, None, None, None, None, None


def _inference(x: torch.Tensor, blob: torch.Tensor) -> bool:
    """No gradient wanted: torch's batch-norm kernel may stand in for the fork's steps."""
    return not torch.is_grad_enabled() or not (x.requires_grad or blob.requires_grad)


def _two_stage_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over the spatial axes, then over the batch, as the forks' two gemv calls."""
    spatial = x.reshape(x.shape[0], x.shape[1], -1).mean(dim=2)
    return spatial.mean(dim=0).reshape(1, -1, *([1] * (x.dim() - 2)))


@register("BN")
class BN(Layer):
    """SegNet's or PSPNet's batch normalization with its own affine part (see module)."""
    exact_bottoms = 1
    min_tops = 1

    @property
    def max_tops(self):         # SegNet's may also output the batch mean and variance
        return 3 if getattr(self, "variant", bn_variant(self.param)) != PSPNET else 1

    def setup(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        if len(shape) != 4:
            raise self.shape_error(f"needs a 4-axis bottom (num, channels, height, width), "
                                   f"got {list(shape)}")
        self.channels = shape[1]
        self.variant = bn_variant(self.param) or SEGNET
        self.decided = bn_variant(self.param) is not None
        if self.variant == PSPNET and self.num_tops > 1:
            raise self.error("PSPNet's BN (bn_param sets momentum/eps/frozen) has one top")
        p = self.param.bn_param
        blob_shape = (1, self.channels, 1, 1)
        if self.variant == SEGNET:
            self.add_blob(blob_shape, self._filler("scale_filler", "slope_filler"))
            self.add_blob(blob_shape, self._filler("shift_filler", "bias_filler"))
            return
        self.frozen = bool(getattr(p, "frozen", False))
        self.add_blob(blob_shape, self._filler("slope_filler", "scale_filler"))
        self.add_blob(blob_shape, self._filler("bias_filler", "shift_filler"))
        self._add_statistics()

    def _filler(self, *names):
        p = self.param.bn_param
        for name in names:
            if _has(p, name):
                return getattr(p, name)
        return caffe_pb2.FillerParameter()      # Caffe's default: constant 0

    def _add_statistics(self):
        blob_shape = (1, self.channels, 1, 1)
        self.add_blob(blob_shape, value=0.0)
        self.add_blob(blob_shape, value=1.0 if self.frozen else 0.0)
        specs = self.param.param
        while len(specs) < 4:
            specs.add()
        for i in (0, 1, 2, 3) if self.frozen else (2, 3):
            specs[i].lr_mult = 0.0
            specs[i].decay_mult = 0.0

    def adapt_to_stored_blobs(self, count: int) -> None:
        """A weights file holds `count` blobs for this layer: four make a layer whose
        fields did not say which fork it follows PSPNet's (its first two blobs mean the
        same in both forks, so they stay; the statistics join them, not learned)."""
        if self.decided or count != 4 or self.variant != SEGNET or self.num_tops > 1:
            return
        self.variant, self.decided, self.frozen = PSPNET, True, False
        self._add_statistics()
        for blob in list(self.blobs)[2:]:
            blob.requires_grad_(False)
            blob.data = blob.data.to(self.blobs[0].device)

    def reshape(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        if len(shape) != 4 or shape[1] != self.channels:
            raise self.shape_error(f"was set up for a 4-axis bottom with {self.channels} "
                                   f"channels, got {list(shape)}")
        stats = (1, self.channels, 1, 1)
        return [shape] + [stats] * (self.num_tops - 1)

    def forward(self, x):
        if self.variant == SEGNET:
            return self._segnet(x)
        return self._pspnet(x)

    def _segnet(self, x):
        scale, shift = self.blobs[0], self.blobs[1]
        mode = getattr(self.param.bn_param, "bn_mode", 0)
        if mode == 1 and self.num_tops == 1 and _inference(x, scale):
            zeros = torch.zeros(self.channels, dtype=x.dtype, device=x.device)
            return F.batch_norm(x, zeros, torch.ones_like(zeros), scale.reshape(-1),
                                shift.reshape(-1), False, 0.0, 0.0)
        if mode == 1:           # INFERENCE: x * scale + shift
            zero, one = torch.zeros((), dtype=x.dtype, device=x.device), \
                torch.ones((), dtype=x.dtype, device=x.device)
            top = _NormalizeAffine.apply(x, scale, shift, zero, one, False, False, True)
            extra = [torch.zeros_like(scale)] * (self.num_tops - 1)
            return [top, *extra] if extra else top
        with torch.no_grad():
            mean = _two_stage_mean(x)
            var = _two_stage_mean(x * x) - mean * mean
        std = torch.sqrt(var + SEGNET_EPS)
        top = _NormalizeAffine.apply(x, scale, shift, mean, std, True, True, True)
        if self.num_tops == 1:
            return top
        return [top, mean.reshape(1, -1, 1, 1), var.reshape(1, -1, 1, 1)][:self.num_tops]

    def _pspnet(self, x):
        slope, bias, stored_mean, stored_var = self.blobs
        eps = float(getattr(self.param.bn_param, "eps", 1e-5))
        momentum = float(getattr(self.param.bn_param, "momentum", 0.9))
        stored = self.frozen or self.phase == caffe_pb2.TEST
        if stored and _inference(x, slope):     # one fused pass, same arithmetic
            return F.batch_norm(x, stored_mean.reshape(-1), stored_var.reshape(-1),
                                slope.reshape(-1), bias.reshape(-1), False, 0.0, eps)
        with torch.no_grad():
            if stored:
                mean, var = stored_mean.detach(), stored_var.detach()
            else:
                mean = _two_stage_mean(x)
                centered = x - mean
                var = _two_stage_mean(centered * centered)
                stored_mean.mul_(momentum).add_((1 - momentum) * mean)
                stored_var.mul_(momentum).add_((1 - momentum) * var)
            inv_std = torch.pow(var + eps, -0.5)
        return _NormalizeAffine.apply(x, slope, bias, mean, inv_std, False,
                                      not self.frozen, not self.frozen)
