"""The R-CNN family's fork layers: ROIPooling, PSROIPooling and SmoothL1Loss.

ROIPooling and SmoothL1Loss follow rbgirshick/caffe-fast-rcnn (branch faster-rcnn,
roi_pooling_layer.cu, smooth_L1_loss_layer.cu); PSROIPooling follows R-FCN's
daijifeng001/caffe-rfcn (psroi_pooling_layer.cu). Box coordinates are rounded as C's
round() does (halves away from zero) and bins are computed in float32, as the
forks do, so every bin covers the same cells. ROIPooling runs torch's adaptive max
pooling on each box's crop where its float32 bins equal adaptive pooling's integer
bins (checked per box; nearly always) and a vectorised gather otherwise;
PSROIPooling sums bins from a float64 summed-area table. All torch ops, so they run
on CUDA; backward is autograd, which is the forks' own gradient (ROIPooling: all of a
bin's gradient to its first maximal cell in row-major order; PSROIPooling: spread
evenly over the bin; neither sends a gradient to the boxes).
"""
from __future__ import annotations

import torch

from .base import Layer
from .loss import _Loss
from .registry import register


def c_round(x: torch.Tensor) -> torch.Tensor:
    """C's round(): halves go away from zero (torch.round sends them to even)."""
    rounded = torch.round(x)
    half = (x - torch.trunc(x)).abs() == 0.5
    return torch.where(half, torch.trunc(x) + torch.sign(x), rounded)


