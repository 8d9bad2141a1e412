"""SSD's layers, as Wei Liu's Caffe fork (weiliu89/caffe, branch `ssd`) computes them:
PriorBox, DetectionOutput, Permute and Normalize.

PriorBox's boxes depend on shapes only, so they are computed once per shape in the
fork's own arithmetic (float32 centers and steps, float64 edges rounded to float32,
min/max sizes truncated to integers as its `int min_size_` does) and cached.
DetectionOutput decodes every prior at once and runs the fork's greedy per-class NMS
(ApplyNMSFast: keep a candidate when its overlap with every kept box is at most the
(adaptive) threshold) over a precomputed IoU matrix, the candidates of all classes
side by side; its top holds one [image, label, score, xmin, ymin, xmax, ymax] row per
detection, image by image, labels ascending, and where nothing is found one row of -1
per image carrying the image index, as the fork writes. Normalize carries the fork's
Backward_cpu, which differs from the true derivative when the scale is per channel.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..fillers import fill
from ..proto import caffe_pb2
from .base import Layer
from .registry import register

IOU_ELEMENTS = 1 << 24      # largest IoU matrix (classes x K x K) built at once


# -- PriorBox ---------------------------------------------------------------------------------
@register("PriorBox")
class PriorBox(Layer):
    """Default boxes of a feature map (bottom 0) over the image (bottom 1): top
    [1, 2, H*W*num_priors*4], the boxes (xmin, ymin, xmax, ymax, normalized) then
    their variances."""
    exact_bottoms = 2
    exact_tops = 1

    def setup(self, bottom_shapes):
        p = self.param.prior_box_param
        if not p.min_size:
            raise self.error("prior_box_param needs a min_size")
        if any(s <= 0 for s in p.min_size):
            raise self.error(f"min_size must be positive, got {list(p.min_size)}")
        self.min_sizes = [float(s) for s in p.min_size]
        self.aspect_ratios = [1.0]
        for ar in p.aspect_ratio:
            if any(abs(ar - known) < 1e-6 for known in self.aspect_ratios):
                continue
            self.aspect_ratios.append(float(ar))
            if p.flip:
                self.aspect_ratios.append(float(np.float32(1.0 / ar)))
        self.max_sizes = [float(s) for s in p.max_size]
        if self.max_sizes:
            if len(self.max_sizes) != len(self.min_sizes):
                raise self.error(f"needs as many max_size ({len(self.max_sizes)}) as "
                                 f"min_size ({len(self.min_sizes)})")
            for lo, hi in zip(self.min_sizes, self.max_sizes):
                if hi <= lo:
                    raise self.error(f"max_size {hi} must be greater than min_size {lo}")
        self.num_priors = (len(self.aspect_ratios) * len(self.min_sizes)
                           + len(self.max_sizes))
        if len(p.variance) > 1 and len(p.variance) != 4:
            raise self.error(f"give 1 or 4 variances, got {len(p.variance)}")
        if any(v <= 0 for v in p.variance):
            raise self.error(f"variances must be positive, got {list(p.variance)}")
        self.variance = [float(v) for v in p.variance] or [0.1]
        self.img_h, self.img_w = self._pair(p, "img_size", "img_h", "img_w", int)
        self.step_h, self.step_w = self._pair(p, "step", "step_h", "step_w", float)
        self._cache: dict = {}

    def _pair(self, p, both: str, h: str, w: str, kind):
        if p.HasField(h) or p.HasField(w):
            if p.HasField(both):
                raise self.error(f"give either {both} or {h}/{w}, not both")
            pair = kind(getattr(p, h)), kind(getattr(p, w))
            if min(pair) <= 0:
                raise self.error(f"{h} and {w} must be larger than 0, got {pair}")
            return pair
        if p.HasField(both):
            value = kind(getattr(p, both))
            if value <= 0:
                raise self.error(f"{both} must be larger than 0, got {value}")
            return value, value
        return 0, 0

    def reshape(self, bottom_shapes):
        feature, image = bottom_shapes
        if len(feature) != 4 or len(image) != 4:
            raise self.shape_error(f"needs 4-axis bottoms, got {list(feature)} and "
                                   f"{list(image)}")
        return [(1, 2, feature[2] * feature[3] * self.num_priors * 4)]

    def forward(self, feature, image):
        key = (tuple(feature.shape[2:]), tuple(image.shape[2:]), feature.device)
        if key not in self._cache:
            self._cache = {key: self.priors(feature.shape[2], feature.shape[3],
                                            image.shape[2], image.shape[3]).to(feature.device)}
        return self._cache[key].to(feature.dtype)

    def priors(self, layer_h: int, layer_w: int, image_h: int, image_w: int) -> torch.Tensor:
        """The [1, 2, layer_h*layer_w*num_priors*4] top, in the fork's arithmetic."""
        p = self.param.prior_box_param
        img_h, img_w = (self.img_h, self.img_w) if self.img_h and self.img_w \
            else (image_h, image_w)
        f32 = np.float32
        if self.step_h and self.step_w:
            step_h, step_w = f32(self.step_h), f32(self.step_w)
        else:
            step_h, step_w = f32(img_h) / f32(layer_h), f32(img_w) / f32(layer_w)
        offset = f32(p.offset)
        cx = ((np.arange(layer_w, dtype=f32) + offset) * step_w).astype(np.float64)
        cy = ((np.arange(layer_h, dtype=f32) + offset) * step_h).astype(np.float64)
        widths, heights = [], []            # per prior, in the fork's order
        for s, min_size in enumerate(self.min_sizes):
            low = int(min_size)             # the fork stores sizes in an int
            widths.append(f32(low))
            heights.append(f32(low))
            if self.max_sizes:
                side = f32(math.sqrt(low * int(self.max_sizes[s])))
                widths.append(side)
                heights.append(side)
            for ar in self.aspect_ratios:
                if abs(ar - 1.0) < 1e-6:
                    continue
                root = math.sqrt(ar)
                widths.append(f32(low * root))
                heights.append(f32(low / root))
        w = np.asarray(widths, np.float64)
        h = np.asarray(heights, np.float64)
        grid_y = cy[:, None, None]
        grid_x = cx[None, :, None]
        shape = (layer_h, layer_w, len(widths))
        boxes = np.stack([np.broadcast_to((grid_x - w / 2.0) / img_w, shape),
                          np.broadcast_to((grid_y - h / 2.0) / img_h, shape),
                          np.broadcast_to((grid_x + w / 2.0) / img_w, shape),
                          np.broadcast_to((grid_y + h / 2.0) / img_h, shape)], axis=-1)
        boxes = boxes.astype(f32).reshape(-1)
        if p.clip:
            boxes = np.clip(boxes, f32(0), f32(1))
        variance = np.broadcast_to(np.asarray(self.variance, f32),
                                   (boxes.size // len(self.variance), len(self.variance)))
        top = np.stack([boxes, variance.reshape(-1)])[None]
        return torch.from_numpy(np.ascontiguousarray(top))


# -- DetectionOutput --------------------------------------------------------------------------
CODE_TYPES = caffe_pb2.PriorBoxParameter


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor, variances: torch.Tensor,
                 code_type: int, variance_encoded_in_target: bool) -> torch.Tensor:
    """The fork's DecodeBBox for every prediction at once: loc [..., P, 4] with priors
    and variances [P, 4] broadcast over the leading axes -> boxes [..., P, 4]."""
    loc = loc.float()
    var = torch.ones_like(variances) if variance_encoded_in_target else variances
    if code_type == CODE_TYPES.CORNER:
        return priors + var * loc
    width = priors[:, 2] - priors[:, 0]
    height = priors[:, 3] - priors[:, 1]
    if code_type == CODE_TYPES.CORNER_SIZE:
        size = torch.stack([width, height, width, height], dim=1)
        return priors + var * loc * size
    if code_type != CODE_TYPES.CENTER_SIZE:
        raise ValueError(f"unknown code_type {code_type}")
    center_x = (priors[:, 0] + priors[:, 2]) / 2
    center_y = (priors[:, 1] + priors[:, 3]) / 2
    x = var[:, 0] * loc[..., 0] * width + center_x
    y = var[:, 1] * loc[..., 1] * height + center_y
    w = torch.exp(var[:, 2] * loc[..., 2]) * width
    h = torch.exp(var[:, 3] * loc[..., 3]) * height
    return torch.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], dim=-1)


