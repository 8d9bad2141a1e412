"""Layers that move, combine or reduce blobs without learned params.

Most are tensor views, concatenations or gathers whose autograd gradient is exactly
Caffe's hand-written backward. Eltwise PROD is not (Caffe multiplies the other bottoms
in order, or divides the top by the bottom), so it carries its own backward; Eltwise
MAX gathers the bottom Caffe's forward picks, so the gradient goes to that one only.
Index and selector bottoms never get a gradient.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..proto import caffe_pb2
from .base import Layer, Shape
from .registry import register

EltwiseOp = caffe_pb2.EltwiseParameter
ReductionOp = caffe_pb2.ReductionParameter


def _count(shape: Sequence[int], start: int = 0, end: int | None = None) -> int:
    """Caffe's Blob::count(start, end): the product of dims start..end-1."""
    return math.prod(shape[start:end])


def _forbid_in_place(layer: Layer) -> None:
    if any(top in layer.param.bottom for top in layer.param.top):
        raise layer.error("does not allow in-place computation (a top has a bottom's name)")


@register("Split")
class Split(Layer):
    """Gives one blob to several consumers; autograd sums their gradients."""
    exact_bottoms = 1
    min_tops = 1

    def setup(self, bottom_shapes):
        _forbid_in_place(self)

    def forward(self, bottom):
        # Distinct views share the data (as Caffe's ShareData) but keep separate diffs.
        return [bottom.view_as(bottom) for _ in range(self.num_tops)]


def _legacy_axis(layer: Layer, param, legacy_field: str, num_axes: int) -> int:
    """The axis from `axis`, or from the legacy unsigned field (no negative indexing)."""
    if param.HasField("axis") and param.HasField(legacy_field):
        raise layer.error(f"give either axis or {legacy_field}, not both")
    if param.HasField(legacy_field):
        legacy = getattr(param, legacy_field)
        if legacy >= num_axes:
            raise layer.shape_error(f"{legacy_field} {legacy} out of range for a "
                                    f"{num_axes}-axis blob")
        return legacy
    return layer.canonical_axis(param.axis, num_axes)


@register("Concat")
class Concat(Layer):
    """Joins bottoms along one axis; all other dims must agree."""
    min_bottoms = 1
    exact_tops = 1

    def reshape(self, bottom_shapes):
        first = bottom_shapes[0]
        self.axis = _legacy_axis(self, self.param.concat_param, "concat_dim", len(first))
        total = 0
        for i, shape in enumerate(bottom_shapes):
            if len(shape) != len(first):
                raise self.shape_error(f"all bottoms need {len(first)} axes; bottom {i} has "
                                       f"shape {list(shape)}")
            if any(a != b for j, (a, b) in enumerate(zip(shape, first)) if j != self.axis):
                raise self.shape_error(f"bottoms must match except on axis {self.axis}: "
                                       f"bottom 0 {list(first)}, bottom {i} {list(shape)}")
            total += shape[self.axis]
        return [first[:self.axis] + (total,) + first[self.axis + 1:]]

    def forward(self, *bottoms):
        return torch.cat(bottoms, dim=self.axis)


