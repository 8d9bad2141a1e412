"""What pycaffe's compiled `_caffe` module holds: the global mode, logging, the
multi-solver counters, Timer, NCCL, and the layer registry's type list.

Caffe keeps one process-wide mode (CPU or GPU, and a device id); every Net and
Solver made afterwards runs there. Here `current_device()` is that choice as a
torch device, read by protonet.caffe's Net and solver classes when they are made.
"""
from __future__ import annotations

import logging
import time

import torch

from ..errors import ProtonetError
from ..layers.python_layer import PythonLayer
from ..rng import set_random_seed as _seed

log_ = logging.getLogger("protonet")

__version__ = "1.0.0"       # the Caffe release whose Python API this mirrors

Layer = PythonLayer         # the base class of `type: "Python"` layers

_state = {"mode": "cpu", "device_id": 0, "solver_count": 1, "solver_rank": 0,
          "multiprocess": False}


# -- mode -------------------------------------------------------------------------------
def set_mode_cpu() -> None:
    """Nets and solvers made from now on run on the CPU."""
    _state["mode"] = "cpu"


def set_mode_gpu() -> None:
    """Nets and solvers made from now on run on CUDA device `set_device(id)` (0 unless
    set); without CUDA they stay on the CPU, with a warning when they are made."""
    _state["mode"] = "gpu"


def set_device(device_id: int) -> None:
    """The CUDA device GPU mode uses (Caffe::SetDevice)."""
    device_id = int(device_id)
    if device_id < 0:
        raise ProtonetError(f"set_device({device_id}): a CUDA device id is 0 or more")
    _state["device_id"] = device_id


def current_device() -> torch.device:
    """The torch device of the current mode (what a new Net or Solver runs on)."""
    if _state["mode"] != "gpu":
        return torch.device("cpu")
    from ..device import select_device
    return select_device(str(_state["device_id"]))


def set_random_seed(seed: int) -> None:
    """Seed every generator protonet draws from (fillers, Dropout, shuffles)."""
    _seed(int(seed))


# -- logging ----------------------------------------------------------------------------
_LEVELS = {0: logging.INFO, 1: logging.WARNING, 2: logging.ERROR, 3: logging.CRITICAL}


def init_log(level: int = 0, stderr: bool = True) -> None:
    """glog's InitGoogleLogging: protonet's log at `level` (0 INFO, 1 WARNING, 2 ERROR,
    3 FATAL) or above, written to stderr."""
    log_.setLevel(_LEVELS.get(int(level), logging.INFO))
    if stderr and not any(getattr(h, "_protonet_caffe", False) for h in log_.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname).1s%(asctime)s %(message)s",
                                               "%m%d %H:%M:%S"))
        handler._protonet_caffe = True
        log_.addHandler(handler)


def log(message: str) -> None:
    """LOG(INFO) << message."""
    log_.info("%s", message)


# -- several solvers --------------------------------------------------------------------
def solver_count() -> int:
    return _state["solver_count"]


def set_solver_count(count: int) -> None:
    _state["solver_count"] = int(count)


def solver_rank() -> int:
    return _state["solver_rank"]


def set_solver_rank(rank: int) -> None:
    _state["solver_rank"] = int(rank)


def set_multiprocess(multiprocess: bool) -> None:
    _state["multiprocess"] = bool(multiprocess)


def has_nccl() -> bool:
    """False, as in a Caffe built without USE_NCCL: multi-GPU training in protonet
    is `protonet train --gpu 0,1` (docs/distributed.md), not pycaffe's NCCL class."""
    return False


class NCCL:
    """pycaffe's NCCL(solver, uid): not available; says what to use instead."""

    def __init__(self, solver=None, uid=None):
        raise ProtonetError(
            "caffe.NCCL: protonet has no pycaffe NCCL object (has_nccl() is False); "
            "train on several GPUs with `protonet train --solver S --gpu 0,1` or under "
            "torchrun (docs/distributed.md)")

    @staticmethod
    def new_uid():
        raise ProtonetError("caffe.NCCL.new_uid: NCCL is not available (has_nccl() is "
                            "False); see docs/distributed.md for multi-GPU training")


# -- misc -------------------------------------------------------------------------------
class Timer:
    """Caffe's Timer: start(), stop(), and `ms`, the milliseconds between them (up to
    now while running). CUDA work queued on the current device is waited for."""

    def __init__(self):
        self._start = self._stop = None

    @staticmethod
    def _now() -> float:
        if _state["mode"] == "gpu" and torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self) -> None:
        self._start, self._stop = self._now(), None

    def stop(self) -> None:
        if self._start is not None:
            self._stop = self._now()

    @property
    def ms(self) -> float:
        if self._start is None:
            return 0.0
        end = self._stop if self._stop is not None else self._now()
        return (end - self._start) * 1000.0

    @property
    def seconds(self) -> float:
        return self.ms / 1000.0


def layer_type_list() -> list[str]:
    """Every registered layer type (Caffe's LayerRegistry::LayerTypeList)."""
    from ..layers.registry import registered_types
    return registered_types()
