"""Fork layers that enlarge feature maps: SegNet's Upsample and PSPNet's Interp.

- `Upsample` follows alexgkendall/caffe-segnet's upsample_layer.cpp (TimoSaemann's
  caffe-enet carries the same file unchanged): bottom 1 is the argmax mask of a MAX
  `Pooling` layer's second top, each value `h * width + w` in the pooling bottom's
  plane, which is exactly the index protonet's Pooling writes. Forward places every
  value at its mask index of a zeroed top; backward reads each bottom's gradient back
  from its index. Where overlapping pooling windows give two values one index, the
  fork's CPU loop leaves the later one; so do we (on the GPU too, where the fork's
  kernel leaves it to chance), and backward still hands the top's gradient to both.
- `Interp` follows hszhao/PSPNet's interp_layer.cpp and caffe_cpu_interp2: bilinear
  interpolation with corners aligned (source step (in - 1) / (out - 1) in float32, as
  the fork computes it), after cropping the bottom by -pad_beg / -pad_end. Backward
  is the adjoint, as the fork's interp2_backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Layer
from .registry import register


def _unpool(values: torch.Tensor, index: torch.Tensor, out_h: int, out_w: int):
    """values (N, C, h, w) to (N, C, out_h, out_w) at `index`; the last writer wins.

    Where no index repeats, torch's max_unpool2d is the fork's loop, backward (a
    gather of the top's gradient at each index) included. Which of several writers
    of one index it keeps is its own affair (on the CPU it varies with the layout),
    so a mask with repeats (overlapping pooling windows) takes unpool_last_writer.
    Repeats show when the bottom positions, unpooled the same way, do not all come
    back from their indices."""
    n, c, h, w = values.shape
    flat = index.reshape(n, c, h * w)
    if out_h < h or out_w < w:          # outside max_unpool2d's size rule
        return unpool_last_writer(values, flat, out_h, out_w)
    kernel, size = (out_h - h + 1, out_w - w + 1), (out_h, out_w)
    exact = torch.float32 if h * w < 2 ** 24 else torch.float64
    positions = torch.arange(h * w, dtype=exact, device=values.device)
    marks = F.max_unpool2d(positions.expand(n, c, h * w).reshape(n, c, h, w).contiguous(),
                           index, kernel, stride=1, output_size=size)
    kept = marks.reshape(n, c, -1).gather(2, flat) == positions
    if not bool(kept.all()):
        return unpool_last_writer(values, flat, out_h, out_w)
    return F.max_unpool2d(values, index, kernel, stride=1, output_size=size)


def unpool_last_writer(values: torch.Tensor, flat: torch.Tensor, out_h: int, out_w: int):
    """The unpooling with repeated indices resolved explicitly: of the bottom positions
    with one index, the highest writes (the fork's sequential loop), on any device."""
    n, c, hw = flat.shape
    positions = torch.arange(hw, device=values.device).expand(n, c, hw)
    writer = torch.full((n, c, out_h * out_w), -1, dtype=torch.long, device=values.device)
    writer.scatter_reduce_(2, flat, positions, "amax")
    last = writer.gather(2, flat) == positions      # the one writer each index keeps
    return _GatheredUnpool.apply(values, torch.where(last, flat, -1), flat, out_h, out_w)


class _GatheredUnpool(torch.autograd.Function):
    """Unpool where only the last writer of each index writes (index -1: none); the
    gradient of every value is the top's gradient at its own index, as in the fork."""

    @staticmethod
    def forward(ctx, values, index, flat, out_h: int, out_w: int):
        n, c = values.shape[:2]
        top = values.new_zeros((n, c, out_h * out_w + 1))
        top.scatter_(2, torch.where(index >= 0, index, out_h * out_w),
                     values.reshape(n, c, -1))
        ctx.save_for_backward(flat)
        ctx.bottom_shape = values.shape
        return top[:, :, :-1].reshape(n, c, out_h, out_w)

    @staticmethod
    def backward(ctx, grad):
        (flat,) = ctx.saved_tensors
        n, c = flat.shape[:2]
        values_grad = grad.reshape(n, c, -1).gather(2, flat).reshape(ctx.bottom_shape)
        return values_grad, None, None, None, None


@register("Upsample")
class Upsample(Layer):
    """SegNet's max-unpooling: bottoms (values, pooling mask), one top."""
    exact_bottoms = 2
    exact_tops = 1

    def setup(self, bottom_shapes):
        p = self.param.upsample_param
        if p.HasField("upsample_h") and p.HasField("upsample_w"):
            self.out_size = (p.upsample_h, p.upsample_w)
            if min(self.out_size) <= 1:
                raise self.error(f"upsample_h and upsample_w must be > 1, got "
                                 f"{list(self.out_size)}")
            return
        if not (not p.HasField("scale_h") and not p.HasField("scale_w")
                or not p.HasField("scale") and p.HasField("scale_h") and p.HasField("scale_w")):
            raise self.error("give upsample_h and upsample_w, or (deprecated) scale, or "
                             "scale_h and scale_w together without scale")
        self.out_size = None
        self.scale = (p.scale_h, p.scale_w) if p.HasField("scale_h") else (p.scale, p.scale)
        if min(self.scale) <= 1:
            raise self.error(f"the upsampling scale must be > 1, got {list(self.scale)}")
        self.pad_out = (int(p.pad_out_h), int(p.pad_out_w))
        for axis, pad, scale in zip("hw", self.pad_out, self.scale):
            if pad and scale != 2:
                raise self.error(f"pad_out_{axis} needs scale_{axis} 2 (the fork's rule), "
                                 f"got {scale}")

    def _out_size(self, height: int, width: int) -> tuple[int, int]:
        if self.out_size is not None:
            return self.out_size
        return (height * self.scale[0] - self.pad_out[0],
                width * self.scale[1] - self.pad_out[1])

    def reshape(self, bottom_shapes):
        data, mask = (tuple(s) for s in bottom_shapes)
        if len(data) != 4 or len(mask) != 4:
            raise self.shape_error(f"needs 4-axis bottoms (num, channels, height, width), "
                                   f"got {list(data)} and {list(mask)}")
        if data != mask:
            raise self.shape_error(f"the mask {list(mask)} must have the shape of the "
                                   f"values {list(data)}")
        return [data[:2] + self._out_size(*data[2:])]

    def forward(self, x, mask):
        out_h, out_w = self._out_size(*x.shape[2:])
        index = mask.detach().to(torch.long)       # static_cast<int>: truncation
        if index.numel():
            low, high = (int(v) for v in torch.aminmax(index))     # one sync
            if low < 0 or high >= out_h * out_w:
                bad = low if low < 0 else high
                raise self.error(
                    f"mask index {bad} is outside the {out_h}x{out_w} top; the upsampling "
                    "size must match the input of the Pooling layer that made the mask")
        return _unpool(x, index, out_h, out_w)

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index == 0


@register("Interp")
class Interp(Layer):
    """PSPNet's bilinear resize (corners aligned) to a size given by height/width,
    zoom_factor and/or shrink_factor, after a crop by the non-positive pads."""
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom_shapes):
        p = self.param.interp_param
        self.pad_beg, self.pad_end = p.pad_beg, p.pad_end
        if self.pad_beg > 0 or self.pad_end > 0:
            raise self.error(f"pad_beg and pad_end must be <= 0 (the fork crops only), got "
                             f"{self.pad_beg} and {self.pad_end}")

    def _sizes(self, shape):
        if len(shape) != 4:
            raise self.shape_error(f"needs a 4-axis bottom (num, channels, height, width), "
                                   f"got {list(shape)}")
        p = self.param.interp_param
        h_in = shape[2] + self.pad_beg + self.pad_end
        w_in = shape[3] + self.pad_beg + self.pad_end
        shrink, zoom = p.HasField("shrink_factor"), p.HasField("zoom_factor")
        for name, on, value in (("shrink_factor", shrink, p.shrink_factor),
                                ("zoom_factor", zoom, p.zoom_factor)):
            if on and value < 1:
                raise self.error(f"{name} must be >= 1, got {value}")
        if shrink and not zoom:
            h_out = (h_in - 1) // p.shrink_factor + 1
            w_out = (w_in - 1) // p.shrink_factor + 1
        elif zoom and not shrink:
            h_out = h_in + (h_in - 1) * (p.zoom_factor - 1)
            w_out = w_in + (w_in - 1) * (p.zoom_factor - 1)
        elif p.HasField("height") and p.HasField("width"):
            h_out, w_out = p.height, p.width
        elif shrink and zoom:
            h_out = (h_in - 1) // p.shrink_factor + 1
            w_out = (w_in - 1) // p.shrink_factor + 1
            h_out = h_out + (h_out - 1) * (p.zoom_factor - 1)
            w_out = w_out + (w_out - 1) * (p.zoom_factor - 1)
        else:
            raise self.error("needs zoom_factor, shrink_factor, or height and width")
        if h_in <= 0 or w_in <= 0:
            raise self.shape_error(f"the pads leave nothing of the bottom {list(shape)}")
        if h_out <= 0 or w_out <= 0:
            raise self.shape_error(f"output size {h_out}x{w_out} is not positive")
        return (h_in, w_in), (h_out, w_out)

    def reshape(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        _, out = self._sizes(shape)
        return [shape[:2] + out]

    def forward(self, x):
        (h_in, w_in), (h_out, w_out) = self._sizes(tuple(x.shape))
        start = -self.pad_beg        # the fork offsets both axes by pad_beg
        x = x[:, :, start:start + h_in, start:start + w_in]
        if (h_in, w_in) == (h_out, w_out):
            return x.clone()
        # torch's align-corners kernel is the fork's formula: source position
        # dst * (in - 1) / (out - 1) in float32, its floor and the two weights; the
        # results agree to float rounding (<= 5e-7 on unit-scale data). Gathering the
        # four neighbours instead took 29.5 s against 0.43 s for PSPNet's last Interp
        # (150 x 60 x 60 -> 473 x 473, one run each on a shared 2-core CPU).
        return F.interpolate(x, size=(h_out, w_out), mode="bilinear", align_corners=True)
