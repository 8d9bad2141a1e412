"""pycaffe's `caffe.pycaffe`: Net and the solver classes, on protonet's core.

The classes are protonet's own (protonet.pycaffe.Net, protonet.solver.*) with one
addition: a Net or Solver made without an explicit device runs where the global
mode says (`caffe.set_mode_gpu()` then `caffe.Net(...)` runs on CUDA), as in Caffe.
Nets a solver makes (`solver.net`, `solver.test_nets`) are protonet Nets; they pass
`isinstance(x, caffe.Net)` all the same.
"""
from __future__ import annotations

from .. import pycaffe as _core
from .. import solver as _solvers
from ._caffe import NCCL, Timer, current_device  # noqa: F401  (pycaffe exports them here)


class _NetType(type):
    """Lets every protonet Net count as a caffe.Net (solver nets included);
    subclasses (Classifier, Detector) keep ordinary isinstance checks."""

    def __instancecheck__(cls, obj) -> bool:
        if cls is Net:
            return isinstance(obj, _core.Net)
        return super().__instancecheck__(obj)

    def __subclasscheck__(cls, sub) -> bool:
        if cls is Net:
            return issubclass(sub, _core.Net)
        return super().__subclasscheck__(sub)


class Net(_core.Net, metaclass=_NetType):
    """pycaffe's Net: `Net(prototxt, phase)`, `Net(prototxt, weights, phase)` or
    `Net(prototxt, phase, level=0, stages=None, weights=None)`, on the mode's device."""

    def __init__(self, network_file, *args, **kwargs):
        if kwargs.get("stages") is None:
            kwargs.pop("stages", None)
        if kwargs.get("device") is None:
            kwargs["device"] = current_device()
        super().__init__(network_file, *args, **kwargs)


def _solver_class(base: type) -> type:
    def __init__(self, filename, device=None, **options):
        base.__init__(self, filename, current_device() if device is None else device,
                      **options)
    __init__.__doc__ = (f"pycaffe's {base.__name__}(solver_file): the solver on the "
                        "current mode's device (solver_mode in the file is ignored, "
                        "as in pycaffe)")
    return type(base.__name__, (base,), {"__init__": __init__, "__module__": __name__,
                                         "__doc__": base.__doc__})


SGDSolver = _solver_class(_solvers.SGDSolver)
NesterovSolver = _solver_class(_solvers.NesterovSolver)
AdaGradSolver = _solver_class(_solvers.AdaGradSolver)
RMSPropSolver = _solver_class(_solvers.RMSPropSolver)
AdaDeltaSolver = _solver_class(_solvers.AdaDeltaSolver)
AdamSolver = _solver_class(_solvers.AdamSolver)

_BY_TYPE = {"SGD": SGDSolver, "Nesterov": NesterovSolver, "AdaGrad": AdaGradSolver,
            "RMSProp": RMSPropSolver, "AdaDelta": AdaDeltaSolver, "Adam": AdamSolver}


def get_solver(filename, device=None, **options):
    """The solver class the file's `type` names (Caffe's SolverRegistry), on the
    current mode's device."""
    solver = _solvers.get_solver(filename, current_device() if device is None else device,
                                 **options)
    cls = _BY_TYPE.get(solver.param.type)
    if cls is not None and type(solver) is cls.__mro__[1]:
        solver.__class__ = cls          # the same object, seen as caffe's class
    return solver