@register("Slice")
class Slice(Layer):
    """Cuts a blob along one axis at the slice points (equal parts without points)."""
    exact_bottoms = 1
    min_tops = 1

    def reshape(self, bottom_shapes):
        shape = bottom_shapes[0]
        p = self.param.slice_param
        self.axis = _legacy_axis(self, p, "slice_dim", len(shape))
        length = shape[self.axis]
        self.sizes = self._sizes(list(p.slice_point), length)
        return [shape[:self.axis] + (size,) + shape[self.axis + 1:] for size in self.sizes]

    def _sizes(self, points: list[int], length: int) -> list[int]:
        tops = self.num_tops
        if not points:
            if length % tops:
                raise self.shape_error(f"{tops} tops do not evenly divide slice axis "
                                       f"{self.axis} of size {length}")
            return [length // tops] * tops
        if len(points) != tops - 1:
            raise self.error(f"{len(points)} slice points need {len(points) + 1} tops, "
                             f"got {tops}")
        if tops > length:
            raise self.shape_error(f"{tops} tops cannot slice axis {self.axis} of size {length}")
        bounds = [0] + points + [length]
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
        if any(size <= 0 for size in sizes[:-1]) or sizes[-1] < 0:
            raise self.shape_error(f"slice points {points} must increase strictly from above 0 "
                                   f"and stay within axis {self.axis} of size {length}")
        return sizes

    def forward(self, bottom):
        return list(torch.split(bottom, self.sizes, dim=self.axis))


class _Product(torch.autograd.Function):
    """Product of bottoms with Caffe's backward: the other bottoms' product in order
    (stable) or top / bottom (unstable, infinite where a bottom is zero)."""

    @staticmethod
    def forward(ctx, stable: bool, *bottoms):
        top = bottoms[0] * bottoms[1]
        for bottom in bottoms[2:]:
            top = top * bottom
        ctx.stable = stable
        ctx.save_for_backward(top, *bottoms)
        return top

    @staticmethod
    def backward(ctx, top_diff):
        top, *bottoms = ctx.saved_tensors
        diffs = []
        for i, bottom in enumerate(bottoms):
            if not ctx.needs_input_grad[i + 1]:
                diffs.append(None)
                continue
            if ctx.stable:
                others = [b for j, b in enumerate(bottoms) if j != i]
                partial = others[0]
                for other in others[1:]:
                    partial = partial * other
            else:
                partial = top / bottom
            diffs.append(partial * top_diff)
        return (None, *diffs)


def _max_with_index(bottoms: Sequence[torch.Tensor]) -> torch.Tensor:
    """Index of the bottom Caffe picks per element: bottom 1 wins a tie with bottom 0,
    a later bottom replaces the max only when strictly greater."""
    first_wins = bottoms[0] > bottoms[1]
    index = torch.where(first_wins, 0, 1)
    best = torch.where(first_wins, bottoms[0], bottoms[1])
    for k, bottom in enumerate(bottoms[2:], start=2):
        greater = bottom > best
        index = torch.where(greater, k, index)
        best = torch.where(greater, bottom, best)
    return index


def _scaled(bottom: torch.Tensor, coeff: float) -> torch.Tensor:
    return bottom if coeff == 1 else bottom * coeff


@register("Eltwise")
class Eltwise(Layer):
    """Element-wise SUM (with coefficients), PROD or MAX of equally shaped bottoms."""
    min_bottoms = 2
    exact_tops = 1

    def setup(self, bottom_shapes):
        p = self.param.eltwise_param
        if len(p.coeff) not in (0, len(bottom_shapes)):
            raise self.error(f"needs one coeff per bottom ({len(bottom_shapes)}), "
                             f"got {len(p.coeff)}")
        if p.operation == EltwiseOp.PROD and len(p.coeff):
            raise self.error("coeff applies to SUM only, not PROD")
        self.operation = p.operation
        self.coeffs = list(p.coeff) or [1.0] * len(bottom_shapes)
        self.stable_prod_grad = p.stable_prod_grad

    def reshape(self, bottom_shapes):
        for i, shape in enumerate(bottom_shapes[1:], start=1):
            if tuple(shape) != tuple(bottom_shapes[0]):
                raise self.shape_error(f"bottoms must have equal shapes: bottom 0 "
                                       f"{list(bottom_shapes[0])}, bottom {i} {list(shape)}")
        return [tuple(bottom_shapes[0])]

    def forward(self, *bottoms):
        if self.operation == EltwiseOp.PROD:
            return _Product.apply(self.stable_prod_grad, *bottoms)
        if self.operation == EltwiseOp.SUM:   # (a coefficient of 1 multiplies exactly)
            top = _scaled(bottoms[0], self.coeffs[0])
            for coeff, bottom in zip(self.coeffs[1:], bottoms[1:]):
                top = top + _scaled(bottom, coeff)
            return top
        index = _max_with_index(bottoms).unsqueeze(0)
        return torch.stack(bottoms).gather(0, index).squeeze(0)


@register("Flatten")
class Flatten(Layer):
    """Merges axes axis..end_axis (inclusive) into one."""
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom_shapes):
        _forbid_in_place(self)

    def reshape(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        p = self.param.flatten_param
        start = self.canonical_axis(p.axis, len(shape))
        end = self.canonical_axis(p.end_axis, len(shape))
        if end + 1 < start:
            raise self.shape_error(f"end_axis {p.end_axis} comes before axis {p.axis} "
                                   f"for shape {list(shape)}")
        self.top_shape = shape[:start] + (_count(shape, start, end + 1),) + shape[end + 1:]
        return [self.top_shape]

    def forward(self, bottom):
        return bottom.reshape(self.top_shape)


@register("Reshape")
class Reshape(Layer):
    """New shape for the same data: 0 copies a bottom dim, -1 is inferred."""
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom_shapes):
        _forbid_in_place(self)
        dims = list(self.param.reshape_param.shape.dim)
        if any(d < -1 for d in dims):
            raise self.error(f"shape {dims} may hold only dims >= 0 and a single -1")
        if dims.count(-1) > 1:
            raise self.error(f"shape {dims} has more than one -1 dim")

    def reshape(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        p = self.param.reshape_param
        start, end = self._replaced_axes(p, len(shape))
        new = self._copy_zero_dims(list(p.shape.dim), shape, start)
        if -1 in new:
            known = _count(shape, 0, start) * _count(shape, end) * \
                math.prod(d for d in new if d != -1)
            if known == 0 or _count(shape) % known:
                raise self.shape_error(f"bottom count ({_count(shape)}) must be divisible by "
                                       f"the product of the specified dims ({known})")
            new[new.index(-1)] = _count(shape) // known
        self.top_shape = shape[:start] + tuple(new) + shape[end:]
        if _count(self.top_shape) != _count(shape):
            raise self.shape_error(f"output count must match input count: shape "
                                   f"{list(self.top_shape)} for bottom {list(shape)}")
        return [self.top_shape]

    def _replaced_axes(self, p, num_axes: int) -> tuple[int, int]:
        """The bottom axes [start, end) that the new shape replaces."""
        start = p.axis if p.axis >= 0 else num_axes + p.axis + 1
        if not 0 <= start <= num_axes:
            raise self.shape_error(f"axis {p.axis} out of range for a {num_axes}-axis bottom")
        if p.num_axes < -1:
            raise self.error(f"num_axes must be >= 0, or -1 for all; got {p.num_axes}")
        end = num_axes if p.num_axes == -1 else start + p.num_axes
        if end > num_axes:
            raise self.shape_error(f"axis + num_axes = {end} is out of range for a "
                                   f"{num_axes}-axis bottom")
        return start, end

    def _copy_zero_dims(self, dims: list[int], shape: Shape, start: int) -> list[int]:
        """Each 0 in the new shape takes the bottom dim at the same position."""
        for i, dim in enumerate(dims):
            if dim != 0:
                continue
            if start + i >= len(shape):
                raise self.shape_error(f"new shape has a 0 at position {i}, but bottom "
                                       f"{list(shape)} has no axis {start + i} to copy")
            dims[i] = shape[start + i]
        return dims

    def forward(self, bottom):
        return bottom.reshape(self.top_shape)


@register("Tile")
class Tile(Layer):
    """Repeats the block from `axis` onwards `tiles` times along `axis`."""
    exact_bottoms = 1
    exact_tops = 1

    def reshape(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        p = self.param.tile_param
        self.axis = self.canonical_axis(p.axis, len(shape))
        if not p.HasField("tiles"):
            raise self.error("tile_param.tiles (the number of copies) must be given")
        if p.tiles <= 0:
            raise self.error(f"tiles must be positive, got {p.tiles}")
        self.repeats = [1] * len(shape)
        self.repeats[self.axis] = p.tiles
        return [shape[:self.axis] + (shape[self.axis] * p.tiles,) + shape[self.axis + 1:]]

    def forward(self, bottom):
        return bottom.repeat(self.repeats)


@register("Reduction")
class Reduction(Layer):
    """Reduces every axis from `axis` on by SUM, ASUM, SUMSQ or MEAN, times coeff."""
    exact_bottoms = 1
    exact_tops = 1

    def reshape(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        p = self.param.reduction_param
        if p.operation not in (ReductionOp.SUM, ReductionOp.ASUM, ReductionOp.SUMSQ,
                               ReductionOp.MEAN):
            raise self.error(f"unknown reduction operation {p.operation}")
        self.axis = self.canonical_axis(p.axis, len(shape))
        self.coeff = p.coeff
        if p.operation == ReductionOp.MEAN:
            self.coeff /= max(_count(shape, self.axis), 1)
        return [shape[:self.axis]]

    def forward(self, bottom):
        rows = bottom.reshape(bottom.shape[:self.axis] + (-1,))
        operation = self.param.reduction_param.operation
        if operation == ReductionOp.ASUM:
            rows = rows.abs()
        elif operation == ReductionOp.SUMSQ:
            rows = rows.square()
        top = rows.sum(-1)
        return top * self.coeff if self.coeff != 1 else top


@register("Crop")
class Crop(Layer):
    """Crops bottom 0 to bottom 1's shape on the axes from `axis` on, at offsets."""
    exact_bottoms = 2
    exact_tops = 1

    def reshape(self, bottom_shapes):
        data, ref = tuple(bottom_shapes[0]), tuple(bottom_shapes[1])
        p = self.param.crop_param
        self.start = self.canonical_axis(p.axis, len(data))
        if len(ref) < len(data):
            raise self.shape_error(f"bottom 1 {list(ref)} needs at least as many axes as "
                                   f"bottom 0 {list(data)}")
        cropped = range(self.start, len(data))
        if len(p.offset) > 1 and len(p.offset) != len(cropped):
            raise self.error(f"{len(p.offset)} offsets given; give one, or one per cropped "
                             f"axis ({len(cropped)} from axis {self.start})")
        offsets = list(p.offset) if len(p.offset) > 1 else \
            [p.offset[0] if p.offset else 0] * len(cropped)
        for axis, offset in zip(cropped, offsets):
            if data[axis] - offset < ref[axis]:
                raise self.shape_error(f"crop of axis {axis} is out of bounds: size "
                                       f"{ref[axis]} at offset {offset} in {data[axis]}")
        self.offsets = offsets
        return [data[:self.start] + ref[self.start:len(data)]]

    def forward(self, data, reference):
        top = data
        for axis, offset in zip(range(self.start, data.dim()), self.offsets):
            top = top.narrow(axis, offset, reference.shape[axis])
        return top


def _check_row_indices(layer: Layer, indices: torch.Tensor, rows: int) -> torch.Tensor:
    """Float indices as Caffe reads them (0 <= i < rows, truncated) as int64."""
    if bool(((indices < 0) | (indices >= rows)).any()):
        bad = indices[(indices < 0) | (indices >= rows)][0].item()
        raise layer.error(f"index {bad:g} out of range for a batch of {rows}")
    return indices.to(torch.int64)


@register("BatchReindex")
class BatchReindex(Layer):
    """Gathers rows of bottom 0 at the indices in bottom 1 (repeats allowed)."""
    exact_bottoms = 2
    exact_tops = 1

    def reshape(self, bottom_shapes):
        data, indices = bottom_shapes
        if len(indices) != 1:
            raise self.shape_error(f"indices (bottom 1) must have 1 axis, got shape "
                                   f"{list(indices)}")
        return [(indices[0],) + tuple(data[1:])]

    def allow_force_backward(self, bottom_index):
        return bottom_index == 0

    def forward(self, data, indices):
        rows = _check_row_indices(self, indices.detach(), data.shape[0])
        return data.index_select(0, rows)


@register("Filter")
class Filter(Layer):
    """Keeps the items of each data bottom whose selector (last bottom) is non-zero.

    Top shapes depend on the selector's values: `reshape` reports the full batch (as
    Caffe's first Reshape does); `forward` returns the kept items only.
    """
    min_bottoms = 2
    min_tops = 1

    def setup(self, bottom_shapes):
        if self.num_tops != len(bottom_shapes) - 1:
            raise self.error(f"needs one top per data bottom ({len(bottom_shapes) - 1}), "
                             f"got {self.num_tops}")

    def reshape(self, bottom_shapes):
        selector = bottom_shapes[-1]
        if any(d != 1 for d in selector[1:]):
            raise self.shape_error(f"selector shape {list(selector)} must be 1 on every axis "
                                   f"but the first")
        for i, shape in enumerate(bottom_shapes[:-1]):
            if shape[0] != selector[0]:
                raise self.shape_error(f"bottom {i} {list(shape)} and the selector "
                                       f"{list(selector)} differ in their first dim")
        return [tuple(shape) for shape in bottom_shapes[:-1]]

    def allow_force_backward(self, bottom_index):
        return bottom_index != len(self.param.bottom) - 1

    def forward(self, *bottoms):
        keep = torch.nonzero(bottoms[-1].detach().reshape(-1)).squeeze(1)
        return [data.index_select(0, keep) for data in bottoms[:-1]]


@register("Silence")
class Silence(Layer):
    """Consumes bottoms nobody else reads; their gradient from here is zero."""
    min_bottoms = 1
    exact_tops = 0

    def reshape(self, bottom_shapes):
        return []

    def forward(self, *bottoms):
        return []