def box_sizes(boxes: torch.Tensor) -> torch.Tensor:
    """The fork's BBoxSize (normalized): width * height, 0 for an inverted box."""
    width = boxes[..., 2] - boxes[..., 0]
    height = boxes[..., 3] - boxes[..., 1]
    invalid = (width < 0) | (height < 0)
    return torch.where(invalid, torch.zeros_like(width), width * height)


def pairwise_iou(boxes: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """The fork's JaccardOverlap of every pair: [..., K, 4] -> [..., K, K]."""
    a, b = boxes[..., :, None, :], boxes[..., None, :, :]
    width = torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])
    height = torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])
    inter = width * height
    union = sizes[..., :, None] + sizes[..., None, :] - inter
    overlap = inter / union
    return torch.where((width > 0) & (height > 0), overlap, torch.zeros_like(overlap))


def greedy_nms(iou: np.ndarray, valid: np.ndarray, threshold: float,
               eta: float) -> np.ndarray:
    """ApplyNMSFast over candidates already in score order, several classes side by
    side: iou [C, K, K], valid [C, K] -> kept [C, K]. A candidate is kept when its
    overlap with every kept one is at most the class's current threshold, which eta
    shrinks after each kept box while it is above 0.5."""
    if eta >= 1:
        return _greedy_fixed(iou > threshold, valid)
    classes, k = valid.shape
    kept = np.zeros_like(valid)
    limit = np.full(classes, threshold, dtype=np.float32)
    for j in range(k):
        clash = (iou[:, j, :j] > limit[:, None]) & kept[:, :j]
        keep = valid[:, j] & ~clash.any(axis=1)
        kept[:, j] = keep
        shrink = keep & (limit > 0.5)
        limit[shrink] *= np.float32(eta)
    return kept