def _boxes(layer: Layer, rois: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch index per box, [x1, y1, x2, y2] per box) from a (R, 5[, 1, 1]) bottom."""
    if rois.shape[0] == 0:
        return (torch.zeros(0, dtype=torch.long, device=rois.device),
                rois.reshape(0, 5)[:, 1:].float())
    boxes = rois.detach().reshape(rois.shape[0], 5).float()
    index = torch.trunc(boxes[:, 0]).long()         # int roi_batch_ind = rois[0]
    bad = (index < 0) | (index >= batch)
    if bool(bad.any()):
        raise layer.error(f"box {int(bad.nonzero()[0, 0])} names batch item "
                          f"{int(index[bad][0])}; the data has {batch}")
    return index, boxes[:, 1:]


def _check_rois(layer: Layer, data_shape, rois_shape) -> int:
    if len(data_shape) != 4:
        raise layer.shape_error(f"data bottom must be 4-d (N, C, H, W), got {list(data_shape)}")
    count = 1
    for d in rois_shape[1:]:
        count *= d
    if not rois_shape or count != 5:
        raise layer.shape_error(f"rois bottom must be (R, 5) rows of (batch index, x1, "
                                f"y1, x2, y2), got {list(rois_shape)}")
    return rois_shape[0]


@register("ROIPooling")
class ROIPooling(Layer):
    """Max pooling of each box (image coordinates * spatial_scale) into a fixed
    pooled_h x pooled_w grid; an empty bin gives 0. Top: (R, C, pooled_h, pooled_w)."""
    exact_bottoms = 2
    exact_tops = 1

    # Gathered elements per chunk of boxes (bounds memory on large feature maps).
    CHUNK_ELEMENTS = 1 << 25
    # Adaptive pooling per box where its bins allow (tests turn it off to compare).
    use_adaptive = True

    def setup(self, bottom_shapes):
        p = self.param.roi_pooling_param
        if p.pooled_h <= 0 or p.pooled_w <= 0:
            raise self.error(f"roi_pooling_param pooled_h and pooled_w must be > 0, got "
                             f"{p.pooled_h} x {p.pooled_w}")
        self.pooled = (p.pooled_h, p.pooled_w)
        self.spatial_scale = p.spatial_scale

    def allow_force_backward(self, bottom_index):
        return bottom_index == 0

    def reshape(self, bottom_shapes):
        rois = _check_rois(self, bottom_shapes[0], bottom_shapes[1])
        return [(rois, bottom_shapes[0][1]) + self.pooled]

    def forward(self, data, rois):
        n, c, h, w = data.shape
        index, boxes = _boxes(self, rois, n)
        if index.numel() == 0:
            return data.new_zeros((0, c) + self.pooled)
        ph, pw = self.pooled
        with torch.no_grad():
            scale = torch.tensor(self.spatial_scale, dtype=torch.float32, device=data.device)
            start_w, start_h, end_w, end_h = c_round(boxes * scale).long().unbind(1)
            hs, he, exact_h = self._bins(start_h, end_h, ph, h)
            ws, we, exact_w = self._bins(start_w, end_w, pw, w)
            empty = (he <= hs)[:, :, None] | (we <= ws)[:, None, :]       # (R, PH, PW)
            exact = exact_h & exact_w
            plan = torch.stack([index, start_h, end_h, start_w, end_w, exact.long()], 1)
        tops: list = [None] * index.numel()
        # Boxes whose float32 bins equal integer adaptive-pooling bins (nearly all):
        # adaptive max pooling of the box's crop, padded with -inf where the box
        # leaves the map. It takes the first maximum in row-major order, as the fork.
        for r, (b, y0, y1, x0, x1, fast) in enumerate(plan.tolist()):
            if not (fast and self.use_adaptive):
                continue
            rh, rw = max(y1 - y0 + 1, 1), max(x1 - x0 + 1, 1)
            top_, left = max(y0, 0), max(x0, 0)
            bottom, right = min(y0 + rh, h), min(x0 + rw, w)
            if bottom <= top_ or right <= left:
                tops[r] = data.new_zeros((c, ph, pw))
                continue
            crop = data[b, :, top_:bottom, left:right]
            crop = torch.nn.functional.pad(
                crop, (left - x0, x0 + rw - right, top_ - y0, y0 + rh - bottom),
                value=float("-inf"))
            tops[r] = torch.nn.functional.adaptive_max_pool2d(crop[None], (ph, pw))[0]
        rest = [r for r, top in enumerate(tops) if top is None]
        if rest:
            pick = torch.tensor(rest, device=data.device)
            step = max(1, self.CHUNK_ELEMENTS // max(ph * max(int((he - hs).max()), 1)
                                                      * c * w, 1))
            for i in range(0, len(rest), step):
                chunk = pick[i:i + step]
                pooled = self._pool(data, index[chunk], hs[chunk], he[chunk], ws[chunk],
                                    we[chunk])
                for j, r in enumerate(rest[i:i + step]):
                    tops[r] = pooled[j]
        top = torch.stack(tops)
        zero = torch.zeros((), dtype=top.dtype, device=top.device)
        return torch.where(empty[:, None], zero, top)

    @staticmethod
    def _bins(start, end, pooled: int, size: int):
        """Each bin's [start, end) cells along one axis, as the fork computes them
        (float32), clamped to the map; and whether, per box, they equal the integer
        bins floor(i * n / p), ceil((i + 1) * n / p) of adaptive pooling."""
        extent = torch.clamp(end - start + 1, min=1)
        bin_size = extent.float() / torch.tensor(float(pooled), dtype=torch.float32,
                                                  device=extent.device)
        p = torch.arange(pooled, device=start.device)
        lo = torch.floor(p[None].float() * bin_size[:, None]).long()
        hi = torch.ceil((p[None] + 1).float() * bin_size[:, None]).long()
        exact = ((lo == (p[None] * extent[:, None]) // pooled)
                 & (hi == -((-(p[None] + 1) * extent[:, None]) // pooled))).all(1)
        lo, hi = lo + start[:, None], hi + start[:, None]
        return lo.clamp(0, size), hi.clamp(0, size), exact

    def _pool(self, data, index, hs, he, ws, we):
        n, c, h, w = data.shape
        r = index.numel()
        ph, pw = self.pooled
        with torch.no_grad():
            x = data.detach()
            kh = max(int((he - hs).max()), 1)
            kw = max(int((we - ws).max()), 1)
            steps_h = torch.arange(kh, device=x.device)
            steps_w = torch.arange(kw, device=x.device)
            rows = hs[:, :, None] + steps_h                         # (R, PH, Kh)
            row_ok = rows < he[:, :, None]
            cols = ws[:, :, None] + steps_w                         # (R, PW, Kw)
            col_ok = cols < we[:, :, None]
            rows, cols = rows.clamp(max=h - 1), cols.clamp(max=w - 1)
            # Stage 1: per box, bin row and column, the max down the bin's rows and
            # the first row holding it.
            g = x[index[:, None, None], :, rows, :]                 # (R, PH, Kh, C, W)
            g = g.masked_fill(~row_ok[:, :, :, None, None], float("-inf"))
            col_max = g.amax(dim=2)                                 # (R, PH, C, W)
            first = torch.where(g == col_max[:, :, None], steps_h[:, None, None],
                                kh).amin(dim=2)
            first_row = hs[:, :, None, None] + first                # (R, PH, C, W)
            # Stage 2: across the bin's columns, the max and its first cell in
            # row-major order (Caffe scans h, then w, keeping strictly larger values).
            idx = cols.reshape(r, 1, 1, pw * kw).expand(r, ph, c, pw * kw)
            cm = col_max.gather(3, idx).view(r, ph, c, pw, kw)
            fr = first_row.gather(3, idx).view(r, ph, c, pw, kw)
            ok = col_ok.view(r, 1, 1, pw, kw)
            cm = cm.masked_fill(~ok, float("-inf"))
            best = cm.amax(dim=-1, keepdim=True)
            key = torch.where((cm == best) & ok, fr * w + cols.view(r, 1, 1, pw, kw), h * w)
            cell = key.amin(dim=-1)                                 # (R, PH, C, PW)
            cell = torch.where(cell >= h * w, 0, cell)                # empty bins
            channel = torch.arange(c, device=x.device)[None, None, :, None]
            flat = ((index[:, None, None, None] * c + channel) * (h * w) + cell)
        top = data.reshape(-1)[flat]                                # (R, PH, C, PW)
        return top.permute(0, 2, 1, 3)


@register("PSROIPooling")
class PSROIPooling(Layer):
    """R-FCN's position-sensitive average pooling: bin (i, j) of output channel k
    averages input channel (k * group_size + i) * group_size + j over the bin.
    Top: (R, output_dim, group_size, group_size)."""
    exact_bottoms = 2
    exact_tops = 1

    def setup(self, bottom_shapes):
        p = self.param.psroi_pooling_param
        missing = [f for f in ("spatial_scale", "output_dim", "group_size")
                   if not p.HasField(f)]
        if missing:
            raise self.error("psroi_pooling_param needs " + ", ".join(missing) +
                             " (R-FCN declares them required)")
        if p.output_dim <= 0 or p.group_size <= 0:
            raise self.error(f"output_dim and group_size must be > 0, got "
                             f"{p.output_dim} and {p.group_size}")
        self.spatial_scale = p.spatial_scale
        self.output_dim, self.group = p.output_dim, p.group_size

    def allow_force_backward(self, bottom_index):
        return bottom_index == 0

    def reshape(self, bottom_shapes):
        rois = _check_rois(self, bottom_shapes[0], bottom_shapes[1])
        need = self.output_dim * self.group * self.group
        if bottom_shapes[0][1] != need:
            raise self.shape_error(f"data has {bottom_shapes[0][1]} channels; output_dim "
                                   f"{self.output_dim} x group_size^2 {self.group ** 2} "
                                   f"needs {need}")
        return [(rois, self.output_dim, self.group, self.group)]

    def forward(self, data, rois):
        n, c, h, w = data.shape
        g, dim = self.group, self.output_dim
        index, boxes = _boxes(self, rois, n)
        if index.numel() == 0:
            return data.new_zeros((0, dim, g, g))
        with torch.no_grad():
            f32 = dict(dtype=torch.float32, device=data.device)
            scale = torch.tensor(self.spatial_scale, **f32)
            rounded = c_round(boxes)
            x1, y1 = rounded[:, 0] * scale, rounded[:, 1] * scale
            x2, y2 = (rounded[:, 2] + 1) * scale, (rounded[:, 3] + 1) * scale
            tenth = torch.tensor(0.1, **f32)
            bin_w = torch.maximum(x2 - x1, tenth) / torch.tensor(float(g), **f32)
            bin_h = torch.maximum(y2 - y1, tenth) / torch.tensor(float(g), **f32)
            p = torch.arange(g, **f32)
            hs = torch.floor(p[None] * bin_h[:, None] + y1[:, None]).long().clamp(0, h)
            he = torch.ceil((p[None] + 1) * bin_h[:, None] + y1[:, None]).long().clamp(0, h)
            ws = torch.floor(p[None] * bin_w[:, None] + x1[:, None]).long().clamp(0, w)
            we = torch.ceil((p[None] + 1) * bin_w[:, None] + x1[:, None]).long().clamp(0, w)
            # Channel of (box, k, i, j) and the four corners of its bin in the
            # zero-padded integral image.
            k = torch.arange(dim, device=data.device)[None, :, None, None]
            i = torch.arange(g, device=data.device)[None, None, :, None]
            j = torch.arange(g, device=data.device)[None, None, None, :]
            channel = (k * g + i) * g + j                            # (1, D, G, G)
            base = (index[:, None, None, None] * c + channel) * ((h + 1) * (w + 1))
            top_, bottom_ = hs[:, None, :, None], he[:, None, :, None]
            left, right = ws[:, None, None, :], we[:, None, None, :]
            area = ((bottom_ - top_) * (right - left)).expand(-1, dim, -1, -1)
            corners = [base + r_ * (w + 1) + c_ for r_, c_ in
                       ((bottom_, right), (top_, right), (bottom_, left), (top_, left))]
        # Summed-area table in float64 so differences of large sums stay exact.
        table = torch.nn.functional.pad(data.double().cumsum(2).cumsum(3), (1, 0, 1, 0))
        flat = table.reshape(-1)
        sums = flat[corners[0]] - flat[corners[1]] - flat[corners[2]] + flat[corners[3]]
        zero = torch.zeros((), dtype=sums.dtype, device=sums.device)
        mean = torch.where(area > 0, sums / area.clamp(min=1), zero)
        return mean.to(data.dtype)


@register("SmoothL1Loss")
class SmoothL1Loss(_Loss):
    """Fast R-CNN's box regression loss: sum(w_out * f(w_in * (a - b))) / N, with
    f(x) = 0.5 (sigma x)^2 for |x| < 1 / sigma^2 and |x| - 0.5 / sigma^2 otherwise.
    Bottoms: predictions, targets, and optionally inside and outside weights (both,
    or neither). The weights get no gradient, as in the fork."""
    exact_bottoms = None
    min_bottoms = 2
    max_bottoms = 4
    label_bottoms = (2, 3)

    def setup(self, bottom_shapes):
        super().setup(bottom_shapes)
        if len(bottom_shapes) == 3:
            raise self.error("takes 2 bottoms, or 4 (with both inside and outside "
                             "weights); got 3")
        sigma = self.param.smooth_l1_loss_param.sigma
        self.sigma2 = sigma * sigma

    def reshape(self, bottom_shapes):
        first = bottom_shapes[0]
        for i, shape in enumerate(bottom_shapes[1:], 1):
            if tuple(shape[1:]) != tuple(first[1:]) or not shape:
                raise self.shape_error(f"bottom {i} {list(shape)} must match bottom 0 "
                                       f"{list(first)} past the first axis")
        if not first:
            raise self.shape_error("bottom 0 must have a first (batch) axis")
        return [()]

    def forward(self, pred, target, inside=None, outside=None):
        diff = pred - target.reshape(pred.shape)
        if inside is not None:
            diff = inside.detach().reshape(pred.shape) * diff
        small = diff.abs() < 1.0 / self.sigma2
        errors = torch.where(small, 0.5 * diff * diff * self.sigma2,
                             diff.abs() - 0.5 / self.sigma2)
        if outside is not None:
            errors = outside.detach().reshape(pred.shape) * errors
        return errors.sum() / pred.shape[0]
