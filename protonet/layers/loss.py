"""Loss layers: Caffe's objectives, normalizers and hand-written gradients.

Every loss top is a 0-d tensor. The net multiplies it by the layer's loss weight, so
autograd scales each gradient by that weight just as Caffe seeds a loss top's diff with
it. Where Caffe's backward is not the derivative of its forward (clamped logarithms,
positions skipped by ignore_label, the contrastive margin term), a custom autograd
Function reproduces Caffe's gradient rather than the mathematical one.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ProtonetError
from ..io.binary import read_binary
from ..io.weights import blob_to_array
from ..proto import caffe_pb2
from .base import Layer
from .registry import register

Norm = caffe_pb2.LossParameter
FLT_MIN = float(np.finfo(np.float32).tiny)   # SoftmaxWithLoss's floor under log
LOG_THRESHOLD = 1e-20                        # Caffe's kLOG_THRESHOLD
CONTRASTIVE_EPSILON = 1e-4                   # added to the distance in Caffe's gradient


def loss_normalizer(mode: int, valid_count: torch.Tensor, outer: int,
                    inner: int) -> torch.Tensor:
    """Caffe's get_normalizer: the divisor for `mode`, never below 1."""
    if mode == Norm.VALID:
        return valid_count.to(torch.float32).clamp(min=1.0)
    size = {Norm.FULL: outer * inner, Norm.BATCH_SIZE: outer, Norm.NONE: 1}[mode]
    return torch.tensor(float(max(1, size)), device=valid_count.device)


def _count(shape, start: int = 0, end: int | None = None) -> int:
    """Caffe's Blob::count(start, end) for a shape."""
    return int(np.prod(shape[start:end], dtype=np.int64))