def _greedy_fixed(overlapping: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The same with a fixed threshold, one step per kept box: the first candidate no
    kept box overlaps is kept, and strikes out the later ones it overlaps."""
    alive = valid.copy()
    kept = np.zeros_like(valid)
    while True:
        rows = np.flatnonzero(alive.any(axis=1))
        if not len(rows):
            return kept
        first = alive[rows].argmax(axis=1)
        kept[rows, first] = True
        alive[rows] &= ~overlapping[rows, first]
        alive[rows, first] = False


@register("DetectionOutput")
class DetectionOutput(Layer):
    """Bottoms: loc [N, P*L*4], conf [N, P*C] (already softmaxed), priors [., 2, P*4].
    Top: [1, 1, detections, 7]."""
    exact_bottoms = 3
    exact_tops = 1

    def setup(self, bottom_shapes):
        p = self.param.detection_output_param
        if not p.HasField("num_classes"):
            raise self.error("detection_output_param needs num_classes")
        self.num_classes = p.num_classes
        self.share_location = p.share_location
        self.num_loc_classes = 1 if p.share_location else p.num_classes
        self.background = p.background_label_id
        self.code_type = p.code_type
        if self.code_type not in (CODE_TYPES.CORNER, CODE_TYPES.CENTER_SIZE,
                                  CODE_TYPES.CORNER_SIZE):
            raise self.error(f"unknown code_type {self.code_type}")
        self.variance_in_target = p.variance_encoded_in_target
        self.keep_top_k = p.keep_top_k
        self.confidence_threshold = (p.confidence_threshold
                                     if p.HasField("confidence_threshold")
                                     else -np.finfo(np.float32).max)
        nms = p.nms_param
        self.nms_threshold = nms.nms_threshold
        if self.nms_threshold < 0:
            raise self.error(f"nms_threshold must be non negative, got {self.nms_threshold}")
        self.eta = nms.eta
        if not 0 < self.eta <= 1:
            raise self.error(f"nms_param.eta must be in (0, 1], got {self.eta}")
        self.top_k = nms.top_k if nms.HasField("top_k") else -1

    def reshape(self, bottom_shapes):
        loc, conf, priors = bottom_shapes
        if loc[0] != conf[0]:
            raise self.shape_error(f"loc {list(loc)} and conf {list(conf)} differ in num")
        if len(priors) < 3:
            raise self.shape_error(f"priors need 3 axes [1, 2, P*4], got {list(priors)}")
        self.num_priors = priors[2] // 4
        if self.num_priors * self.num_loc_classes * 4 != _count(loc, 1):
            raise self.shape_error(f"{self.num_priors} priors need "
                                   f"{self.num_priors * self.num_loc_classes * 4} location "
                                   f"values per item, loc {list(loc)} has {_count(loc, 1)}")
        if self.num_priors * self.num_classes != _count(conf, 1):
            raise self.shape_error(f"{self.num_priors} priors need "
                                   f"{self.num_priors * self.num_classes} confidences per "
                                   f"item, conf {list(conf)} has {_count(conf, 1)}")
        return [(1, 1, 1, 7)]

    def allow_force_backward(self, bottom_index):
        return False

    def forward(self, loc, conf, priors):
        with torch.no_grad():
            return self._detect(loc.detach(), conf.detach(), priors.detach())

    def _detect(self, loc, conf, priors):
        num, count = loc.shape[0], self.num_priors
        prior = priors.reshape(-1, 2, count * 4)[0].float()
        boxes = decode_boxes(loc.reshape(num, count, self.num_loc_classes, 4).transpose(1, 2),
                             prior[0].view(count, 4), prior[1].view(count, 4),
                             self.code_type, self.variance_in_target)      # [N, L, P, 4]
        scores = conf.reshape(num, count, self.num_classes).transpose(1, 2).float()
        classes = [c for c in range(self.num_classes) if c != self.background]
        rows = []
        for i in range(num):
            kept = self._image(boxes[i], scores[i], classes)
            rows.extend((i, label, score, index) for label, index, score in kept)
        if not rows:
            top = torch.full((1, 1, num, 7), -1.0, device=loc.device)
            top[0, 0, :, 0] = torch.arange(num, device=loc.device, dtype=top.dtype)
            return top.to(loc.dtype)
        image = torch.tensor([r[0] for r in rows], device=loc.device)
        label = torch.tensor([r[1] for r in rows], device=loc.device)
        index = torch.tensor([r[3] for r in rows], device=loc.device)
        loc_label = torch.zeros_like(label) if self.share_location else label
        chosen = boxes[image, loc_label, index]
        score = scores[image, label, index]
        top = torch.cat([image[:, None].float(), label[:, None].float(), score[:, None],
                         chosen], dim=1)
        return top.view(1, 1, -1, 7).to(loc.dtype)

    def _image(self, boxes, scores, classes):
        """(label, prior index, score) kept for one image: boxes [L, P, 4], scores
        [C, P]; labels ascending, each label's boxes in score order."""
        if not classes:
            return []
        labels = torch.tensor(classes, device=scores.device)
        candidate = scores[labels]                                     # [C', P]
        passing = candidate > self.confidence_threshold
        masked = torch.where(passing, candidate, torch.full_like(candidate, -math.inf))
        ordered, order = torch.sort(masked, dim=1, descending=True, stable=True)
        k = int(passing.sum(dim=1).max())
        if self.top_k > -1:
            k = min(k, self.top_k)
        if k == 0:
            return []
        ordered, order = ordered[:, :k], order[:, :k]
        valid = (ordered > -math.inf).cpu().numpy()
        loc_index = torch.zeros_like(labels) if self.share_location else labels
        chosen = boxes[loc_index[:, None], order]                       # [C', K, 4]
        sizes = box_sizes(chosen)
        kept = np.zeros_like(valid)
        chunk = max(1, IOU_ELEMENTS // (k * k))
        for start in range(0, len(classes), chunk):
            part = slice(start, start + chunk)
            iou = pairwise_iou(chosen[part], sizes[part]).cpu().numpy()
            kept[part] = greedy_nms(iou, valid[part], np.float32(self.nms_threshold),
                                    self.eta)
        order_cpu = order.cpu().numpy()
        ordered_cpu = ordered.cpu().numpy()
        found = [(classes[c], int(order_cpu[c, j]), float(ordered_cpu[c, j]))
                 for c in range(len(classes)) for j in np.flatnonzero(kept[c])]
        if self.keep_top_k > -1 and len(found) > self.keep_top_k:
            best = sorted(found, key=lambda f: -f[2])[:self.keep_top_k]
            found = sorted(best, key=lambda f: f[0])       # stable: score order per label
        return found


def _count(shape, start: int) -> int:
    return math.prod(shape[start:])


# -- Permute ----------------------------------------------------------------------------------
@register("Permute")
class Permute(Layer):
    """Axes reordered: the listed `order` first, then the unlisted axes in order."""
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom_shapes):
        axes = len(bottom_shapes[0])
        order = list(self.param.permute_param.order)
        for axis in order:
            if axis >= axes:
                raise self.error(f"order {axis} is not an axis of a {axes}-axis bottom")
        if len(set(order)) != len(order):
            raise self.error(f"order {order} repeats an axis")
        self.order = order + [a for a in range(axes) if a not in order]

    def reshape(self, bottom_shapes):
        shape = bottom_shapes[0]
        if len(shape) != len(self.order):
            raise self.shape_error(f"was set up for {len(self.order)} axes, the bottom "
                                   f"{list(shape)} has {len(shape)}")
        return [tuple(shape[a] for a in self.order)]

    def forward(self, x):
        if self.order == sorted(self.order):
            return x
        return x.permute(*self.order).contiguous()


# -- Normalize --------------------------------------------------------------------------------
@register("Normalize")
class Normalize(Layer):
    """x / sqrt(sum of x^2 + eps) over each item (across_spatial) or over the channels
    at each position, times a learned scale (one value, or one per channel)."""
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom_shapes):
        shape = bottom_shapes[0]
        if not 2 <= len(shape) <= 4:
            raise self.shape_error(f"needs a bottom of 2 to 4 axes, got {list(shape)}")
        p = self.param.norm_param
        self.across_spatial = p.across_spatial
        self.channel_shared = p.channel_shared
        self.eps = p.eps
        self.channels = shape[1]
        blob_shape = () if p.channel_shared else (shape[1],)
        if p.HasField("scale_filler"):
            self.add_blob(blob_shape, p.scale_filler)
        else:
            self.add_blob(blob_shape, value=1.0)

    def reshape(self, bottom_shapes):
        shape = bottom_shapes[0]
        if not 2 <= len(shape) <= 4 or shape[1] != self.channels:
            raise self.shape_error(f"was set up for {self.channels} channels (2 to 4 axes), "
                                   f"got {list(shape)}")
        return [tuple(shape)]

    def forward(self, x):
        scale = self.blobs[0]
        expected = 1 if self.channel_shared else self.channels
        if scale.numel() != expected:
            raise self.shape_error(f"scale blob has {scale.numel()} values, the "
                                   f"prototxt's channel_shared={self.channel_shared} needs "
                                   f"{expected}")
        return _Normalize.apply(x, scale, self.across_spatial, self.eps)


