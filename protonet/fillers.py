"""Caffe's weight fillers (include/caffe/filler.hpp).

With a seed set (`protonet.set_random_seed`, a solver's `random_seed`) they draw from
Caffe's own stream (protonet.rng) exactly as Caffe's CPU code does, so a seed gives
Caffe's numbers bit for bit; unseeded they draw from torch's default generator.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from . import rng
from .errors import NetError, closest
from .proto import caffe_pb2

VarianceNorm = caffe_pb2.FillerParameter


def _fans(shape: Sequence[int]) -> tuple[int, int]:
    count = math.prod(shape)
    fan_in = count // shape[0]
    fan_out = count // shape[1] if len(shape) > 1 else count
    return fan_in, fan_out


def _scale_count(p, shape) -> float:
    fan_in, fan_out = _fans(shape)
    if p.variance_norm == VarianceNorm.AVERAGE:
        return (fan_in + fan_out) / 2.0
    if p.variance_norm == VarianceNorm.FAN_OUT:
        return float(fan_out)
    return float(fan_in)


def _constant(p, shape):
    return torch.full(shape, p.value, dtype=torch.float32)


def _uniform(p, shape):
    return torch.empty(shape, dtype=torch.float32).uniform_(p.min, p.max)


def _gaussian(p, shape):
    data = torch.empty(shape, dtype=torch.float32).normal_(p.mean, p.std)
    if p.sparse >= 0:
        if len(shape) < 1:
            raise ValueError("sparse gaussian needs at least one axis")
        keep = torch.bernoulli(torch.full(shape, p.sparse / shape[0]))
        data *= keep
    return data


def _positive_unitball(p, shape):
    data = torch.rand(shape, dtype=torch.float32)
    rows = data.reshape(shape[0], -1)
    rows /= rows.sum(dim=1, keepdim=True)
    return data


def _xavier(p, shape):
    scale = math.sqrt(3.0 / _scale_count(p, shape))
    return torch.empty(shape, dtype=torch.float32).uniform_(-scale, scale)


def _msra(p, shape):
    std = math.sqrt(2.0 / _scale_count(p, shape))
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std)


def _bilinear(p, shape):
    if len(shape) != 4 or shape[2] != shape[3]:
        raise ValueError("bilinear needs a 4-axis blob with a square kernel")
    width = shape[3]
    f = math.ceil(width / 2.0)
    c = (width - 1) / (2.0 * f)
    axis = 1 - torch.abs(torch.arange(width, dtype=torch.float64) / f - c)
    kernel = (axis[:, None] * axis[None, :]).to(torch.float32)
    return kernel.expand(shape).clone()


FILLERS: dict[str, Callable] = {
    "constant": _constant, "uniform": _uniform, "gaussian": _gaussian,
    "positive_unitball": _positive_unitball, "xavier": _xavier, "msra": _msra,
    "bilinear": _bilinear,
}


# -- Caffe's stream (a seed is set): the same float32 arithmetic as filler.hpp ------
def _caffe_fans(p, shape) -> np.float32:
    fan_in, fan_out = _fans(shape)
    if p.variance_norm == VarianceNorm.AVERAGE:
        return np.float32(fan_in + fan_out) / np.float32(2)
    if p.variance_norm == VarianceNorm.FAN_OUT:
        return np.float32(fan_out)
    return np.float32(fan_in)


def _caffe_uniform(p, shape):
    return rng.caffe_rng().uniform(math.prod(shape), p.min, p.max)


def _caffe_gaussian(p, shape):
    if not p.std > 0:
        raise ValueError(f"std must be positive, got {p.std} (Caffe aborts)")
    stream = rng.caffe_rng()
    count = math.prod(shape)
    data = stream.gaussian(count, p.mean, p.std)
    if p.sparse >= 0:
        keep = np.float32(p.sparse) / np.float32(shape[0])
        data *= stream.bernoulli(count, keep).astype(np.float32)
    return data


def _caffe_positive_unitball(p, shape):
    data = rng.caffe_rng().uniform(math.prod(shape), 0, 1).reshape(shape[0], -1)
    # Caffe sums each row left to right in float32 (cumsum does; sum() pairs).
    return data / np.cumsum(data, axis=1, dtype=np.float32)[:, -1:]


def _caffe_xavier(p, shape):
    scale = np.sqrt(np.float32(3) / _caffe_fans(p, shape))
    return rng.caffe_rng().uniform(math.prod(shape), -scale, scale)


def _caffe_msra(p, shape):
    std = np.sqrt(np.float32(2) / _caffe_fans(p, shape))
    return rng.caffe_rng().gaussian(math.prod(shape), 0.0, std)


CAFFE_FILLERS: dict[str, Callable] = {
    "uniform": _caffe_uniform, "gaussian": _caffe_gaussian,
    "positive_unitball": _caffe_positive_unitball, "xavier": _caffe_xavier,
    "msra": _caffe_msra,
}


def fill(param: caffe_pb2.FillerParameter, shape: Sequence[int],
         layer: str | None = None) -> torch.Tensor:
    """A new float32 tensor of `shape` filled as Caffe's filler `param.type` would."""
    shape = tuple(int(d) for d in shape)
    maker = FILLERS.get(param.type)
    if maker is None:
        raise NetError(f"unknown filler '{param.type}'{closest(param.type, FILLERS)}; "
                       f"known: {', '.join(FILLERS)}", layer)
    if param.sparse != -1 and param.type != "gaussian":
        raise NetError(f"filler '{param.type}' does not support sparse", layer)
    if math.prod(shape) == 0:
        return torch.zeros(shape, dtype=torch.float32)
    try:
        if rng.seeded() and param.type in CAFFE_FILLERS:
            values = CAFFE_FILLERS[param.type](param, shape)
            return torch.from_numpy(np.ascontiguousarray(values).reshape(shape))
        return maker(param, shape)
    except ValueError as e:
        raise NetError(f"filler '{param.type}' for shape {list(shape)}: {e}", layer) from None
