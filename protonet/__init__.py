"""protonet: Caffe's declarative models (prototxt, caffemodel, LMDB) run on PyTorch."""
from .errors import (DataError, NetError, ParseError, ProtonetError, ShapeError,
                     SolverError, WeightsError)
from .proto import caffe_pb2
from .pycaffe import TEST, TRAIN, Blob, Net
from .rng import set_random_seed

__version__ = "0.1.0"

__all__ = [
    "Blob", "DataError", "Net", "NetError", "ParseError", "ProtonetError", "ShapeError",
    "SolverError", "TEST", "TRAIN", "WeightsError", "caffe_pb2", "set_random_seed",
]
