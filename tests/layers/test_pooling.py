"""Pooling beyond the Caffe fixtures: STOCHASTIC (GPU-only in Caffe, so no fixture),
the MAX argmax mask top, and SPP, against numpy references of Caffe's definitions."""
from __future__ import annotations

import numpy as np

import protonet
from layer_helpers import build, expect_error

RNG = np.random.default_rng(3)


def pool(text: str, x: np.ndarray, phase=protonet.TRAIN, tops: str = 'top: "y"'):
    layer = f'layer {{ name: "L" type: "Pooling" bottom: "x" {tops} pooling_param {{ {text} }} }}'
    net = build(layer, {"x": x.shape}, phase=phase)
    net.blobs["x"].data[...] = x
    net.forward()
    return net


def windows(x: np.ndarray, k: int, s: int):
    """Caffe's STOCHASTIC windows (no pad, clipped at the edge), as lists of values."""
    n, c, h, w = x.shape
    oh, ow = -(-(h - k) // s) + 1, -(-(w - k) // s) + 1
    for i in range(oh):
        for j in range(ow):
            yield i, j, x[:, :, i * s:min(i * s + k, h), j * s:min(j * s + k, w)]


def test_stochastic_test_phase_is_the_probability_weighted_average():
    x = RNG.uniform(0, 1, (2, 3, 5, 5)).astype(np.float32)
    y = pool("pool: STOCHASTIC kernel_size: 3 stride: 2", x, protonet.TEST).blobs["y"].data
    for i, j, win in windows(x, 3, 2):
        flat = win.reshape(2, 3, -1).astype(np.float64)
        expect = (flat ** 2).sum(-1) / flat.sum(-1)
        np.testing.assert_allclose(y[:, :, i, j], expect, rtol=1e-5)


def test_stochastic_test_phase_gives_zero_for_an_all_zero_window():
    x = np.zeros((1, 1, 4, 4), np.float32)
    y = pool("pool: STOCHASTIC kernel_size: 2 stride: 2", x, protonet.TEST).blobs["y"].data
    assert not np.isnan(y).any() and (y == 0).all()


def test_stochastic_train_samples_in_proportion_to_the_activation():
    x = np.array([1, 2, 3, 4], np.float32).reshape(1, 1, 2, 2)
    x = np.tile(x, (1, 4000, 1, 1))                    # 4000 independent windows
    protonet.set_random_seed(5)
    y = pool("pool: STOCHASTIC kernel_size: 2 stride: 2", x).blobs["y"].data.ravel()
    assert set(np.unique(y)) <= {1.0, 2.0, 3.0, 4.0}
    freq = np.array([(y == v).mean() for v in (1, 2, 3, 4)])
    np.testing.assert_allclose(freq, np.array([1, 2, 3, 4]) / 10, atol=0.03)


def test_stochastic_train_gradient_goes_to_the_picked_activation():
    x = RNG.uniform(0.1, 1, (1, 2, 4, 4)).astype(np.float32)
    protonet.set_random_seed(9)
    net = pool("pool: STOCHASTIC kernel_size: 2 stride: 2", x)
    y = net.blobs["y"].data.copy()
    dy = RNG.standard_normal(y.shape).astype(np.float32)
    dx = net.backward(y=dy)["x"]
    for i, j, win in windows(x, 2, 2):
        grad = dx[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
        picked = win == y[:, :, i, j][..., None, None]
        np.testing.assert_allclose(grad.sum((-1, -2)), dy[:, :, i, j], rtol=1e-6)
        assert ((grad != 0) <= picked).all()


def test_max_pooling_mask_top_holds_caffes_argmax_index():
    x = RNG.standard_normal((1, 2, 5, 5)).astype(np.float32)
    net = pool("pool: MAX kernel_size: 3 stride: 2 pad: 1", x, tops='top: "y" top: "mask"')
    y, mask = net.blobs["y"].data, net.blobs["mask"].data
    flat = x.reshape(1, 2, 25)
    idx = mask.astype(np.int64).reshape(1, 2, -1)
    np.testing.assert_array_equal(np.take_along_axis(flat, idx, -1).reshape(y.shape), y)


def test_spp_levels_flatten_and_concatenate():
    x = RNG.standard_normal((2, 3, 7, 6)).astype(np.float32)
    layer = ('layer { name: "L" type: "SPP" bottom: "x" top: "y" '
             'spp_param { pyramid_height: 2 pool: MAX } }')
    net = build(layer, {"x": x.shape})
    net.blobs["x"].data[...] = x
    y = net.forward()["y"]
    assert y.shape == (2, 3 * 1 + 3 * 4)
    np.testing.assert_allclose(y[:, :3], x.max(axis=(2, 3)), rtol=1e-6)
    # level 1: 2x2 bins, kernel ceil(7/2)=4 x ceil(6/2)=3, pad (1, 0): rows -1..2 and 3..6
    top_left = x[:, :, 0:3, 0:3].max(axis=(2, 3))
    np.testing.assert_allclose(y[:, 3:15].reshape(2, 3, 4)[:, :, 0], top_left, rtol=1e-6)


def test_spp_of_height_one_keeps_the_pooled_shape():
    layer = ('layer { name: "L" type: "SPP" bottom: "x" top: "y" '
             'spp_param { pyramid_height: 1 pool: AVE } }')
    net = build(layer, {"x": (2, 3, 4, 4)})
    assert net.blobs["y"].shape == (2, 3, 1, 1)


def test_padding_with_stochastic_pooling_is_refused():
    expect_error('layer { name: "L" type: "Pooling" bottom: "x" top: "y" pooling_param '
                 '{ pool: STOCHASTIC kernel_size: 3 pad: 1 } }', {"x": (1, 1, 5, 5)},
                 "padding")
