"""Turning class scores into probabilities, predictions and accuracies.

Softmax is differentiable (torch's softmax subtracts the max and has Caffe's
backward). ArgMax and Accuracy have no backward in Caffe: their tops are computed
from detached values and their bottoms refuse force_backward. Their tie rules follow
Caffe: ArgMax ranks equal scores by the larger index first, and Accuracy counts a
class whose score equals the true class's score as ranked above it.
"""
from __future__ import annotations

import math

import torch

from .base import Layer
from .registry import register


@register("Softmax")
class Softmax(Layer):
    """exp(x - max) normalized over `axis`."""
    exact_bottoms = 1
    exact_tops = 1

    def reshape(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        self.axis = self.canonical_axis(self.param.softmax_param.axis, len(shape))
        return [shape]

    def forward(self, bottom):
        return torch.softmax(bottom, dim=self.axis)


def _top_k_descending(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values along the last axis and their indices; equal values come
    larger index first (Caffe sorts (value, index) pairs in descending order)."""
    size = scores.shape[-1]
    values, reversed_index = torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True)
    return values[..., :k], (size - 1 - reversed_index[..., :k])


@register("ArgMax")
class ArgMax(Layer):
    """Indices (and with out_max_val, values) of the top_k scores.

    With `axis`: the top shape is the bottom's with that axis set to top_k, holding
    values when out_max_val, else indices. Without: each item is flattened and the
    top is (N, 1 or 2, top_k) padded with 1s to the bottom's axis count, holding the
    indices, then (with out_max_val) the values.
    """
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom_shapes):
        p = self.param.argmax_param
        if p.top_k < 1:
            raise self.error(f"top_k must be at least 1, got {p.top_k}")

    def reshape(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        p = self.param.argmax_param
        if p.HasField("axis"):
            self.axis = self.canonical_axis(p.axis, len(shape))
            if p.top_k > shape[self.axis]:
                raise self.shape_error(f"top_k {p.top_k} exceeds axis {self.axis}'s size "
                                       f"{shape[self.axis]} in {list(shape)}")
            return [shape[:self.axis] + (p.top_k,) + shape[self.axis + 1:]]
        self.axis = None
        if p.top_k > math.prod(shape[1:]):
            raise self.shape_error(f"top_k {p.top_k} exceeds the {math.prod(shape[1:])} "
                                   f"values per item of {list(shape)}")
        top = [1] * max(len(shape), 3)
        top[0], top[1], top[2] = shape[0], 2 if p.out_max_val else 1, p.top_k
        self.top_shape = tuple(top)
        return [self.top_shape]

    def allow_force_backward(self, bottom_index):
        return False

    def forward(self, bottom):
        p = self.param.argmax_param
        scores = bottom.detach()
        if self.axis is not None:
            values, index = _top_k_descending(scores.movedim(self.axis, -1), p.top_k)
            return (values if p.out_max_val else index.to(scores.dtype)).movedim(-1, self.axis)
        values, index = _top_k_descending(scores.reshape(scores.shape[0], -1), p.top_k)
        top = index.to(scores.dtype)
        if p.out_max_val:
            top = torch.cat([top, values], dim=1)
        return top.reshape(self.top_shape)


@register("Accuracy")
class Accuracy(Layer):
    """Fraction of items whose true class is among the top_k scores; optional second
    top: the same per class. Labels equal to ignore_label are skipped."""
    exact_bottoms = 2
    min_tops = 1
    max_tops = 2

    def reshape(self, bottom_shapes):
        scores, labels = tuple(bottom_shapes[0]), tuple(bottom_shapes[1])
        p = self.param.accuracy_param
        label_count = math.prod(labels)
        if label_count == 0 or p.top_k > math.prod(scores) // label_count:
            raise self.shape_error(f"top_k {p.top_k} exceeds the number of classes "
                                   f"(scores {list(scores)}, labels {list(labels)})")
        self.axis = self.canonical_axis(p.axis, len(scores))
        outer, inner = math.prod(scores[:self.axis]), math.prod(scores[self.axis + 1:])
        if outer * inner != label_count:
            raise self.shape_error(
                f"{label_count} labels for {outer * inner} predictions: with scores "
                f"{list(scores)} and class axis {self.axis}, the labels must count "
                f"{outer} x {inner}")
        self.grid = (outer, scores[self.axis], inner)
        return [()] + [(scores[self.axis],)] * (self.num_tops - 1)

    def allow_force_backward(self, bottom_index):
        return False

    def forward(self, scores, labels):
        outer, classes, inner = self.grid
        scores = scores.detach().reshape(outer, classes, inner)
        labels = labels.detach().reshape(outer, inner).to(torch.int64)
        counted = self._counted(labels, classes)
        true_score = scores.gather(1, torch.where(counted, labels, 0).unsqueeze(1))
        # Caffe counts the true class itself and every tie among those ranked above.
        ranked_above = (scores >= true_score).sum(1) - 1
        correct = counted & (ranked_above < self.param.accuracy_param.top_k)
        accuracy = _ratio(correct.sum(), counted.sum())
        if self.num_tops == 1:
            return accuracy
        hits = torch.bincount(labels[correct], minlength=classes)
        totals = torch.bincount(labels[counted], minlength=classes)
        return [accuracy, _ratio(hits, totals)]

    def _counted(self, labels: torch.Tensor, classes: int) -> torch.Tensor:
        """Labels that take part (not ignored); each must name a class."""
        p = self.param.accuracy_param
        counted = labels != p.ignore_label if p.HasField("ignore_label") else \
            torch.ones_like(labels, dtype=torch.bool)
        invalid = counted & ((labels < 0) | (labels >= classes))
        if bool(invalid.any()):
            raise self.error(f"label {int(labels[invalid][0])} is not a class index "
                             f"in [0, {classes})")
        return counted


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator in float32, 0 where the denominator is 0."""
    numerator, denominator = numerator.to(torch.float32), denominator.to(torch.float32)
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1), 0.0)
