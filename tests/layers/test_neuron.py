"""Neuron layers beyond the Caffe fixtures: default and non-default options, Caffe's
gradient at kinks and in its quirky formulas, Dropout's random mask, in-place use,
shape inference and error paths. References are numpy formulas written from Caffe's
definitions; gradcheck (float64) covers the layers whose Caffe gradient is the true one."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import protonet
from protonet import caffe_pb2
from protonet.io.text import parse_text
from protonet.layers import layer_class, registered_types

RNG = np.random.default_rng(11)
NEURON_TYPES = ["ReLU", "PReLU", "ELU", "Sigmoid", "TanH", "AbsVal", "Power", "Exp", "Log",
                "BNLL", "Threshold", "Dropout", "Clip", "Swish"]


def build(layers: str, shape: tuple, phase: int = protonet.TRAIN) -> protonet.Net:
    """Input "x" of `shape` feeding `layers`, with force_backward."""
    dims = " ".join(f"dim: {d}" for d in shape)
    text = ('force_backward: true\n'
            f'layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ {dims} }} }} }}\n'
            + layers)
    return protonet.Net(parse_text(text, caffe_pb2.NetParameter()), phase)


def layer_text(type_name: str, params: str = "", bottom: str = "x", top: str = "y",
               name: str = "L") -> str:
    return (f'layer {{ name: "{name}" type: "{type_name}" bottom: "{bottom}" top: "{top}" '
            f'{params} }}\n')


def forward_backward(type_name: str, params: str, x: np.ndarray, dy: np.ndarray | None = None,
                     phase: int = protonet.TRAIN):
    """(top, bottom diff) of one layer for input x and top diff dy."""
    net = build(layer_text(type_name, params), x.shape, phase)
    net.blobs["x"].data[...] = x
    net.forward()
    y = net.blobs["y"].data.copy()
    if dy is None:
        return y, None
    net.backward(y=dy)
    return y, net.blobs["x"].diff.copy()


def make_layer(text: str, shape: tuple, phase: int = protonet.TRAIN):
    """A set-up layer object with bottom "x" and top "y", to call directly."""
    param = parse_text(f'bottom: "x" top: "y" {text}', caffe_pb2.LayerParameter())
    layer = layer_class(param.type)(param, phase)
    layer.setup([shape])
    assert layer.reshape([shape]) == [shape]
    return layer


def randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def with_kinks(*shape: int) -> np.ndarray:
    """Random values with some exact zeros, to probe gradients at the kink."""
    x = randn(*shape)
    x.reshape(-1)[::5] = 0.0
    return x


def expect_error(text: str, shape: tuple, match: str = ""):
    with pytest.raises(protonet.NetError, match=f"layer 'L'.*{match}"):
        build(text, shape)


def test_every_neuron_type_is_registered():
    assert set(NEURON_TYPES) <= set(registered_types())


@pytest.mark.parametrize("type_name", NEURON_TYPES)
def test_top_shape_is_bottom_shape(type_name):
    params = "clip_param { min: -1 max: 1 }" if type_name == "Clip" else ""
    net = build(layer_text(type_name, params), (2, 3, 4, 5))
    assert net.blobs["y"].shape == (2, 3, 4, 5)


# -- ReLU / PReLU ------------------------------------------------------------------------
@pytest.mark.parametrize("slope", [0.0, 0.3])
def test_relu_gradient_at_zero_is_the_slope(slope):
    x, dy = with_kinks(3, 4), randn(3, 4)
    y, dx = forward_backward("ReLU", f"relu_param {{ negative_slope: {slope} }}", x, dy)
    np.testing.assert_allclose(y, np.where(x > 0, x, slope * x), rtol=1e-6)
    np.testing.assert_allclose(dx, dy * np.where(x > 0, 1.0, slope), rtol=1e-6)


def test_relu_in_place_chain():
    x, dy = with_kinks(2, 6), randn(2, 6)
    net = build(layer_text("Power", "power_param { scale: -2 }", name="P") +
                layer_text("ReLU", "relu_param { negative_slope: 0.5 }", "y", "y"), x.shape)
    net.blobs["x"].data[...] = x
    net.forward()
    z = -2 * x
    np.testing.assert_allclose(net.blobs["y"].data, np.where(z > 0, z, 0.5 * z), rtol=1e-6)
    net.backward(y=dy)
    np.testing.assert_allclose(net.blobs["x"].diff, -2 * dy * np.where(z > 0, 1.0, 0.5),
                               rtol=1e-6)


def test_prelu_default_filler_is_quarter_per_channel():
    net = build(layer_text("PReLU"), (2, 5, 3))
    slopes = net.params["L"][0].data
    assert slopes.shape == (5,)
    np.testing.assert_array_equal(slopes, np.full(5, 0.25, np.float32))


def test_prelu_channel_shared_forward_and_gradients():
    x, dy = with_kinks(2, 3, 4), randn(2, 3, 4)
    net = build(layer_text("PReLU", 'prelu_param { channel_shared: true '
                                    'filler { type: "constant" value: 0.2 } }'), x.shape)
    assert net.params["L"][0].shape == ()
    net.blobs["x"].data[...] = x
    net.forward()
    np.testing.assert_allclose(net.blobs["y"].data, np.where(x > 0, x, 0.2 * x), rtol=1e-6)
    net.backward(y=dy)
    np.testing.assert_allclose(net.blobs["x"].diff, dy * np.where(x > 0, 1.0, 0.2), rtol=1e-6)
    np.testing.assert_allclose(net.params["L"][0].diff, (dy * x * (x <= 0)).sum(), rtol=1e-5)


def test_prelu_channelwise_on_2d_bottom():
    x, dy = randn(4, 3), randn(4, 3)
    net = build(layer_text("PReLU", 'prelu_param { filler { type: "constant" value: 0.1 } }'),
                x.shape)
    slopes = np.array([0.1, -0.5, 2.0], np.float32)
    net.params["L"][0].data[...] = slopes
    net.blobs["x"].data[...] = x
    net.forward()
    np.testing.assert_allclose(net.blobs["y"].data, np.where(x > 0, x, slopes * x), rtol=1e-6)
    net.backward(y=dy)
    np.testing.assert_allclose(net.params["L"][0].diff, (dy * x * (x <= 0)).sum(0), rtol=1e-5)


def test_prelu_gradcheck():
    layer = make_layer('name: "L" type: "PReLU" prelu_param { filler { type: "uniform" } }',
                       (2, 3, 2)).double()
    x = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(layer, (x,))


def test_prelu_needs_two_axes():
    expect_error(layer_text("PReLU"), (5,), "at least 2 axes")


# -- smooth activations ---------------------------------------------------------------
def test_elu_default_alpha_and_gradient_at_zero():
    x, dy = with_kinks(3, 5), randn(3, 5)
    y, dx = forward_backward("ELU", "", x, dy)
    np.testing.assert_allclose(y, np.where(x > 0, x, np.expm1(x)), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dx, dy * np.where(x > 0, 1.0, np.exp(x)), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("text", [
    'type: "ELU" elu_param { alpha: 0.4 }', 'type: "Sigmoid"', 'type: "TanH"',
    'type: "BNLL"', 'type: "Swish"', 'type: "Swish" swish_param { beta: 0.3 }',
    'type: "Exp"', 'type: "Exp" exp_param { base: 3 scale: -0.5 shift: 0.2 }',
    'type: "Power" power_param { power: 1.5 scale: 0.5 shift: 4 }',
    'type: "Power" power_param { power: -2 shift: 5 }',
])
def test_gradient_is_the_true_derivative(text):
    layer = make_layer(f'name: "L" {text}', (3, 4))
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(layer, (x,))


def test_log_gradcheck_on_its_domain():
    layer = make_layer('name: "L" type: "Log" log_param { base: 2 scale: 3 shift: 1 }', (6,))
    x = torch.rand(6, dtype=torch.float64).add(0.1).requires_grad_(True)
    torch.autograd.gradcheck(layer, (x,))


def test_sigmoid_tanh_swish_values():
    x = randn(4, 4) * 4
    np.testing.assert_allclose(forward_backward("Sigmoid", "", x)[0], 1 / (1 + np.exp(-x)),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(forward_backward("TanH", "", x)[0], np.tanh(x), rtol=1e-5,
                               atol=1e-7)
    swish = forward_backward("Swish", "swish_param { beta: 2 }", x)[0]
    np.testing.assert_allclose(swish, x / (1 + np.exp(-2 * x)), rtol=1e-5, atol=1e-6)


def test_bnll_large_inputs_and_gradient_at_zero():
    x = np.array([[-100.0, -3.0, 0.0, 3.0, 60.0, 100.0]], np.float32)
    y, dx = forward_backward("BNLL", "", x, np.ones_like(x))
    np.testing.assert_allclose(y, np.logaddexp(0, x.astype(np.float64)), rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(dx, 1 / (1 + np.exp(-x.astype(np.float64))), rtol=1e-6,
                               atol=1e-30)
    assert dx[0, 2] == 0.5


# -- AbsVal / Clip / Threshold -----------------------------------------------------------
def test_absval_gradient_is_sign_with_zero_at_zero():
    x, dy = with_kinks(2, 5), randn(2, 5)
    y, dx = forward_backward("AbsVal", "", x, dy)
    np.testing.assert_array_equal(y, np.abs(x))
    np.testing.assert_array_equal(dx, dy * np.sign(x))


def test_absval_refuses_in_place():
    expect_error(layer_text("AbsVal", top="x"), (3,), "in-place")


def test_clip_gradient_passes_at_the_bounds():
    x = np.array([[-2.0, -0.5, 0.0, 0.7, 0.70001, 3.0]], np.float32)
    dy = randn(1, 6)
    y, dx = forward_backward("Clip", "clip_param { min: -0.5 max: 0.7 }", x, dy)
    np.testing.assert_array_equal(y, np.clip(x, np.float32(-0.5), np.float32(0.7)))
    np.testing.assert_array_equal(dx, dy * np.array([[0, 1, 1, 1, 0, 0]], np.float32))


def test_clip_with_min_above_max_gives_min_and_no_gradient():
    x, dy = randn(2, 3), randn(2, 3)
    y, dx = forward_backward("Clip", "clip_param { min: 1 max: -1 }", x, dy)
    np.testing.assert_array_equal(y, np.ones_like(x))
    np.testing.assert_array_equal(dx, np.zeros_like(x))


@pytest.mark.parametrize("threshold", [0.0, -0.25])
def test_threshold_values(threshold):
    x = with_kinks(3, 4)
    x[0, 1] = threshold
    y, _ = forward_backward("Threshold", f"threshold_param {{ threshold: {threshold} }}", x)
    np.testing.assert_array_equal(y, (x > np.float32(threshold)).astype(np.float32))


def test_threshold_backward_fails_like_caffe():
    net = build(layer_text("Threshold"), (2, 3))
    net.blobs["x"].data[...] = randn(2, 3)
    net.forward()
    with pytest.raises(protonet.NetError, match="layer 'L'.*no backward"):
        net.backward(y=np.ones((2, 3), np.float32))


# -- Power / Exp / Log -----------------------------------------------------------------
@pytest.mark.parametrize("power,scale,shift", [
    (1.0, 2.0, 0.5), (2.0, -1.5, 0.0), (3.0, 1.0, 0.0), (0.5, 0.25, 2.0), (1.0, 1.0, 0.0)])
def test_power_forward_and_backward(power, scale, shift):
    x = randn(3, 4)
    x = np.abs(x) + 0.1 if power == 0.5 else x
    dy = randn(3, 4)
    text = f"power_param {{ power: {power} scale: {scale} shift: {shift} }}"
    y, dx = forward_backward("Power", text, x, dy)
    base = shift + scale * x.astype(np.float64)
    np.testing.assert_allclose(y, base ** power, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx, dy * power * scale * base ** (power - 1), rtol=1e-4,
                               atol=1e-5)


def test_power_zero_base_gives_nan_gradient_as_in_caffe():
    x = np.array([[0.0, 1.0]], np.float32)
    _, dx = forward_backward("Power", "power_param { power: 3 }", x, np.ones_like(x))
    assert np.isnan(dx[0, 0]) and dx[0, 1] == 3.0


@pytest.mark.parametrize("text,value", [
    ("power_param { power: 0 shift: 3 }", 1.0),
    ("power_param { power: 2 scale: 0 shift: 3 }", 9.0)])
def test_power_constant_output_has_zero_gradient(text, value):
    x = randn(2, 3)
    y, dx = forward_backward("Power", text, x, np.full_like(x, np.nan))
    np.testing.assert_array_equal(y, np.full_like(x, value))
    np.testing.assert_array_equal(dx, np.zeros_like(x))


@pytest.mark.parametrize("base,scale,shift", [(-1.0, 1.0, 0.0), (-1.0, 0.5, 1.0),
                                              (10.0, -1.0, 0.5), (1.0, 2.0, 0.0)])
def test_exp_values_and_gradient(base, scale, shift):
    x, dy = randn(3, 4), randn(3, 4)
    y, dx = forward_backward("Exp", f"exp_param {{ base: {base} scale: {scale} "
                                    f"shift: {shift} }}", x, dy)
    b = np.e if base == -1 else base
    expected = b ** (shift + scale * x.astype(np.float64))
    np.testing.assert_allclose(y, expected, rtol=1e-5)
    np.testing.assert_allclose(dx, dy * expected * np.log(b) * scale, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("base,scale,shift", [(-1.0, 1.0, 0.0), (2.0, 0.5, 1.0)])
def test_log_values_and_gradient(base, scale, shift):
    x, dy = np.abs(randn(3, 4)) + 0.1, randn(3, 4)
    y, dx = forward_backward("Log", f"log_param {{ base: {base} scale: {scale} "
                                    f"shift: {shift} }}", x, dy)
    inner = shift + scale * x.astype(np.float64)
    log_base = 1.0 if base == -1 else np.log(base)
    np.testing.assert_allclose(y, np.log(inner) / log_base, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dx, dy * scale / (inner * log_base), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("type_name,params,match", [
    ("Exp", "exp_param { base: -2 }", "base must be"),
    ("Exp", "exp_param { base: 0 }", "base must be"),
    ("Log", "log_param { base: -0.5 }", "base must be"),
    ("Log", "log_param { base: 1 }", "base 1"),
])
def test_bad_bases(type_name, params, match):
    expect_error(layer_text(type_name, params), (2,), match)


# -- Dropout -----------------------------------------------------------------------------
def test_dropout_train_mask_statistics_and_backward():
    protonet.set_random_seed(1701)
    x = np.ones((200, 500), np.float32)
    dy = randn(200, 500)
    y, dx = forward_backward("Dropout", "dropout_param { dropout_ratio: 0.3 }", x, dy)
    scale = np.float32(1) / (np.float32(1) - np.float32(0.3))
    kept = y != 0
    assert abs(kept.mean() - 0.7) < 0.005
    np.testing.assert_allclose(y[kept], scale, rtol=1e-6)
    np.testing.assert_allclose(dx, dy * kept * scale, rtol=1e-6)


def test_dropout_train_is_repeatable_under_a_seed():
    x = randn(4, 50)
    masks = []
    for _ in range(2):
        protonet.set_random_seed(5)
        masks.append(forward_backward("Dropout", "", x)[0] != 0)
    np.testing.assert_array_equal(masks[0], masks[1])
    assert 0.3 < masks[0].mean() < 0.7


def test_dropout_test_is_an_identity_copy():
    x, dy = randn(3, 4), randn(3, 4)
    net = build(layer_text("Dropout", "dropout_param { dropout_ratio: 0.8 }"), x.shape,
                protonet.TEST)
    net.blobs["x"].data[...] = x
    net.forward()
    np.testing.assert_array_equal(net.blobs["y"].data, x)
    net.blobs["y"].data[...] = 0
    np.testing.assert_array_equal(net.blobs["x"].data, x)
    net.backward(y=dy)
    np.testing.assert_array_equal(net.blobs["x"].diff, dy)


@pytest.mark.parametrize("ratio", [1.0, -0.1])
def test_dropout_ratio_out_of_range(ratio):
    expect_error(layer_text("Dropout", f"dropout_param {{ dropout_ratio: {ratio} }}"), (2,),
                 "dropout_ratio")