class _Loss(Layer):
    """Two bottoms (data, label) sharing their first axis, one scalar top."""
    exact_bottoms = 2
    exact_tops = 1
    is_loss = True
    label_bottoms: tuple[int, ...] = (1,)   # bottoms Caffe never sends a gradient to

    def setup(self, bottom_shapes):
        for i in self.label_bottoms:
            if i < len(self.param.propagate_down) and self.param.propagate_down[i]:
                raise self.error(f"cannot back-propagate to bottom {i} "
                                 f"('{self.param.bottom[i]}'); set propagate_down false")

    def allow_force_backward(self, bottom_index):
        return bottom_index not in self.label_bottoms

    def reshape(self, bottom_shapes):
        data, label = bottom_shapes[0], bottom_shapes[1]
        if not data or not label or data[0] != label[0]:
            raise self.shape_error(f"data {list(data)} and label {list(label)} must have "
                                   "the same first dimension")
        return [()]

    def legacy_dims(self, shape, what: str) -> tuple[int, ...]:
        """Caffe's (num, channels, height, width) view of a blob of at most 4 axes."""
        if len(shape) > 4:
            raise self.shape_error(f"{what} {list(shape)} has more than 4 axes")
        return tuple(shape) + (1,) * (4 - len(shape))

    def ignore_label(self) -> int | None:
        loss_param = self.param.loss_param
        return loss_param.ignore_label if loss_param.HasField("ignore_label") else None

    def class_indices(self, label: torch.Tensor, num_classes: int,
                      ignore: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels as indices (ignored ones set to 0) and the mask of counted ones."""
        index = label.detach().long()          # truncation, like static_cast<int>
        valid = index != ignore if ignore is not None else torch.ones_like(index, dtype=bool)
        bad = valid & ((index < 0) | (index >= num_classes))
        if bool(bad.any()):
            raise self.error(f"label {int(index[bad][0])} is outside [0, {num_classes})")
        return torch.where(valid, index, 0), valid


# -- SoftmaxWithLoss and InfogainLoss: a softmax over a class axis ---------------------
class _SoftmaxLossFunction(torch.autograd.Function):
    """-log(max(p[label], FLT_MIN)) over counted positions; Caffe's (p - 1[label]).
    With `weight` (SegNet/ENet's class_weighting, one value per position, by its
    label) both are multiplied by it; the normalizer stays the count."""

    @staticmethod
    def forward(ctx, scores, index, valid, normalizer, weight=None):
        prob = torch.softmax(scores, dim=1)
        picked = prob.gather(1, index.unsqueeze(1)).squeeze(1)
        nll = -torch.log(picked.clamp(min=FLT_MIN))
        if weight is not None:
            nll = nll * weight
        ctx.save_for_backward(prob, index, valid, normalizer, weight)
        ctx.mark_non_differentiable(prob)
        return torch.where(valid, nll, 0.0).sum() / normalizer, prob

    @staticmethod
    def backward(ctx, grad_loss, _grad_prob):
        prob, index, valid, normalizer, weight = ctx.saved_tensors
        grad = prob.scatter_add(1, index.unsqueeze(1),
                                torch.full_like(prob[:, :1], -1.0))
        if weight is not None:
            grad = grad * weight.unsqueeze(1)
        grad = torch.where(valid.unsqueeze(1), grad, 0.0)
        return grad * (grad_loss / normalizer), None, None, None, None


class _InfogainFunction(torch.autograd.Function):
    """-sum_l H[label, l] log(max(p_l, 1e-20)); Caffe's p * rowsum(H)[label] - H[label]."""

    @staticmethod
    def forward(ctx, scores, index, valid, infogain, normalizer):
        prob = torch.softmax(scores, dim=1)
        rows = infogain[index].movedim(-1, 1)          # (outer, classes, inner)
        per_position = -(rows * torch.log(prob.clamp(min=LOG_THRESHOLD))).sum(1)
        ctx.save_for_backward(prob, index, valid, infogain, normalizer)
        ctx.mark_non_differentiable(prob)
        return torch.where(valid, per_position, 0.0).sum() / normalizer, prob

    @staticmethod
    def backward(ctx, grad_loss, _grad_prob):
        prob, index, valid, infogain, normalizer = ctx.saved_tensors
        rows = infogain[index].movedim(-1, 1)
        row_sums = infogain.sum(1)[index].unsqueeze(1)
        grad = torch.where(valid.unsqueeze(1), prob * row_sums - rows, 0.0)
        return grad * (grad_loss / normalizer), None, None, None, None


class _ClassAxisLoss(_Loss):
    """Scores with classes on `axis`, one label per other position, optional prob top."""
    exact_tops = None
    min_tops = 1
    max_tops = 2

    def class_axis(self) -> int:
        raise NotImplementedError

    def split(self, shape) -> tuple[int, int, int]:
        """(outer, classes, inner) around the class axis."""
        axis = self.canonical_axis(self.class_axis(), len(shape))
        return _count(shape, 0, axis), int(shape[axis]), _count(shape, axis + 1)

    def reshape(self, bottom_shapes):
        tops = super().reshape(bottom_shapes)
        outer, classes, inner = self.split(bottom_shapes[0])
        labels = _count(bottom_shapes[1])
        if labels != outer * inner:
            raise self.shape_error(
                f"has {labels} labels for {outer * inner} predictions: scores "
                f"{list(bottom_shapes[0])} with {classes} classes on axis "
                f"{self.class_axis()} need one label per other position")
        return tops + [tuple(bottom_shapes[0])] * (self.num_tops - 1)

    def prepare(self, scores: torch.Tensor, label: torch.Tensor):
        """Scores as (outer, classes, inner), label indices, mask and normalizer."""
        outer, classes, inner = self.split(scores.shape)
        index, valid = self.class_indices(label.reshape(outer, inner), classes,
                                          self.ignore_label())
        normalizer = loss_normalizer(self.normalization, valid.sum(), outer, inner)
        return scores.reshape(outer, classes, inner), index, valid, normalizer

    def tops(self, loss: torch.Tensor, prob: torch.Tensor, shape):
        return [loss, prob.reshape(shape)] if self.num_tops == 2 else loss


@register("SoftmaxWithLoss")
class SoftmaxWithLoss(_ClassAxisLoss):
    """Multinomial logistic loss of a softmax; second top: the probabilities.

    SegNet's and ENet's forks add `weight_by_label_freqs` with one `class_weighting`
    per class: each position's loss and gradient are multiplied by its label's weight
    (the normalizer is still the count of positions)."""

    def setup(self, bottom_shapes):
        super().setup(bottom_shapes)
        loss_param = self.param.loss_param
        if not loss_param.HasField("normalization") and loss_param.HasField("normalize"):
            self.normalization = Norm.VALID if loss_param.normalize else Norm.BATCH_SIZE
        else:
            self.normalization = loss_param.normalization
        weights = list(loss_param.class_weighting) if loss_param.weight_by_label_freqs \
            else []
        if loss_param.weight_by_label_freqs and not weights:
            raise self.error("weight_by_label_freqs needs one class_weighting per class")
        self.register_buffer("class_weights", torch.tensor(weights, dtype=torch.float32),
                             persistent=False)

    def reshape(self, bottom_shapes):
        tops = super().reshape(bottom_shapes)
        classes = self.split(bottom_shapes[0])[1]
        if self.class_weights.numel() and self.class_weights.numel() != classes:
            raise self.shape_error(f"{self.class_weights.numel()} class_weighting values "
                                   f"for {classes} classes")
        return tops

    def class_axis(self):
        return self.param.softmax_param.axis

    def forward(self, scores, label):
        scores3, index, valid, normalizer = self.prepare(scores, label)
        weight = None
        if self.class_weights.numel():
            weight = self.class_weights.to(scores.dtype)[index]
        loss, prob = _SoftmaxLossFunction.apply(scores3, index, valid, normalizer, weight)
        return self.tops(loss, prob, scores.shape)


@register("InfogainLoss")
class InfogainLoss(_ClassAxisLoss):
    """Softmax loss weighted by an infogain matrix H (from a file or a third bottom)."""
    exact_bottoms = None
    min_bottoms = 2
    max_bottoms = 3
    label_bottoms = (1, 2)

    def setup(self, bottom_shapes):
        super().setup(bottom_shapes)
        if self.param.loss_param.HasField("normalize"):
            raise self.error("loss_param.normalize is deprecated here; use normalization")
        self.normalization = self.param.loss_param.normalization
        matrix = self.read_infogain() if len(bottom_shapes) < 3 else torch.empty(0)
        self.register_buffer("infogain", matrix, persistent=False)

    def read_infogain(self) -> torch.Tensor:
        source = self.param.infogain_loss_param.source
        if not source:
            raise self.error("needs infogain_loss_param.source (a BlobProto file) "
                             "or the matrix H as a third bottom")
        try:
            blob = read_binary(source, caffe_pb2.BlobProto())
            array = blob_to_array(blob, where=f"infogain matrix {source}")
        except ProtonetError as e:
            raise self.error(f"cannot load the infogain matrix: {e}") from None
        return torch.from_numpy(array.copy())

    def class_axis(self):
        return self.param.infogain_loss_param.axis

    def reshape(self, bottom_shapes):
        tops = super().reshape(bottom_shapes)
        classes = self.split(bottom_shapes[0])[1]
        entries = _count(bottom_shapes[2]) if len(bottom_shapes) == 3 else self.infogain.numel()
        if entries != classes * classes:
            raise self.shape_error(f"infogain matrix has {entries} entries; {classes} "
                                   f"classes need {classes}x{classes}")
        return tops

    def forward(self, scores, label, infogain=None):
        matrix = self.infogain if infogain is None else infogain.detach()
        scores3, index, valid, normalizer = self.prepare(scores, label)
        classes = scores3.shape[1]
        loss, prob = _InfogainFunction.apply(scores3, index, valid,
                                             matrix.reshape(classes, classes), normalizer)
        return self.tops(loss, prob, scores.shape)


# -- losses on the first axis --------------------------------------------------------
@register("EuclideanLoss")
class EuclideanLoss(_Loss):
    """sum((a - b)^2) / (2 N); both bottoms get a gradient, with opposite signs."""
    label_bottoms = ()

    def reshape(self, bottom_shapes):
        tops = super().reshape(bottom_shapes)
        a, b = (_count(s, 1) for s in bottom_shapes)
        if a != b:
            raise self.shape_error(f"bottoms {list(bottom_shapes[0])} and "
                                   f"{list(bottom_shapes[1])} differ in size per item "
                                   f"({a} vs {b})")
        return tops

    def forward(self, a, b):
        diff = a - b.reshape(a.shape)
        return (diff * diff).sum() / a.shape[0] / 2


@register("SigmoidCrossEntropyLoss")
class SigmoidCrossEntropyLoss(_Loss):
    """Cross-entropy of sigmoid(x) against targets in [0, 1]; gradient sigmoid(x) - t."""

    def setup(self, bottom_shapes):
        super().setup(bottom_shapes)
        loss_param = self.param.loss_param
        if loss_param.HasField("normalization"):
            self.normalization = loss_param.normalization
        elif loss_param.HasField("normalize"):
            self.normalization = Norm.VALID if loss_param.normalize else Norm.BATCH_SIZE
        else:
            self.normalization = Norm.BATCH_SIZE

    def reshape(self, bottom_shapes):
        tops = super().reshape(bottom_shapes)
        scores, targets = (_count(s) for s in bottom_shapes)
        if scores != targets:
            raise self.shape_error(f"has {targets} targets for {scores} scores; "
                                   "the bottoms must have the same count")
        return tops

    def forward(self, scores, target):
        target = target.detach().reshape(scores.shape)
        ignore = self.ignore_label()
        per_item = F.binary_cross_entropy_with_logits(scores, target, reduction="none")
        if ignore is None:
            valid_count = torch.tensor(scores.numel(), device=scores.device)
        else:
            valid = target.long() != ignore
            per_item = torch.where(valid, per_item, 0.0)
            valid_count = valid.sum()
        normalizer = loss_normalizer(self.normalization, valid_count, scores.shape[0],
                                     _count(scores.shape, 1))
        return per_item.sum() / normalizer


@register("HingeLoss")
class HingeLoss(_Loss):
    """One-vs-all hinge: sum(max(0, 1 -/+ x))/N, the label's score negated; L1 or L2."""

    def reshape(self, bottom_shapes):
        tops = super().reshape(bottom_shapes)
        if _count(bottom_shapes[1]) != bottom_shapes[0][0]:
            raise self.shape_error(f"needs one label per item: label "
                                   f"{list(bottom_shapes[1])} for scores "
                                   f"{list(bottom_shapes[0])}")
        return tops

    def forward(self, scores, label):
        num = scores.shape[0]
        flat = scores.reshape(num, -1)
        index, _ = self.class_indices(label.reshape(num), flat.shape[1], None)
        sign = torch.ones_like(flat).scatter(1, index.unsqueeze(1), -1.0)
        # relu's gradient is 0 at the kink, Caffe's sign(0) = 0 subgradient.
        margin = torch.relu(1 + sign * flat)
        if self.param.hinge_loss_param.norm == caffe_pb2.HingeLossParameter.L2:
            return (margin * margin).sum() / num
        return margin.sum() / num


class _MultinomialLogisticFunction(torch.autograd.Function):
    """-mean log(max(p[label], 1e-20)); Caffe's gradient -1/max(p, 1e-20) even when clamped."""

    @staticmethod
    def forward(ctx, prob, index):
        picked = prob.gather(1, index.unsqueeze(1)).clamp(min=LOG_THRESHOLD)
        ctx.save_for_backward(picked, index)
        ctx.shape = prob.shape
        return -torch.log(picked).sum() / prob.shape[0]

    @staticmethod
    def backward(ctx, grad_loss):
        picked, index = ctx.saved_tensors
        scale = -grad_loss / ctx.shape[0]
        grad = picked.new_zeros(ctx.shape).scatter(1, index.unsqueeze(1), scale / picked)
        return grad, None


@register("MultinomialLogisticLoss")
class MultinomialLogisticLoss(_Loss):
    """Negative log of given probabilities at the labels, averaged over the batch."""

    def reshape(self, bottom_shapes):
        tops = super().reshape(bottom_shapes)
        if self.legacy_dims(bottom_shapes[1], "label")[1:] != (1, 1, 1):
            raise self.shape_error(f"label must be shaped (N,) or (N, 1, 1, 1), "
                                   f"got {list(bottom_shapes[1])}")
        return tops

    def forward(self, prob, label):
        num = prob.shape[0]
        flat = prob.reshape(num, -1)
        index, _ = self.class_indices(label.reshape(num), flat.shape[1], None)
        return _MultinomialLogisticFunction.apply(flat, index)


class _ContrastiveFunction(torch.autograd.Function):
    """Caffe's contrastive loss with its gradient (distance + 1e-4 in the margin term)."""

    @staticmethod
    def forward(ctx, a, b, similar, margin, legacy):
        diff = a - b
        dist_sq = (diff * diff).sum(1)
        if legacy:
            apart = (margin - dist_sq).clamp(min=0)
        else:
            apart = (margin - dist_sq.sqrt()).clamp(min=0) ** 2
        ctx.save_for_backward(diff, dist_sq, similar)
        ctx.margin, ctx.legacy = margin, legacy
        return torch.where(similar, dist_sq, apart).sum() / a.shape[0] / 2

    @staticmethod
    def backward(ctx, grad_loss):
        diff, dist_sq, similar = ctx.saved_tensors
        if ctx.legacy:
            gap = ctx.margin - dist_sq
            apart = torch.full_like(gap, -1.0)
        else:
            dist = dist_sq.sqrt()
            gap = ctx.margin - dist
            apart = -gap / (dist + CONTRASTIVE_EPSILON)
        coefficient = torch.where(similar, 1.0, torch.where(gap > 0, apart, 0.0))
        grad = (grad_loss / diff.shape[0]) * coefficient.unsqueeze(1) * diff
        return grad, -grad, None, None, None


@register("ContrastiveLoss")
class ContrastiveLoss(_Loss):
    """Siamese loss: d^2 for similar pairs, max(0, margin - d)^2 for the others."""
    exact_bottoms = 3
    label_bottoms = (2,)

    def setup(self, bottom_shapes):
        """Caffe accepts propagate_down on the similarity labels (and sends nothing)."""

    def reshape(self, bottom_shapes):
        tops = super().reshape(bottom_shapes)
        a, b, similar = (self.legacy_dims(shape, what) for shape, what in
                         zip(bottom_shapes, ("features", "features", "similarity labels")))
        if a[1] != b[1] or a[2:] != (1, 1) or b[2:] != (1, 1):
            raise self.shape_error(f"features {list(bottom_shapes[0])} and "
                                   f"{list(bottom_shapes[1])} must both be (N, C) or "
                                   "(N, C, 1, 1) with the same C")
        if similar != (a[0], 1, 1, 1):
            raise self.shape_error(f"needs one similarity label per pair, shaped (N,) or "
                                   f"(N, 1, 1, 1): got {list(bottom_shapes[2])} for "
                                   f"features {list(bottom_shapes[0])}")
        return tops

    def forward(self, a, b, similar):
        num = a.shape[0]
        same = similar.detach().reshape(num).long() != 0
        p = self.param.contrastive_loss_param
        return _ContrastiveFunction.apply(a.reshape(num, -1), b.reshape(num, -1), same,
                                          p.margin, p.legacy_version)
