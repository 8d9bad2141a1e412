"""protonet: Caffe's declarative models (prototxt, caffemodel, LMDB) run on PyTorch."""
from .errors import (DataError, NetError, ParseError, ProtonetError, ShapeError,
                     SolverError, WeightsError)
from . import data  # noqa: F401  (registers the data layers)
from .export import to_torch
from .layers.python_layer import PythonLayer
from .netspec import NetSpec
from .proto import caffe_pb2
from .pycaffe import TEST, TRAIN, Blob, Net
from .rng import set_random_seed

Layer = PythonLayer      # pycaffe's caffe.Layer, the base of Python layers

__version__ = "0.1.0"

__all__ = [
    "Blob", "DataError", "Layer", "NetSpec", "PythonLayer", "to_torch", "Net", "NetError", "ParseError", "ProtonetError", "ShapeError",
    "SolverError", "TEST", "TRAIN", "WeightsError", "caffe_pb2", "set_random_seed",
]
