"""Small nets around one layer, shared by the layer-family tests."""
from __future__ import annotations

import numpy as np
import pytest

import protonet
from protonet import caffe_pb2
from protonet.io.text import parse_text
from protonet.layers import layer_class


def build(layer: str, inputs: dict[str, tuple], force_backward: bool = True,
          phase: int = protonet.TRAIN) -> protonet.Net:
    """A net of Input layers (one per entry of `inputs`) feeding `layer`."""
    text = f"force_backward: {str(force_backward).lower()}\n"
    for name, shape in inputs.items():
        dims = " ".join(f"dim: {d}" for d in shape)
        text += (f'layer {{ name: "in_{name}" type: "Input" top: "{name}" '
                 f'input_param {{ shape {{ {dims} }} }} }}\n')
    text += layer
    return protonet.Net(parse_text(text, caffe_pb2.NetParameter()), phase)


def run(layer: str, **inputs: np.ndarray) -> protonet.Net:
    """`build` for these arrays, filled in and run forward."""
    net = build(layer, {name: value.shape for name, value in inputs.items()})
    for name, value in inputs.items():
        net.blobs[name].data[...] = value
    net.forward()
    return net


def make_layer(text: str, *bottom_shapes: tuple):
    """A set-up layer object, for gradcheck on its forward."""
    param = parse_text(text, caffe_pb2.LayerParameter())
    layer = layer_class(param.type)(param, protonet.TRAIN)
    layer.setup(bottom_shapes)
    layer.reshape(bottom_shapes)
    return layer


def expect_error(layer: str, inputs: dict[str, tuple], match: str = ""):
    """Building must fail with a NetError that names layer 'L'."""
    with pytest.raises(protonet.NetError, match=f"layer 'L'.*{match}"):
        build(layer, inputs)
