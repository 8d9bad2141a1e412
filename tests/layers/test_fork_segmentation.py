"""Fork layers of the segmentation nets: BN (SegNet/ENet and PSPNet variants), Upsample
(SegNet/ENet) and Interp (PSPNet).

References: Interp against OpenCV 4 dnn's outputs (tests/data/forks, made by
tools/make_interp_fixtures.py) where OpenCV implements the case, and elsewhere against
numpy loops written from the forks' C++ (caffe_cpu_interp2, bn_layer.cpp,
upsample_layer.cpp), independent of protonet's torch code; backward against the forks'
backward loops and, where the fork's gradient is the true one, float64 gradcheck.
"""
from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import torch

import protonet
from protonet import caffe_pb2
from protonet.io.text import parse_text
from protonet.io.weights import copy_trained_layers
from protonet.layers import layer_class, registered_types

RNG = np.random.default_rng(14)
FIXTURES = os.path.join(os.path.dirname(__file__), "..", "data", "forks")


@pytest.fixture(autouse=True)
def _seeded():
    """Fillers and torch.randn draw from torch's generator: the same values each run."""
    torch.manual_seed(int(os.environ.get("FORK_TEST_SEED", "14")))


def net_from(text: str, phase: int = protonet.TRAIN) -> protonet.Net:
    return protonet.Net(parse_text(text, caffe_pb2.NetParameter()), phase)


def build(layers: str, inputs: dict[str, tuple], phase: int = protonet.TRAIN) -> protonet.Net:
    text = "force_backward: true\n"
    for name, shape in inputs.items():
        dims = " ".join(f"dim: {d}" for d in shape)
        text += (f'layer {{ name: "in_{name}" type: "Input" top: "{name}" '
                 f'input_param {{ shape {{ {dims} }} }} }}\n')
    return net_from(text + layers, phase)


def run(layers: str, phase: int = protonet.TRAIN, **inputs: np.ndarray) -> protonet.Net:
    net = build(layers, {name: value.shape for name, value in inputs.items()}, phase)
    for name, value in inputs.items():
        net.blobs[name].data[...] = value
    net.forward()
    return net


def make_layer(text: str, *shapes: tuple, phase: int = protonet.TRAIN):
    bottoms = " ".join(f'bottom: "{b}"' for b in "xm"[:len(shapes)])
    param = parse_text(f'name: "L" {bottoms} top: "y" {text}', caffe_pb2.LayerParameter())
    layer = layer_class(param.type)(param, phase)
    layer.setup(list(shapes))
    layer.reshape(list(shapes))
    return layer


def randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def test_types_are_registered():
    assert {"BN", "Upsample", "Interp", "DenseImageData"} <= set(registered_types())


# --- Upsample -----------------------------------------------------------------------

