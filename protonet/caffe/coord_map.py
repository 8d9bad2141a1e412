"""pycaffe's `caffe.coord_map`: how the spatial coordinates of one NetSpec top map to
another's, to crop and align feature maps (FCN's `crop(n.upscore, n.data)`).

A map is (axis, scale a, shift b): output coordinate = a * input coordinate + b,
on every axis from `axis` on. Convolution-like layers scale by 1/stride and shift by
(pad - (k_eff - 1) / 2) / stride; Deconvolution the inverse; pointwise layers
(PASS_THROUGH_LAYERS) leave coordinates alone; Crop shifts by -offset. Maps are
read from the layers' NetSpec keyword arguments (`fn.params`).
"""
from __future__ import annotations

import numpy as np

from .net_spec import layers as L

PASS_THROUGH_LAYERS = ["AbsVal", "BatchNorm", "Bias", "BNLL", "Dropout", "Eltwise", "ELU",
                       "Log", "LRN", "Exp", "MVN", "Power", "ReLU", "PReLU", "Scale",
                       "Sigmoid", "Split", "TanH", "Threshold"]

_LEGACY = {"pad_h", "pad_w", "kernel_h", "kernel_w", "stride_h", "stride_w"}


class UndefinedMapException(Exception):
    """The layer has no coordinate mapping (e.g. InnerProduct)."""


class AxisMismatchException(Exception):
    """Two maps act on different axes and cannot be composed."""


def _array(value) -> np.ndarray:
    return np.array(value, ndmin=1)


def conv_params(fn):
    """(axis, stride, effective kernel size, pad) of a Convolution, Deconvolution,
    Im2col (convolution_param) or Pooling (its own fields) description; the effective
    kernel is (k - 1) * dilation + 1."""
    params = fn.params.get("convolution_param", fn.params)
    assert not (_LEGACY & set(fn.params)), "cropping does not support legacy _h/_w params"
    kernel = _array(params["kernel_size"])
    dilation = _array(params.get("dilation", 1))
    return (params.get("axis", 1), _array(params.get("stride", 1)),
            (kernel - 1) * dilation + 1, _array(params.get("pad", 0)))


def crop_params(fn):
    """(axis, offset) of a Crop description; axis defaults to 2 (N, C, H, W)."""
    params = fn.params.get("crop_param", fn.params)
    return params.get("axis", 2), _array(params.get("offset", 0))


def coord_map(fn):
    """The (axis, scale, shift) of one layer description; identity is (None, 1, 0)."""
    if fn.type_name in ("Convolution", "Pooling", "Im2col"):
        axis, stride, kernel, pad = conv_params(fn)
        return axis, 1 / stride, (pad - (kernel - 1) / 2) / stride
    if fn.type_name == "Deconvolution":
        axis, stride, kernel, pad = conv_params(fn)
        return axis, stride, (kernel - 1) / 2 - pad
    if fn.type_name in PASS_THROUGH_LAYERS:
        return None, 1, 0
    if fn.type_name == "Crop":
        axis, offset = crop_params(fn)
        return axis - 1, 1, -offset          # -1: the last axis that is not a coordinate
    raise UndefinedMapException(f"no coordinate map for a {fn.type_name} layer")


def compose(base_map, next_map):
    """`base_map` after `next_map`: scales multiply, next's shift is scaled by base's."""
    ax1, a1, b1 = base_map
    ax2, a2, b2 = next_map
    if ax1 is None:
        axis = ax2
    elif ax2 is None or ax1 == ax2:
        axis = ax1
    else:
        raise AxisMismatchException(f"cannot compose maps on axes {ax1} and {ax2}")
    return axis, a1 * a2, a1 * b2 + b1


def inverse(coord_map):
    """The map back: scale 1/a, shift -b/a."""
    axis, a, b = coord_map
    return axis, 1 / a, -b / a


def _mappable_bottoms(top):
    """Bottoms a map goes through: all of them, except Crop's second (the reference)."""
    bottoms = top.fn.inputs
    return bottoms[:1] if top.fn.type_name == "Crop" else bottoms


def coord_map_from_to(top_from, top_to):
    """The map from `top_from`'s coordinates to `top_to`'s, through their nearest
    common ancestor in the NetSpec graph. RuntimeError when they share none that
    spatial layers connect."""
    from_maps = {top_from: (None, 1, 0)}
    frontier = [top_from]
    while frontier:
        top = frontier.pop()
        try:
            step = coord_map(top.fn)
        except UndefinedMapException:
            continue
        for bottom in _mappable_bottoms(top):
            from_maps[bottom] = compose(from_maps[top], step)
            frontier.append(bottom)

    to_maps = {top_to: (None, 1, 0)}
    frontier = [top_to]
    while frontier:
        top = frontier.pop()
        if top in from_maps:
            return compose(to_maps[top], inverse(from_maps[top]))
        try:
            step = coord_map(top.fn)
        except UndefinedMapException:
            continue
        for bottom in _mappable_bottoms(top):
            to_maps[bottom] = compose(to_maps[top], step)
            frontier.append(bottom)
    raise RuntimeError("Could not compute map between tops; are they connected by "
                       "spatial layers?")


def crop(top_from, top_to):
    """A Crop layer description cutting `top_from` to `top_to`'s extent, its axis and
    offsets from the coordinate map between them (which must be a pure,
    non-positive, integer shift)."""
    axis, a, b = coord_map_from_to(top_from, top_to)
    assert (np.asarray(a) == 1).all(), f"scale mismatch on crop (a = {a})"
    assert (np.asarray(b) <= 0).all(), f"cannot crop negative offset (b = {b})"
    assert (np.round(b) == b).all(), f"cannot crop noninteger offset (b = {b})"
    return L.Crop(top_from, top_to,
                  crop_param=dict(axis=axis + 1,
                                  offset=[int(v) for v in -np.round(_array(b))]))
