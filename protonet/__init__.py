"""protonet: Caffe's declarative models (prototxt, caffemodel, LMDB) run on PyTorch."""
from . import limits  # noqa: F401  (first: sets OpenCV's image size limit before cv2 loads)
from . import data  # noqa: F401  (registers the data layers)
from .errors import (DataError, NetError, ParseError, ProtonetError, ShapeError,
                     SolverError, WeightsError)
from .export import to_torch
from .layers.python_layer import PythonLayer
from .netspec import NetSpec
from .proto import caffe_pb2
from .pycaffe import TEST, TRAIN, Blob, Net
from .rng import set_random_seed
from .solver import (AdaDeltaSolver, AdaGradSolver, AdamSolver, NesterovSolver,
                     RMSPropSolver, SGDSolver, Solver, get_solver)

Layer = PythonLayer      # pycaffe's caffe.Layer, the base of Python layers

__version__ = "0.1.0"

__all__ = [
    "AdaDeltaSolver", "AdaGradSolver", "AdamSolver", "Blob", "DataError", "Layer", "Net",
    "NetError", "NetSpec", "NesterovSolver", "ParseError", "ProtonetError", "PythonLayer",
    "RMSPropSolver", "SGDSolver", "ShapeError", "Solver", "SolverError", "TEST", "TRAIN",
    "WeightsError", "caffe_pb2", "get_solver", "set_random_seed", "to_torch",
]
