"""Layers that make blobs from their parameters: Input, DummyData, Parameter."""
from __future__ import annotations

from ..fillers import fill
from ..limits import shape_problem
from ..proto import caffe_pb2
from .base import Layer
from .registry import register


@register("Input")
class Input(Layer):
    """Declares net inputs; their values are set by the caller, not computed."""
    exact_bottoms = 0
    min_tops = 1

    def reshape(self, bottom_shapes):
        shapes = list(self.param.input_param.shape)
        if len(shapes) not in (1, self.num_tops):
            raise self.shape_error(f"input_param needs 1 or {self.num_tops} shapes, "
                                   f"got {len(shapes)}")
        if len(shapes) == 1:
            shapes = shapes * self.num_tops
        return [tuple(s.dim) for s in shapes]

    def forward(self):
        raise self.error("Input layers are fed by the caller")


@register("Parameter")
class Parameter(Layer):
    """Exposes one learnable blob as a top (its data and gradient are the blob's)."""
    exact_bottoms = 0
    exact_tops = 1

    def setup(self, bottom_shapes):
        self.add_blob(tuple(self.param.parameter_param.shape.dim))

    def reshape(self, bottom_shapes):
        return [tuple(self.param.parameter_param.shape.dim)]

    def forward(self):
        return self.blobs[0]


@register("DummyData")
class DummyData(Layer):
    """Tops from fillers: constant fillers fill once, others refill every pass."""
    exact_bottoms = 0
    min_tops = 1

    def setup(self, bottom_shapes):
        p = self.param.dummy_data_param
        n = self.num_tops
        if len(p.data_filler) not in (0, 1, n):
            raise self.error(f"needs 0, 1 or {n} data fillers, got {len(p.data_filler)}")
        legacy = len(p.num) or len(p.channels) or len(p.height) or len(p.width)
        self.shapes = []
        for i in range(n):
            if legacy:
                if len(p.shape):
                    raise self.error("give either shape or num/channels/height/width")
                dims = []
                for name in ("num", "channels", "height", "width"):
                    values = getattr(p, name)
                    if len(values) not in (1, n):
                        raise self.error(f"'{name}' must be given once or once per top ({n})")
                    dims.append(values[0] if len(values) == 1 else values[i])
                self.shapes.append(tuple(dims))
            else:
                if len(p.shape) not in (1, n):
                    raise self.error(f"'shape' must be given once or once per top ({n})")
                self.shapes.append(tuple(p.shape[0 if len(p.shape) == 1 else i].dim))
        for i, shape in enumerate(self.shapes):
            problem = shape_problem(shape)
            if problem:         # refused before the constant fillers allocate
                raise self.shape_error(f"top {i}: {problem}")
        default = caffe_pb2.FillerParameter(type="constant", value=0.0)
        self.fillers = [p.data_filler[i] if len(p.data_filler) == n else
                        p.data_filler[0] if len(p.data_filler) == 1 else default
                        for i in range(n)]
        self.constants = [fill(f, s, self.layer_name) if f.type == "constant" else None
                          for f, s in zip(self.fillers, self.shapes)]

    def reshape(self, bottom_shapes):
        return list(self.shapes)

    def forward(self):
        device = self.device
        tops = []
        for f, s, c in zip(self.fillers, self.shapes, self.constants):
            value = c if c is not None else fill(f, s, self.layer_name)
            tops.append(value.to(device))
        return tops if len(tops) > 1 else tops[0]