def max_pool_with_mask(x, kernel, stride):
    """Caffe's MAX pooling loop (no pad, ceil-mode output, windows clipped at the
    edge): value and mask h * W + w of the first maximum."""
    n, c, h, w = x.shape
    oh, ow = -(-(h - kernel) // stride) + 1, -(-(w - kernel) // stride) + 1
    top = np.full((n, c, oh, ow), -np.inf, np.float32)
    mask = np.full((n, c, oh, ow), -1.0, np.float32)
    for i in range(oh):
        for j in range(ow):
            for y in range(i * stride, min(i * stride + kernel, h)):
                for xx in range(j * stride, min(j * stride + kernel, w)):
                    v = x[:, :, y, xx]
                    better = v > top[:, :, i, j]
                    top[:, :, i, j] = np.where(better, v, top[:, :, i, j])
                    mask[:, :, i, j] = np.where(better, y * w + xx, mask[:, :, i, j])
    return top, mask


def upsample_loops(values, mask, out_h, out_w):
    """SegNet's Forward_cpu: zero the top, then top[mask[i]] = bottom[i] in order."""
    n, c = values.shape[:2]
    top = np.zeros((n, c, out_h * out_w), np.float32)
    flat_v, flat_m = values.reshape(n, c, -1), mask.reshape(n, c, -1)
    for a in range(n):
        for b in range(c):
            for i in range(flat_v.shape[2]):
                top[a, b, int(flat_m[a, b, i])] = flat_v[a, b, i]
    return top.reshape(n, c, out_h, out_w)


def upsample_backward_loops(top_diff, mask):
    n, c = mask.shape[:2]
    flat_t, flat_m = top_diff.reshape(n, c, -1), mask.reshape(n, c, -1)
    out = np.zeros(flat_m.shape, np.float32)
    for a in range(n):
        for b in range(c):
            for i in range(flat_m.shape[2]):
                out[a, b, i] = flat_t[a, b, int(flat_m[a, b, i])]
    return out.reshape(mask.shape)


UNPOOL_NET = """
layer {{ name: "pool" type: "Pooling" bottom: "x" top: "p" top: "mask"
        pooling_param {{ pool: MAX kernel_size: {k} stride: {s} }} }}
layer {{ name: "act" type: "TanH" bottom: "p" top: "a" }}
layer {{ name: "L" type: "Upsample" bottom: "a" bottom: "mask" top: "y"
        upsample_param {{ {param} }} }}
"""


@pytest.mark.parametrize("k,s,shape,param,out", [
    (2, 2, (2, 3, 6, 8), "scale: 2", (6, 8)),
    (2, 2, (1, 2, 7, 9), "upsample_h: 7 upsample_w: 9", (7, 9)),
    (2, 2, (1, 2, 6, 9), "scale: 2 pad_out_w: true", (6, 9)),
    (3, 2, (2, 2, 9, 7), "upsample_h: 9 upsample_w: 7", (9, 7)),  # overlapping windows
])
def test_upsample_after_pooling_mask(k, s, shape, param, out):
    # Pooling's second top is BVLC's mask h * W + w, the index SegNet's Upsample expects.
    x = np.round(randn(*shape) * 2) / 2     # ties, so the first maximum matters
    net = run(UNPOOL_NET.format(k=k, s=s, param=param), x=x)
    pooled, mask = max_pool_with_mask(x, k, s)
    np.testing.assert_array_equal(net.blobs["mask"].data, mask)
    np.testing.assert_array_equal(net.blobs["p"].data, pooled)
    a = np.tanh(pooled)
    expected = upsample_loops(net.blobs["a"].data, mask, *out)
    assert net.blobs["y"].data.shape == expected.shape
    np.testing.assert_array_equal(net.blobs["y"].data, expected)
    np.testing.assert_allclose(net.blobs["a"].data, a, rtol=1e-6)
    top_diff = randn(*expected.shape)
    net.blobs["y"].diff[...] = top_diff
    net.backward(start="L")
    np.testing.assert_array_equal(net.blobs["a"].diff,
                                  upsample_backward_loops(top_diff, mask))


def test_upsample_duplicate_index_keeps_the_last_and_backward_gives_both():
    values = np.array([[[[1.0, 2.0, 3.0]]]], np.float32)
    mask = np.array([[[[4.0, 1.0, 4.0]]]], np.float32)
    layer = make_layer('type: "Upsample" upsample_param { upsample_h: 2 upsample_w: 3 }',
                       (1, 1, 1, 3), (1, 1, 1, 3))
    v = torch.tensor(values, requires_grad=True)
    y = layer(v, torch.tensor(mask))
    np.testing.assert_array_equal(y.detach().numpy().reshape(-1), [0, 2, 0, 0, 3, 0])
    y.backward(torch.arange(6, dtype=torch.float32).reshape(1, 1, 2, 3))
    np.testing.assert_array_equal(v.grad.numpy().reshape(-1), [4, 1, 4])


def test_upsample_shapes_and_errors():
    assert make_layer('type: "Upsample" upsample_param { scale_h: 3 scale_w: 2 }',
                      (1, 2, 3, 4), (1, 2, 3, 4)).reshape([(1, 2, 3, 4)] * 2) == [(1, 2, 9, 8)]
    assert make_layer('type: "Upsample"', (1, 1, 3, 4), (1, 1, 3, 4)).reshape(
        [(1, 1, 3, 4)] * 2) == [(1, 1, 6, 8)]
    with pytest.raises(protonet.NetError, match="pad_out_h needs scale_h 2"):
        make_layer('type: "Upsample" upsample_param { scale: 3 pad_out_h: true }',
                   (1, 1, 2, 2), (1, 1, 2, 2))
    with pytest.raises(protonet.NetError, match="must have the shape"):
        make_layer('type: "Upsample"', (1, 1, 2, 2), (1, 1, 2, 3))
    layer = make_layer('type: "Upsample" upsample_param { upsample_h: 2 upsample_w: 2 }',
                       (1, 1, 1, 1), (1, 1, 1, 1))
    with pytest.raises(protonet.NetError, match="mask index 4 is outside the 2x2 top"):
        layer(torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 4.0))