class _Normalize(torch.autograd.Function):
    """The fork's Forward_cpu and Backward_cpu on x viewed as [N, C, spatial]."""

    @staticmethod
    def forward(ctx, x, scale, across_spatial, eps):
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        norm = _norm(flat, across_spatial, eps)
        top = flat * norm.reciprocal() if across_spatial else flat / norm
        top = top * _per_channel(scale, flat)
        ctx.save_for_backward(flat, norm, top, scale)
        ctx.across_spatial = across_spatial
        return top.view(x.shape)

    @staticmethod
    def backward(ctx, top_diff):
        flat, norm, top, scale = ctx.saved_tensors
        diff = top_diff.reshape(flat.shape)
        s = _per_channel(scale, flat)
        grad_scale = grad_x = None
        if ctx.needs_input_grad[1]:
            product = top * diff
            if scale.dim() == 0:
                grad_scale = product.sum() / scale
            else:
                grad_scale = product.sum(dim=(0, 2)) / scale
            grad_scale = grad_scale.reshape(scale.shape)
        if ctx.needs_input_grad[0]:
            if ctx.across_spatial:
                a = (flat * diff).sum(dim=(1, 2), keepdim=True)
                grad_x = (diff - flat * (a / norm / norm)) * norm.reciprocal()
            else:
                a = (flat * diff).sum(dim=1, keepdim=True)
                grad_x = (diff - flat * a / (norm * norm)) / norm
            grad_x = (grad_x * s).view(top_diff.shape)
        return grad_x, grad_scale, None, None


def _norm(flat: torch.Tensor, across_spatial: bool, eps: float) -> torch.Tensor:
    squares = flat * flat
    total = squares.sum(dim=(1, 2), keepdim=True) if across_spatial \
        else squares.sum(dim=1, keepdim=True)
    return torch.sqrt(total + eps)


def _per_channel(scale: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    return scale.reshape(1, -1, 1) if scale.dim() and scale.numel() > 1 \
        else scale.reshape(1, 1, 1)
