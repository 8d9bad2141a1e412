"""pycaffe's namespace on protonet: `import protonet.caffe as caffe`.

The names and submodules are pycaffe's (caffe.Net, caffe.SGDSolver, caffe.io,
caffe.draw, caffe.net_spec, caffe.coord_map, caffe.proto.caffe_pb2, ...), thin over
protonet's core. For scripts that say `import caffe` and cannot be edited,
`protonet.caffe.alias()` makes `caffe` and its submodules these very modules, and
`python -m protonet.caffe script.py [args]` runs a script that way.
"""
import sys

from . import proto
from ._caffe import (NCCL, Layer, Timer, __version__, has_nccl, init_log,
                     layer_type_list, log, set_device, set_mode_cpu, set_mode_gpu,
                     set_multiprocess, set_random_seed, set_solver_count, set_solver_rank,
                     solver_count, solver_rank)
from .proto.caffe_pb2 import TEST, TRAIN
from .pycaffe import (AdaDeltaSolver, AdaGradSolver, AdamSolver, NesterovSolver, Net,
                      RMSPropSolver, SGDSolver, get_solver)
from .classifier import Classifier
from .detector import Detector
from . import io
from .net_spec import NetSpec, layers, params, to_proto
from . import classifier, coord_map, detector, draw, net_spec, pycaffe  # noqa: F401

SUBMODULES = ("proto", "proto.caffe_pb2", "_caffe", "pycaffe", "io", "classifier",
              "detector", "draw", "net_spec", "coord_map")


def alias(name: str = "caffe") -> None:
    """Make `import caffe` (and `import caffe.io`, `from caffe.proto import caffe_pb2`,
    ...) give this package and its submodules: the same module objects, registered in
    sys.modules under `name`. Replaces whatever `name` was bound to before."""
    sys.modules[name] = sys.modules[__name__]
    for sub in SUBMODULES:
        sys.modules[f"{name}.{sub}"] = sys.modules[f"{__name__}.{sub}"]


__all__ = ["AdaDeltaSolver", "AdaGradSolver", "AdamSolver", "Classifier", "Detector",
           "Layer", "NCCL", "NesterovSolver", "Net", "NetSpec", "RMSPropSolver",
           "SGDSolver", "TEST", "TRAIN", "Timer", "__version__", "alias", "get_solver",
           "has_nccl", "init_log", "io", "layer_type_list", "layers", "log", "params",
           "set_device", "set_mode_cpu", "set_mode_gpu", "set_multiprocess",
           "set_random_seed", "set_solver_count", "set_solver_rank", "solver_count",
           "solver_rank", "to_proto"]
