"""protonet: Caffe's declarative models (prototxt, caffemodel, LMDB) run on PyTorch.

The public names are loaded on first use (PEP 562): `import protonet` costs no torch,
so commands that run no net (help, zoo list, logs, upgrades, error paths) answer at
once; `protonet.Net` and the rest import what they need when first read.
"""
from __future__ import annotations

import importlib

from . import limits  # noqa: F401  (first: sets OpenCV's image size limit before cv2 loads)
from .errors import (DataError, NetError, ParseError, ProtonetError, ShapeError,
                     SolverError, WeightsError)

__version__ = "0.1.0"

# public name -> (module, attribute in it)
_LAZY = {
    "to_torch": (".export", "to_torch"),
    "PythonLayer": (".layers.python_layer", "PythonLayer"),
    "Layer": (".layers.python_layer", "PythonLayer"),  # pycaffe's caffe.Layer
    "NetSpec": (".netspec", "NetSpec"),
    "caffe_pb2": (".proto", "caffe_pb2"),
    "TEST": (".pycaffe", "TEST"),
    "TRAIN": (".pycaffe", "TRAIN"),
    "Blob": (".pycaffe", "Blob"),
    "Net": (".pycaffe", "Net"),
    "set_random_seed": (".rng", "set_random_seed"),
    **{name: (".solver", name) for name in (
        "AdaDeltaSolver", "AdaGradSolver", "AdamSolver", "NesterovSolver",
        "RMSPropSolver", "SGDSolver", "Solver", "get_solver")},
}

__all__ = sorted([
    "DataError", "NetError", "ParseError", "ProtonetError", "ShapeError", "SolverError",
    "WeightsError", *_LAZY,
])


def __getattr__(name: str):
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'protonet' has no attribute '{name}'")
    value = getattr(importlib.import_module(target[0], __name__), target[1])
    globals()[name] = value      # later reads skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