def test_upsample_gradcheck_without_duplicates():
    layer = make_layer('type: "Upsample" upsample_param { scale: 2 }', (2, 2, 3, 3),
                       (2, 2, 3, 3))
    base = torch.arange(9).reshape(3, 3)
    index = ((base // 3) * 2 * 6 + (base % 3) * 2 + 1).to(torch.float64)  # odd columns
    mask = index.expand(2, 2, 3, 3).clone()
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: layer(v, mask), (x,))


# --- Interp -------------------------------------------------------------------------

def interp_loops(x, pad_beg, size_in, size_out):
    """caffe_cpu_interp2 (unpacked) on the crop starting at -pad_beg, float32 weights."""
    (h1n, w1n), (h2n, w2n) = size_in, size_out
    off = -pad_beg
    crop = x[:, :, off:off + h1n, off:off + w1n]
    if (h1n, w1n) == (h2n, w2n):
        return crop.copy()
    out = np.zeros(x.shape[:2] + (h2n, w2n), x.dtype)
    rh = np.float32(h1n - 1) / np.float32(h2n - 1) if h2n > 1 else np.float32(0)
    rw = np.float32(w1n - 1) / np.float32(w2n - 1) if w2n > 1 else np.float32(0)
    for h2 in range(h2n):
        h1r = np.float32(rh * np.float32(h2))
        h1 = int(h1r)
        h1p = 1 if h1 < h1n - 1 else 0
        l1 = np.float32(h1r - np.float32(h1))
        l0 = np.float32(1) - l1
        for w2 in range(w2n):
            w1r = np.float32(rw * np.float32(w2))
            w1 = int(w1r)
            w1p = 1 if w1 < w1n - 1 else 0
            m1 = np.float32(w1r - np.float32(w1))
            m0 = np.float32(1) - m1
            out[:, :, h2, w2] = l0 * (m0 * crop[:, :, h1, w1] + m1 * crop[:, :, h1, w1 + w1p]) \
                + l1 * (m0 * crop[:, :, h1 + h1p, w1] + m1 * crop[:, :, h1 + h1p, w1 + w1p])
    return out


def interp_backward_loops(top_diff, bottom_shape, pad_beg, size_in):
    """caffe_cpu_interp2_backward: the adjoint, accumulated into the crop."""
    (h1n, w1n), (h2n, w2n) = size_in, top_diff.shape[2:]
    grad = np.zeros(bottom_shape, np.float64)
    off = -pad_beg
    crop = grad[:, :, off:off + h1n, off:off + w1n]
    if (h1n, w1n) == (h2n, w2n):
        crop += top_diff
        return grad
    rh = np.float32(h1n - 1) / np.float32(h2n - 1) if h2n > 1 else np.float32(0)
    rw = np.float32(w1n - 1) / np.float32(w2n - 1) if w2n > 1 else np.float32(0)
    for h2 in range(h2n):
        h1r = np.float32(rh * np.float32(h2))
        h1 = int(h1r)
        h1p = 1 if h1 < h1n - 1 else 0
        l1 = float(np.float32(h1r - np.float32(h1)))
        for w2 in range(w2n):
            w1r = np.float32(rw * np.float32(w2))
            w1 = int(w1r)
            w1p = 1 if w1 < w1n - 1 else 0
            m1 = float(np.float32(w1r - np.float32(w1)))
            g = top_diff[:, :, h2, w2]
            crop[:, :, h1, w1] += (1 - l1) * (1 - m1) * g
            crop[:, :, h1, w1 + w1p] += (1 - l1) * m1 * g
            crop[:, :, h1 + h1p, w1] += l1 * (1 - m1) * g
            crop[:, :, h1 + h1p, w1 + w1p] += l1 * m1 * g
    return grad


OPENCV_FIXTURES = sorted(glob.glob(os.path.join(FIXTURES, "interp_*.npz")))


@pytest.mark.parametrize("path", OPENCV_FIXTURES, ids=os.path.basename)
def test_interp_matches_opencv(path):
    case = np.load(path)
    net = net_from(str(case["prototxt"]), protonet.TEST)
    net.blobs["data"].data[...] = case["input"]
    net.forward()
    out = net.blobs["out"].data
    assert out.shape == case["output"].shape
    np.testing.assert_allclose(out, case["output"], rtol=1e-5, atol=1e-6)


def test_opencv_fixtures_present():
    assert len(OPENCV_FIXTURES) >= 6


@pytest.mark.parametrize("shape,param,pad_beg,size_in,size_out", [
    ((2, 3, 9, 8), "shrink_factor: 2", 0, (9, 8), (5, 4)),
    ((1, 2, 9, 13), "shrink_factor: 2 zoom_factor: 3", 0, (9, 13), (13, 19)),
    ((1, 2, 8, 9), "zoom_factor: 2 pad_beg: -1 pad_end: -2", -1, (5, 6), (9, 11)),
    ((1, 2, 8, 9), "height: 5 width: 6 pad_beg: -1 pad_end: -2", -1, (5, 6), (5, 6)),
    ((1, 1, 6, 7), "height: 1 width: 3", 0, (6, 7), (1, 3)),
    ((1, 2, 5, 5), "zoom_factor: 1", 0, (5, 5), (5, 5)),
])
def test_interp_against_the_fork_loops(shape, param, pad_beg, size_in, size_out):
    x = randn(*shape)
    net = run(f'layer {{ name: "L" type: "Interp" bottom: "x" top: "y" '
              f'interp_param {{ {param} }} }}', x=x)
    expected = interp_loops(x, pad_beg, size_in, size_out)
    assert net.blobs["y"].data.shape == expected.shape
    np.testing.assert_allclose(net.blobs["y"].data, expected, rtol=1e-6, atol=1e-6)
    top_diff = randn(*expected.shape)
    net.blobs["y"].diff[...] = top_diff
    net.backward(start="L")
    np.testing.assert_allclose(net.blobs["x"].diff,
                               interp_backward_loops(top_diff, shape, pad_beg, size_in),
                               rtol=1e-5, atol=1e-5)


def test_interp_gradcheck():
    layer = make_layer('type: "Interp" interp_param { height: 7 width: 5 pad_beg: -1 }',
                       (1, 2, 5, 6)).double()
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_interp_errors():
    with pytest.raises(protonet.NetError, match="pad_beg and pad_end must be <= 0"):
        make_layer('type: "Interp" interp_param { zoom_factor: 2 pad_beg: 1 }', (1, 1, 3, 3))
    with pytest.raises(protonet.NetError, match="needs zoom_factor, shrink_factor, or height"):
        make_layer('type: "Interp" interp_param { height: 3 }', (1, 1, 3, 3))
    with pytest.raises(protonet.NetError, match="zoom_factor must be >= 1"):
        make_layer('type: "Interp" interp_param { zoom_factor: 0 }', (1, 1, 3, 3))


# --- BN, SegNet's -------------------------------------------------------------------

def segnet_bn_forward(x, scale, shift, mode="LEARN"):
    """bn_layer.cpp (SegNet) in float64: var = E(x^2) - E(x)^2, eps 1e-9."""
    x = x.astype(np.float64)
    scale, shift = scale.reshape(1, -1, 1, 1), shift.reshape(1, -1, 1, 1)
    if mode == "INFERENCE":
        return x * scale + shift, None, None, None
    mean = x.mean(axis=(2, 3)).mean(axis=0).reshape(1, -1, 1, 1)
    var = (x * x).mean(axis=(2, 3)).mean(axis=0).reshape(1, -1, 1, 1) - mean ** 2
    std = np.sqrt(var + 1e-9)
    x_norm = (x - mean) / std
    return x_norm * scale + shift, x_norm, std, (mean, var)


def segnet_bn_backward(top_diff, x_norm, std, scale):
    """Backward_cpu LEARN, step by step: sums over N, H, W per channel."""
    m = top_diff.shape[0] * top_diff.shape[2] * top_diff.shape[3]
    axes = (0, 2, 3)
    d_scale = (x_norm * top_diff).sum(axis=axes)
    d_shift = top_diff.sum(axis=axes)
    g = top_diff * scale.reshape(1, -1, 1, 1)
    bottom = (x_norm * g).sum(axis=axes).reshape(1, -1, 1, 1) * x_norm
    bottom = bottom + g.sum(axis=axes).reshape(1, -1, 1, 1)
    bottom = g - bottom / m
    return bottom / std, d_scale, d_shift


def bn_net(bn_param: str, specs: str = "", tops: str = 'top: "y"'):
    return (f'layer {{ name: "L" type: "BN" bottom: "x" {tops} {specs} '
            f'bn_param {{ {bn_param} }} }}\n')


@pytest.mark.parametrize("phase", [protonet.TRAIN, protonet.TEST])
def test_segnet_bn_learn_uses_batch_statistics_in_both_phases(phase):
    x = randn(3, 4, 5, 6) * 3 + 1
    param = ('scale_filler { type: "uniform" min: 0.5 max: 2 } '
             'shift_filler { type: "uniform" min: -1 max: 1 }')
    net = build(bn_net(param, tops='top: "y" top: "mean" top: "var"'), {"x": x.shape}, phase)
    net.blobs["x"].data[...] = x
    net.forward()
    scale, shift = (net.params["L"][i].data.copy() for i in range(2))
    assert scale.shape == (1, 4, 1, 1) and len(net.params["L"]) == 2
    y, x_norm, std, (mean, var) = segnet_bn_forward(x, scale, shift)
    np.testing.assert_allclose(net.blobs["y"].data, y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(net.blobs["mean"].data, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(net.blobs["var"].data, var, rtol=1e-4, atol=1e-4)
    top_diff = randn(*x.shape)
    net.blobs["y"].diff[...] = top_diff
    net.backward(start="L")
    d_x, d_scale, d_shift = segnet_bn_backward(top_diff, x_norm, std, scale)
    np.testing.assert_allclose(net.blobs["x"].diff, d_x, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(net.params["L"][0].diff.reshape(-1), d_scale, rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(net.params["L"][1].diff.reshape(-1), d_shift, rtol=1e-4,
                               atol=1e-4)


def test_segnet_bn_inference_is_scale_and_shift():
    x = randn(2, 3, 4, 4)
    net = build(bn_net("bn_mode: INFERENCE"), {"x": x.shape})
    scale, shift = randn(1, 3, 1, 1), randn(1, 3, 1, 1)
    net.params["L"][0].data[...] = scale
    net.params["L"][1].data[...] = shift
    net.blobs["x"].data[...] = x
    net.forward()
    np.testing.assert_allclose(net.blobs["y"].data, x * scale + shift, rtol=1e-6, atol=1e-6)
    top_diff = randn(*x.shape)
    net.blobs["y"].diff[...] = top_diff
    net.backward(start="L")
    np.testing.assert_allclose(net.blobs["x"].diff, top_diff * scale, rtol=1e-6)
    np.testing.assert_allclose(net.params["L"][0].diff.reshape(-1),
                               (top_diff * x).sum(axis=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(net.params["L"][1].diff.reshape(-1),
                               top_diff.sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-5)


def gradcheck_params(layer, x):
    """gradcheck of the layer's output with respect to its first two blobs."""
    names = [f"blobs.{i}" for i in range(len(layer.blobs))]
    fixed = {n: b.detach() for n, b in zip(names, layer.blobs)}

    def call(slope, bias):
        return torch.func.functional_call(
            layer, {**fixed, names[0]: slope, names[1]: bias}, (x,))
    params = tuple(b.detach().clone().requires_grad_() for b in list(layer.blobs)[:2])
    return torch.autograd.gradcheck(call, params)


def test_segnet_bn_gradcheck():
    layer = make_layer('type: "BN" bn_param { bn_mode: LEARN '
                       'scale_filler { type: "gaussian" } shift_filler { type: "gaussian" } }',
                       (2, 3, 3, 2)).double()
    x = torch.randn(2, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    assert gradcheck_params(layer, x.detach())


# --- BN, PSPNet's -------------------------------------------------------------------

PSP = ('slope_filler { type: "uniform" min: 0.5 max: 2 } '
       'bias_filler { type: "uniform" min: -1 max: 1 } ')


def psp_forward(x, slope, bias, mean, var, eps):
    inv_std = (var + eps) ** -0.5
    x_norm = (x - mean) * inv_std
    return x_norm * slope + bias, x_norm, inv_std


def test_pspnet_bn_train_updates_moving_statistics_and_backprops_through_them():
    x = randn(2, 3, 4, 5) * 2 + 0.5
    net = build(bn_net(PSP + "momentum: 0.8 eps: 0.001"), {"x": x.shape})
    blobs = net.params["L"]
    assert len(blobs) == 4 and blobs[0].data.shape == (1, 3, 1, 1)
    stored_mean, stored_var = randn(1, 3, 1, 1), np.abs(randn(1, 3, 1, 1)) + 0.5
    blobs[2].data[...] = stored_mean
    blobs[3].data[...] = stored_var
    slope, bias = blobs[0].data.copy(), blobs[1].data.copy()
    net.blobs["x"].data[...] = x
    net.forward()
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(2, 3)).mean(axis=0).reshape(1, -1, 1, 1)
    var = ((x64 - mean) ** 2).mean(axis=(2, 3)).mean(axis=0).reshape(1, -1, 1, 1)
    y, x_norm, inv_std = psp_forward(x64, slope, bias, mean, var, np.float32(0.001))
    np.testing.assert_allclose(net.blobs["y"].data, y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(blobs[2].data, 0.2 * mean + 0.8 * stored_mean, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(blobs[3].data, 0.2 * var + 0.8 * stored_var, rtol=1e-5)
    top_diff = randn(*x.shape)
    net.blobs["y"].diff[...] = top_diff
    net.backward(start="L")
    g = top_diff * slope
    axes = (0, 2, 3)
    expected = (g - g.mean(axis=axes, keepdims=True)
                - x_norm * (g * x_norm).mean(axis=axes, keepdims=True)) * inv_std
    np.testing.assert_allclose(net.blobs["x"].diff, expected, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(blobs[0].diff, (top_diff * x_norm).sum(axis=axes,
                               keepdims=True), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(blobs[1].diff, top_diff.sum(axis=axes, keepdims=True),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("phase,frozen", [(protonet.TEST, False), (protonet.TRAIN, True)])
def test_pspnet_bn_stored_statistics(phase, frozen):
    x = randn(2, 3, 4, 4)
    text = bn_net(PSP + ("frozen: true" if frozen else "momentum: 0.95"))
    net = build(text, {"x": x.shape}, phase)
    blobs = net.params["L"]
    mean, var = randn(1, 3, 1, 1), np.abs(randn(1, 3, 1, 1)) + 0.1
    blobs[2].data[...] = mean
    blobs[3].data[...] = var
    slope, bias = blobs[0].data.copy(), blobs[1].data.copy()
    net.blobs["x"].data[...] = x
    net.forward()
    y, x_norm, inv_std = psp_forward(x.astype(np.float64), slope, bias, mean, var,
                                     np.float32(1e-5))
    np.testing.assert_allclose(net.blobs["y"].data, y, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(blobs[2].data, mean)      # nothing moves
    np.testing.assert_array_equal(blobs[3].data, var)
    top_diff = randn(*x.shape)
    net.blobs["y"].diff[...] = top_diff
    net.backward(start="L")
    g = top_diff * slope
    if frozen:      # the fork's frozen backward: slope / std, no batch terms
        expected = g * inv_std
    else:           # not frozen: the batch formula, on the stored statistics' x_norm
        axes = (0, 2, 3)
        expected = (g - g.mean(axis=axes, keepdims=True)
                    - x_norm * (g * x_norm).mean(axis=axes, keepdims=True)) * inv_std
    np.testing.assert_allclose(net.blobs["x"].diff, expected, rtol=1e-4, atol=1e-5)


def test_pspnet_bn_param_specs_as_the_fork_sets_them():
    def multipliers(text):
        net = build(text, {"x": (1, 2, 3, 3)})
        return [(e.index, e.lr_mult, e.decay_mult) for e in net.module.learnable
                if e.layer == "L"]
    specs = "param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 1 }"
    assert multipliers(bn_net(PSP + "frozen: true", specs)) == [
        (0, 0, 0), (1, 0, 0), (2, 0, 0), (3, 0, 0)]
    assert multipliers(bn_net(PSP + "momentum: 0.9", specs)) == [
        (0, 1, 1), (1, 2, 1), (2, 0, 0), (3, 0, 0)]


def test_pspnet_bn_gradcheck_train():
    layer = make_layer('type: "BN" bn_param { eps: 0.01 '
                       'slope_filler { type: "gaussian" } bias_filler { type: "gaussian" } }',
                       (2, 3, 2, 3)).double()
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    # the moving statistics change on each call; the output does not depend on them
    assert torch.autograd.gradcheck(layer, (x,))
    assert gradcheck_params(layer, x.detach())


def test_bn_variant_from_fields_and_from_the_weights_file():
    from protonet.layers.fork_bn import PSPNET, SEGNET
    assert make_layer('type: "BN" bn_param { bn_mode: INFERENCE }', (1, 2, 2, 2)).variant \
        == SEGNET
    assert make_layer('type: "BN" bn_param { frozen: true }', (1, 2, 2, 2)).variant == PSPNET
    assert make_layer('type: "BN" param {} param {} param {} param {}',
                      (1, 2, 2, 2)).variant == PSPNET
    # Neither: SegNet's two blobs, until a file brings four for the layer.
    net = build(bn_net(""), {"x": (1, 2, 3, 3)}, protonet.TEST)
    assert len(net.params["L"]) == 2
    source = caffe_pb2.NetParameter()
    stored = source.layer.add(name="L", type="BN")
    values = [np.full((1, 2, 1, 1), v, np.float32) for v in (2.0, 1.0, 0.5, 4.0)]
    for value in values:
        blob = stored.blobs.add()
        blob.shape.dim.extend(value.shape)
        blob.data.extend(value.reshape(-1).tolist())
    copy_trained_layers(net.module.layers, source)
    assert len(net.params["L"]) == 4
    x = randn(1, 2, 3, 3)
    net.blobs["x"].data[...] = x
    net.forward()
    expected = (x - 0.5) / np.sqrt(4.0 + np.float32(1e-5)) * 2.0 + 1.0
    np.testing.assert_allclose(net.blobs["y"].data, expected, rtol=1e-5, atol=1e-6)


def test_bn_errors():
    with pytest.raises(protonet.NetError, match="4-axis bottom"):
        make_layer('type: "BN"', (2, 3))
    with pytest.raises(protonet.NetError, match="at most 1 top"):
        build(bn_net("frozen: true", tops='top: "y" top: "m"'), {"x": (1, 2, 2, 2)})


@pytest.mark.parametrize("text", [
    'type: "BN" bn_param { frozen: true slope_filler { type: "gaussian" } '
    'bias_filler { type: "gaussian" } }',
    'type: "BN" bn_param { bn_mode: INFERENCE scale_filler { type: "gaussian" } '
    'shift_filler { type: "gaussian" } }',
])
def test_bn_inference_fast_path_equals_the_fork_steps(text):
    layer = make_layer(text, (2, 3, 4, 5), phase=protonet.TEST)
    if len(layer.blobs) == 4:
        with torch.no_grad():
            layer.blobs[2].normal_()
            layer.blobs[3].uniform_(0.5, 2)
    x = torch.randn(2, 3, 4, 5)
    with torch.no_grad():
        fast = layer(x)
    stepwise = layer(x.clone().requires_grad_())
    np.testing.assert_allclose(fast.numpy(), stepwise.detach().numpy(), rtol=1e-5, atol=1e-5)


CUDA_CASES = {
    "upsample_overlap": ('type: "Upsample" upsample_param { upsample_h: 9 upsample_w: 7 }',
                         (2, 3, 4, 3)),
    "interp": ('type: "Interp" interp_param { zoom_factor: 3 pad_beg: -1 pad_end: -1 }',
               (2, 3, 6, 7)),
    "bn_segnet": ('type: "BN" bn_param { scale_filler { type: "gaussian" } '
                  'shift_filler { type: "gaussian" } }', (2, 3, 5, 4)),
    "bn_pspnet": ('type: "BN" bn_param { momentum: 0.9 slope_filler { type: "gaussian" } '
                  'bias_filler { type: "gaussian" } }', (2, 3, 5, 4)),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", sorted(CUDA_CASES))
def test_cuda_equals_cpu(case):
    text, shape = CUDA_CASES[case]
    torch.manual_seed(0)
    x = torch.randn(shape)
    bottoms = [x]
    if case.startswith("upsample"):         # a kernel-3 stride-2 pooling mask: duplicates
        pooled, index = torch.nn.functional.max_pool2d(torch.randn(2, 3, 9, 7), 3, 2,
                                                       ceil_mode=True, return_indices=True)
        bottoms = [pooled, index.float()]
    layer = make_layer(text, *[tuple(b.shape) for b in bottoms])
    results = []
    for device in ("cpu", "cuda"):
        moved = make_layer(text, *[tuple(b.shape) for b in bottoms])
        moved.load_state_dict(layer.state_dict())
        moved.to(device)
        inputs = [b.to(device).requires_grad_(i == 0) for i, b in enumerate(bottoms)]
        top = moved(*inputs)
        top = top[0] if isinstance(top, list) else top
        top.backward(torch.linspace(-1, 1, top.numel(), device=device).reshape(top.shape))
        results.append((top.detach().cpu(), inputs[0].grad.cpu(),
                        [b.grad.cpu() for b in moved.blobs if b.grad is not None]))
    (top_a, grad_a, params_a), (top_b, grad_b, params_b) = results
    torch.testing.assert_close(top_b, top_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-4, atol=1e-5)
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


# --- SoftmaxWithLoss with SegNet/ENet's class weighting ------------------------------

def test_softmax_loss_class_weighting_as_segnet():
    scores, label = randn(2, 3, 4, 5), RNG.integers(0, 3, (2, 1, 4, 5)).astype(np.float32)
    label[0, 0, 0, :2] = 255
    weights = [0.5, 2.0, 3.0]
    param = " ".join(f"class_weighting: {w}" for w in weights)
    net = run(f'layer {{ name: "L" type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "y" '
              f'loss_param {{ weight_by_label_freqs: true ignore_label: 255 {param} }} }}',
              s=scores, l=label)
    # softmax_loss_layer.cpp (SegNet): loss -= log(max(p, FLT_MIN)) * w[label], / count;
    # diff = (p - 1[label]) * w[label] / count, 0 at ignored positions
    s64 = scores.astype(np.float64)
    prob = np.exp(s64 - s64.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    loss, count, diff = 0.0, 0, prob.copy()
    for n in range(2):
        for h in range(4):
            for w in range(5):
                lab = int(label[n, 0, h, w])
                if lab == 255:
                    diff[n, :, h, w] = 0
                    continue
                loss -= np.log(max(prob[n, lab, h, w], np.finfo(np.float32).tiny)) * weights[lab]
                diff[n, lab, h, w] -= 1
                diff[n, :, h, w] *= weights[lab]
                count += 1
    np.testing.assert_allclose(float(net.blobs["y"].data), loss / count, rtol=1e-5)
    net.backward(start="L")
    np.testing.assert_allclose(net.blobs["s"].diff, diff / count, rtol=1e-4, atol=1e-6)


def test_softmax_loss_class_weighting_needs_one_per_class():
    with pytest.raises(protonet.NetError, match="2 class_weighting values for 3 classes"):
        build('layer { name: "L" type: "SoftmaxWithLoss" bottom: "s" bottom: "l" top: "y" '
              'loss_param { weight_by_label_freqs: true class_weighting: 1 '
              'class_weighting: 2 } }', {"s": (1, 3, 2, 2), "l": (1, 1, 2, 2)})


def test_unpool_last_writer_path_equals_the_fork_loops():
    # the path CUDA takes for a mask with repeated indices, run here on the CPU
    from protonet.layers.upsampling import unpool_last_writer
    x = np.round(randn(2, 3, 9, 7) * 2) / 2
    pooled, mask = max_pool_with_mask(x, 3, 2)
    values = torch.tensor(pooled, requires_grad=True)
    flat = torch.tensor(mask).long().reshape(2, 3, -1)
    top = unpool_last_writer(values, flat, 9, 7)
    np.testing.assert_array_equal(top.detach().numpy(), upsample_loops(pooled, mask, 9, 7))
    top_diff = randn(2, 3, 9, 7)
    top.backward(torch.tensor(top_diff))
    np.testing.assert_array_equal(values.grad.numpy(), upsample_backward_loops(top_diff, mask))
    assert len(np.unique(mask)) < mask.size      # the case has repeated indices
