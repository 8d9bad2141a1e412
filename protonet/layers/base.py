"""The contract every layer follows, mirroring Caffe's Layer<Dtype>.

A layer is built from its LayerParameter, learns its param blobs' shapes in
`setup` (Caffe's LayerSetUp) from the bottom shapes, reports top shapes in `reshape`
(shape inference, no data touched), and computes tops from bottoms in `forward`
with torch ops. Backward is torch autograd; a layer whose Caffe gradient differs
from the mathematical one uses a custom autograd Function.
"""
from __future__ import annotations

from typing import ClassVar, Sequence

import torch
from torch import nn

from ..errors import NetError, ShapeError
from ..fillers import fill
from ..limits import shape_problem
from ..proto import caffe_pb2

Shape = tuple[int, ...]
TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST


class Layer(nn.Module):
    """Base class: subclasses set `type` and override setup/reshape/forward."""

    type: ClassVar[str] = ""
    # Blob-count rules, as Caffe's Exact/Min/Max{Bottom,Top}Blobs (None: no rule).
    exact_bottoms: ClassVar[int | None] = None
    min_bottoms: ClassVar[int | None] = None
    max_bottoms: ClassVar[int | None] = None
    exact_tops: ClassVar[int | None] = None
    min_tops: ClassVar[int | None] = None
    max_tops: ClassVar[int | None] = None
    equal_bottom_top: ClassVar[bool] = False
    # Loss layers get loss_weight 1 on top 0 unless the prototxt says otherwise,
    # and an anonymous top when none is named (Caffe's AutoTopBlobs).
    is_loss: ClassVar[bool] = False

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int = TEST):
        super().__init__()
        self.param = param
        self.phase = phase
        self.layer_name = param.name
        self.blobs = nn.ParameterList()
        self.num_tops = len(param.top)
        # Follows .to(device), so layers that make tensors from nothing know where.
        self.register_buffer("_anchor", torch.empty(0), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    # -- Caffe's life cycle -------------------------------------------------------
    def setup(self, bottom_shapes: Sequence[Shape]) -> None:
        """Create param blobs (Caffe's LayerSetUp). Default: no params."""

    def reshape(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        """Top shapes for these bottom shapes. Default: tops shaped like bottom 0."""
        return [tuple(bottom_shapes[0])] * self.num_tops

    def forward(self, *bottoms: torch.Tensor):  # noqa: D401 - torch signature
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def allow_force_backward(self, bottom_index: int) -> bool:
        """Whether force_backward may send a gradient to this bottom (not to labels)."""
        return True

    # -- helpers for subclasses -----------------------------------------------------
    def add_blob(self, shape: Sequence[int], filler: caffe_pb2.FillerParameter | None = None,
                 value: float | None = None) -> nn.Parameter:
        """Append a param blob, filled by `filler` (or the constant `value`)."""
        problem = shape_problem(shape)
        if problem:         # refused before anything is allocated
            raise self.shape_error(f"param blob {len(self.blobs)}: {problem}")
        if filler is None:
            data = torch.full(tuple(shape), 0.0 if value is None else value)
        else:
            data = fill(filler, shape, self.layer_name)
        blob = nn.Parameter(data.to(torch.float32))
        self.blobs.append(blob)
        return blob

    def error(self, message: str) -> NetError:
        return NetError(message, self.layer_name, self.type)

    def shape_error(self, message: str) -> ShapeError:
        return ShapeError(message, self.layer_name, self.type)

    def check_blob_counts(self, num_bottoms: int, num_tops: int) -> None:
        def check(kind: str, n: int, exact, low, high):
            if exact is not None and n != exact:
                raise self.error(f"takes exactly {exact} {kind} blob(s), got {n}")
            if low is not None and n < low:
                raise self.error(f"takes at least {low} {kind} blob(s), got {n}")
            if high is not None and n > high:
                raise self.error(f"takes at most {high} {kind} blob(s), got {n}")
        check("bottom", num_bottoms, self.exact_bottoms, self.min_bottoms, self.max_bottoms)
        check("top", num_tops, self.exact_tops, self.min_tops, self.max_tops)
        if self.equal_bottom_top and num_bottoms != num_tops:
            raise self.error(f"needs as many tops as bottoms, got {num_bottoms} "
                             f"bottom(s) and {num_tops} top(s)")

    def canonical_axis(self, axis: int, num_axes: int) -> int:
        """Caffe's Blob::CanonicalAxisIndex with a located error."""
        if not -num_axes <= axis < max(num_axes, 1):
            raise self.shape_error(f"axis {axis} out of range for a {num_axes}-axis blob")
        return axis + num_axes if axis < 0 else axis

    def extra_repr(self) -> str:
        return f"name={self.layer_name!r}"
