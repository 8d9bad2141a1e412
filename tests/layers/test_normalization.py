"""BatchNorm, MVN, Scale and Bias beyond the Caffe fixtures: running statistics over
several passes, the phase defaults, the forced lr_mult 0 param specs, MVN's eps
placement and gradient, Scale/Bias axis and num_axes variants, in-place chains, shape
inference and error paths. References are numpy formulas written from Caffe's
definitions; gradcheck (float64) covers the layers whose Caffe gradient is the true one."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import protonet
from protonet import caffe_pb2
from protonet.io.text import parse_text
from protonet.layers import layer_class, registered_types

RNG = np.random.default_rng(13)


def build(layers: str, inputs: dict[str, tuple], phase: int = protonet.TRAIN) -> protonet.Net:
    """One Input layer per entry of `inputs` feeding `layers`, with force_backward."""
    text = "force_backward: true\n"
    for name, shape in inputs.items():
        dims = " ".join(f"dim: {d}" for d in shape)
        text += (f'layer {{ name: "in_{name}" type: "Input" top: "{name}" '
                 f'input_param {{ shape {{ {dims} }} }} }}\n')
    return protonet.Net(parse_text(text + layers, caffe_pb2.NetParameter()), phase)


def run(layers: str, phase: int = protonet.TRAIN, **inputs: np.ndarray) -> protonet.Net:
    net = build(layers, {name: value.shape for name, value in inputs.items()}, phase)
    for name, value in inputs.items():
        net.blobs[name].data[...] = value
    net.forward()
    return net


def make_layer(text: str, *shapes: tuple, phase: int = protonet.TRAIN):
    """A set-up layer object (bottoms "x", "s"; top "y"), to call directly."""
    bottoms = " ".join(f'bottom: "{b}"' for b in "xs"[:len(shapes)])
    param = parse_text(f'name: "L" {bottoms} top: "y" {text}', caffe_pb2.LayerParameter())
    layer = layer_class(param.type)(param, phase)
    layer.setup(list(shapes))
    layer.reshape(list(shapes))
    return layer


def randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def expect_error(layers: str, inputs: dict[str, tuple], match: str = ""):
    with pytest.raises(protonet.NetError, match=f"layer 'L'.*{match}"):
        build(layers, inputs)


def test_types_are_registered():
    assert {"BatchNorm", "MVN", "Scale", "Bias"} <= set(registered_types())


# -- BatchNorm ---------------------------------------------------------------------------
BN = 'layer {{ name: "L" type: "BatchNorm" bottom: "x" top: "{top}" {params} }}\n'


def batch_stats(x: np.ndarray):
    axes = tuple(a for a in range(x.ndim) if a != 1)
    x64 = x.astype(np.float64)
    return x64.mean(axis=axes), x64.var(axis=axes), axes


def channel(v: np.ndarray, ndim: int) -> np.ndarray:
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def test_batchnorm_train_default_updates_running_sums_over_passes():
    params = "batch_norm_param { moving_average_fraction: 0.5 eps: 0.01 }"
    xs = [randn(3, 2, 4), randn(3, 2, 4) * 2 + 1]
    net = build(BN.format(top="y", params=params), {"x": xs[0].shape})
    expected = [np.zeros(2), np.zeros(2), np.zeros(1)]
    m = 3 * 4
    for x in xs:
        net.blobs["x"].data[...] = x
        net.forward()
        mean, var, _ = batch_stats(x)
        np.testing.assert_allclose(net.blobs["y"].data,
                                   (x - channel(mean, 3)) / np.sqrt(channel(var, 3) + 0.01),
                                   rtol=1e-4, atol=1e-5)
        expected = [0.5 * expected[0] + mean, 0.5 * expected[1] + var * m / (m - 1),
                    0.5 * expected[2] + 1]
    for blob, value in zip(net.params["L"], expected):
        np.testing.assert_allclose(blob.data, value, rtol=1e-5, atol=1e-6)


def test_batchnorm_train_gradient():
    x, dy = randn(4, 3, 2, 2), randn(4, 3, 2, 2)
    net = run(BN.format(top="y", params=""), x=x)
    net.backward(y=dy)
    mean, var, axes = batch_stats(x)
    y = (x - channel(mean, 4)) / np.sqrt(channel(var, 4) + 1e-5)
    dx = (dy - dy.mean(axis=axes, keepdims=True)
          - y * (dy * y).mean(axis=axes, keepdims=True)) / np.sqrt(channel(var, 4) + 1e-5)
    np.testing.assert_allclose(net.blobs["x"].diff, dx, rtol=1e-4, atol=1e-5)
    for blob in net.params["L"]:
        np.testing.assert_array_equal(blob.diff, np.zeros(blob.shape, np.float32))


def test_batchnorm_train_gradcheck():
    layer = make_layer('type: "BatchNorm"', (3, 2, 2)).double()
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(layer, (x,))


@pytest.mark.parametrize("phase,params", [
    (protonet.TEST, ""), (protonet.TRAIN, "batch_norm_param { use_global_stats: true }")])
def test_batchnorm_global_stats_and_no_update(phase, params):
    x, dy = randn(2, 3, 4), randn(2, 3, 4)
    net = build(BN.format(top="y", params=params), {"x": x.shape}, phase)
    sums = [np.array([1.0, -2.0, 0.5], np.float32), np.array([4.0, 1.0, 9.0], np.float32),
            np.array([2.0], np.float32)]
    for blob, value in zip(net.params["L"], sums):
        blob.data[...] = value
    net.blobs["x"].data[...] = x
    net.forward()
    std = np.sqrt(channel(sums[1] / 2, 3) + 1e-5)
    np.testing.assert_allclose(net.blobs["y"].data, (x - channel(sums[0] / 2, 3)) / std,
                               rtol=1e-5, atol=1e-6)
    net.backward(y=dy)
    np.testing.assert_allclose(net.blobs["x"].diff, dy / std, rtol=1e-5)
    for blob, value in zip(net.params["L"], sums):
        np.testing.assert_array_equal(blob.data, value)


def test_batchnorm_zero_scale_factor_means_zero_statistics():
    x = randn(2, 3)
    net = build(BN.format(top="y", params="batch_norm_param { eps: 0.25 }"), {"x": x.shape},
                protonet.TEST)
    net.params["L"][0].data[...] = 5.0
    net.params["L"][1].data[...] = 7.0
    net.blobs["x"].data[...] = x
    net.forward()
    np.testing.assert_allclose(net.blobs["y"].data, x / 0.5, rtol=1e-6)


def test_batchnorm_single_element_batch_skips_bias_correction():
    x = randn(1, 2)
    net = run(BN.format(top="y", params="batch_norm_param { moving_average_fraction: 0 }"),
              x=x)
    np.testing.assert_array_equal(net.blobs["y"].data, np.zeros_like(x))
    np.testing.assert_array_equal(net.params["L"][1].data, np.zeros(2, np.float32))
    np.testing.assert_allclose(net.params["L"][0].data, x[0])


def test_batchnorm_adds_zero_lr_param_specs():
    net = build(BN.format(top="y", params="param { lr_mult: 0 decay_mult: 0 }"),
                {"x": (2, 3)})
    layer = net.layer_dict["L"].module
    assert [spec.lr_mult for spec in layer.param.param] == [0, 0, 0]
    assert [blob.shape for blob in net.params["L"]] == [(3,), (3,), (1,)]
    assert all(entry.lr_mult == 0 for entry in net.module.learnable if entry.layer == "L")


@pytest.mark.parametrize("params", ["param { lr_mult: 1 }",
                                    "param { lr_mult: 0 } param { decay_mult: 0 }"])
def test_batchnorm_refuses_learned_statistics(params):
    expect_error(BN.format(top="y", params=params), {"x": (2, 3)}, "lr_mult")


def test_batchnorm_needs_channels_axis():
    expect_error(BN.format(top="y", params=""), {"x": (4,)}, "at least 2 axes")


def test_batchnorm_reshape_with_other_channel_count_fails():
    net = build(BN.format(top="y", params=""), {"x": (2, 3, 4)})
    net.blobs["x"].reshape(2, 5, 4)
    with pytest.raises(protonet.ShapeError, match="layer 'L'.*3 channels"):
        net.reshape()


def test_batchnorm_then_scale_then_relu_in_place():
    x, dy = randn(2, 3, 2), randn(2, 3, 2)
    layers = (BN.format(top="x", params="")
              + 'layer { name: "S" type: "Scale" bottom: "x" top: "x" scale_param { '
                'bias_term: true filler { type: "constant" value: 2 } '
                'bias_filler { type: "constant" value: -0.5 } } }\n'
              + 'layer { name: "R" type: "ReLU" bottom: "x" top: "x" }\n')
    net = build(layers, {"x": x.shape})
    net.blobs["x"].data[...] = x
    net.forward()
    mean, var, axes = batch_stats(x)
    normed = (x - channel(mean, 3)) / np.sqrt(channel(var, 3) + 1e-5)
    pre = 2 * normed - 0.5
    np.testing.assert_allclose(net.blobs["x"].data, np.maximum(pre, 0), rtol=1e-4, atol=1e-5)
    net.backward(x=dy)
    np.testing.assert_allclose(net.params["S"][0].diff, (dy * (pre > 0) * normed).sum(axes),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(net.params["S"][1].diff, (dy * (pre > 0)).sum(axes),
                               rtol=1e-4, atol=1e-5)


# -- MVN ------------------------------------------------------------------------------
MVN = 'layer {{ name: "L" type: "MVN" bottom: "x" top: "y" mvn_param {{ {params} }} }}\n'


@pytest.mark.parametrize("across", [False, True])
def test_mvn_adds_eps_to_the_std_and_uses_caffes_gradient(across):
    x, dy = randn(2, 3, 4, 2), randn(2, 3, 4, 2)
    params = f"eps: 0.5 across_channels: {str(across).lower()}"
    net = run(MVN.format(params=params), x=x)
    axes = (1, 2, 3) if across else (2, 3)
    x64 = x.astype(np.float64)
    centered = x64 - x64.mean(axis=axes, keepdims=True)
    denominator = np.sqrt((centered ** 2).mean(axis=axes, keepdims=True)) + 0.5
    y = centered / denominator
    np.testing.assert_allclose(net.blobs["y"].data, y, rtol=1e-5, atol=1e-6)
    net.backward(y=dy)
    dx = (dy - dy.mean(axis=axes, keepdims=True)
          - y * (dy * y).mean(axis=axes, keepdims=True)) / denominator
    np.testing.assert_allclose(net.blobs["x"].diff, dx, rtol=1e-4, atol=1e-5)


def test_mvn_constant_input_has_finite_gradient():
    x, dy = np.full((1, 2, 3, 3), 4.0, np.float32), randn(1, 2, 3, 3)
    net = run(MVN.format(params=""), x=x)
    np.testing.assert_array_equal(net.blobs["y"].data, np.zeros_like(x))
    net.backward(y=dy)
    expected = (dy - dy.mean(axis=(2, 3), keepdims=True)) / np.float32(1e-9)
    np.testing.assert_allclose(net.blobs["x"].diff, expected, rtol=1e-4)


def test_mvn_mean_only_gradcheck():
    layer = make_layer('type: "MVN" mvn_param { normalize_variance: false }', (2, 3, 2, 2))
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(layer, (x,))


def test_mvn_top_takes_the_4_axis_legacy_shape():
    x = randn(3, 5)
    net = run(MVN.format(params="across_channels: true"), x=x)
    assert net.blobs["y"].shape == (3, 5, 1, 1)
    x64 = x.astype(np.float64)
    centered = x64 - x64.mean(axis=1, keepdims=True)
    y = centered / (np.sqrt((centered ** 2).mean(axis=1, keepdims=True)) + 1e-9)
    np.testing.assert_allclose(net.blobs["y"].data, y.reshape(3, 5, 1, 1), rtol=1e-5,
                               atol=1e-6)


def test_mvn_refuses_more_than_4_axes():
    expect_error(MVN.format(params=""), {"x": (1, 2, 3, 4, 5)}, "at most 4 axes")


# -- Scale --------------------------------------------------------------------------------
def scale_layer(params: str, bottoms: str = 'bottom: "x"', top: str = "y") -> str:
    return (f'layer {{ name: "L" type: "Scale" {bottoms} top: "{top}" '
            f'scale_param {{ {params} }} }}\n')


@pytest.mark.parametrize("axis,num_axes,shape", [
    (1, 1, (3,)), (0, 0, ()), (1, -1, (3, 4, 5)), (1, 2, (3, 4)), (-2, 1, (4,)),
    (-1, -1, (5,)), (0, -1, (2, 3, 4, 5))])
def test_scale_learned_shape_and_values(axis, num_axes, shape):
    x, dy = randn(2, 3, 4, 5), randn(2, 3, 4, 5)
    net = build(scale_layer(f"axis: {axis} num_axes: {num_axes}"), {"x": x.shape})
    blob = net.params["L"][0]
    assert blob.shape == shape
    np.testing.assert_array_equal(blob.data, np.ones(shape, np.float32))
    scale = randn(*shape)
    blob.data[...] = scale
    net.blobs["x"].data[...] = x
    net.forward()
    start = 0 if not shape else axis % 4
    view = (1,) * start + shape + (1,) * (4 - start - len(shape))
    np.testing.assert_allclose(net.blobs["y"].data, x * scale.reshape(view), rtol=1e-6)
    net.backward(y=dy)
    np.testing.assert_allclose(net.blobs["x"].diff, dy * scale.reshape(view), rtol=1e-6)
    reduce = tuple(a for a in range(4) if view[a] == 1)
    np.testing.assert_allclose(blob.diff, (dy * x).sum(reduce).reshape(shape), rtol=1e-4,
                               atol=1e-5)


def test_scale_bias_term_default_fillers():
    net = build(scale_layer("bias_term: true axis: 2 num_axes: 2"), {"x": (2, 3, 4, 5)})
    scale, bias = net.params["L"]
    assert scale.shape == bias.shape == (4, 5)
    np.testing.assert_array_equal(scale.data, np.ones((4, 5), np.float32))
    np.testing.assert_array_equal(bias.data, np.zeros((4, 5), np.float32))


def test_scale_two_bottoms_with_bias_gradients():
    x, s, dy = randn(2, 3, 4), randn(3, 4), randn(2, 3, 4)
    net = build(scale_layer('bias_term: true bias_filler { type: "constant" value: 0.5 }',
                            'bottom: "x" bottom: "s"'), {"x": x.shape, "s": s.shape})
    assert [b.shape for b in net.params["L"]] == [(3, 4)]
    net.blobs["x"].data[...] = x
    net.blobs["s"].data[...] = s
    net.forward()
    np.testing.assert_allclose(net.blobs["y"].data, x * s + 0.5, rtol=1e-6)
    net.backward(y=dy)
    np.testing.assert_allclose(net.blobs["x"].diff, dy * s, rtol=1e-6)
    np.testing.assert_allclose(net.blobs["s"].diff, (dy * x).sum(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.params["L"][0].diff, dy.sum(0), rtol=1e-5, atol=1e-6)


def test_scale_two_bottoms_scalar_scale_ignores_axis():
    x, s = randn(2, 3), np.array(1.5, np.float32)
    net = build(scale_layer("axis: 1", 'bottom: "x" bottom: "s"'), {"x": (2, 3), "s": ()})
    net.blobs["x"].data[...] = x
    net.blobs["s"].data[...] = s
    net.forward()
    np.testing.assert_allclose(net.blobs["y"].data, 1.5 * x, rtol=1e-6)


def test_scale_gradcheck_learned_and_two_bottoms():
    learned = make_layer('type: "Scale" scale_param { bias_term: true axis: 1 num_axes: 2 '
                         'filler { type: "uniform" } bias_filler { type: "uniform" } }',
                         (2, 3, 4)).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(learned, (x,))
    two = make_layer('type: "Scale" scale_param { axis: 0 }', (2, 3, 4), (2, 3))
    s = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(two, (x, s))


@pytest.mark.parametrize("params,inputs,match", [
    ("num_axes: -2", {"x": (2, 3)}, "num_axes"),
    ("axis: 1 num_axes: 3", {"x": (2, 3, 4)}, "extends past"),
    ("axis: 3", {"x": (2, 3, 4)}, "axis 3 out of range"),
    ("axis: -4", {"x": (2, 3, 4)}, "out of range"),
])
def test_scale_learned_errors(params, inputs, match):
    expect_error(scale_layer(params), inputs, match)


@pytest.mark.parametrize("params,s_shape,match", [
    ("", (4,), "does not match"),
    ("axis: 2", (4, 5), "does not match"),
    ("axis: 5", (4,), "out of range"),
])
def test_scale_two_bottom_errors(params, s_shape, match):
    expect_error(scale_layer(params, 'bottom: "x" bottom: "s"'),
                 {"x": (2, 3, 4), "s": s_shape}, match)


def test_scale_blob_count_rules():
    expect_error(scale_layer("", 'bottom: "x" bottom: "s" bottom: "t"'),
                 {"x": (2,), "s": (2,), "t": (2,)}, "at most 2 bottom")


# -- Bias ---------------------------------------------------------------------------------
def bias_layer(params: str, bottoms: str = 'bottom: "x"') -> str:
    return f'layer {{ name: "L" type: "Bias" {bottoms} top: "y" bias_param {{ {params} }} }}\n'


@pytest.mark.parametrize("axis,num_axes,shape", [
    (1, 1, (3,)), (0, 0, ()), (1, -1, (3, 4)), (-1, 1, (4,)), (0, 2, (2, 3))])
def test_bias_learned_shape_and_values(axis, num_axes, shape):
    x, dy = randn(2, 3, 4), randn(2, 3, 4)
    net = build(bias_layer(f"axis: {axis} num_axes: {num_axes}"), {"x": x.shape})
    blob = net.params["L"][0]
    assert blob.shape == shape
    np.testing.assert_array_equal(blob.data, np.zeros(shape, np.float32))
    bias = randn(*shape)
    blob.data[...] = bias
    net.blobs["x"].data[...] = x
    net.forward()
    start = 0 if not shape else axis % 3
    view = (1,) * start + shape + (1,) * (3 - start - len(shape))
    np.testing.assert_allclose(net.blobs["y"].data, x + bias.reshape(view), rtol=1e-6)
    net.backward(y=dy)
    np.testing.assert_array_equal(net.blobs["x"].diff, dy)
    reduce = tuple(a for a in range(3) if view[a] == 1)
    np.testing.assert_allclose(blob.diff, dy.sum(reduce).reshape(shape), rtol=1e-5, atol=1e-6)


def test_bias_two_bottoms_ignores_num_axes_and_in_place():
    x, b, dy = randn(2, 3, 4), randn(3, 4), randn(2, 3, 4)
    layers = ('layer { name: "L" type: "Bias" bottom: "x" bottom: "b" top: "x" '
              'bias_param { num_axes: 1 } }\n')
    net = build(layers, {"x": x.shape, "b": b.shape})
    net.blobs["x"].data[...] = x
    net.blobs["b"].data[...] = b
    net.forward()
    np.testing.assert_allclose(net.blobs["x"].data, x + b, rtol=1e-6)
    net.backward(x=dy)
    np.testing.assert_allclose(net.blobs["b"].diff, dy.sum(0), rtol=1e-5, atol=1e-6)


def test_bias_gradcheck_two_bottoms():
    layer = make_layer('type: "Bias" bias_param { axis: -1 }', (2, 3), (3,))
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(layer, (x, b))


@pytest.mark.parametrize("layers,inputs,match", [
    (bias_layer("num_axes: -3"), {"x": (2, 3)}, "num_axes"),
    (bias_layer("axis: 2 num_axes: 2"), {"x": (2, 3, 4)}, "extends past"),
    (bias_layer("axis: 2"), {"x": (2, 3)}, "out of range"),
    (bias_layer("", 'bottom: "x" bottom: "b"'), {"x": (2, 3), "b": (2,)}, "does not match"),
])
def test_bias_errors(layers, inputs, match):
    expect_error(layers, inputs, match)


@pytest.mark.parametrize("shape,bias,layout", [((2, 3, 4, 5), True, "nchw"),
                                               ((2, 3, 4, 5), False, "nhwc"),
                                               ((4, 3), True, "nchw"), ((2, 3, 6), True, "nchw")])
def test_per_channel_scale_path_matches_multiply_add(shape, bias, layout):
    """Scale's per-channel case runs as a batch norm with mean 0, variance 1, eps 0;
    values and all three gradients are x * s + b's."""
    from protonet.layers.normalization import _channel_affine
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    s = torch.randn(shape[1], generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[1], generator=gen, dtype=torch.float64, requires_grad=True) \
        if bias else None
    view = (1, -1) + (1,) * (len(shape) - 2)
    expected = x * s.view(view) + (b.view(view) if bias else 0)
    got = _channel_affine(x, s, b)
    assert torch.allclose(got, expected, rtol=1e-14, atol=1e-14)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    inputs = [x, s] + ([b] if bias else [])
    for g, e in zip(torch.autograd.grad(got, inputs, dy), torch.autograd.grad(expected, inputs, dy)):
        assert torch.allclose(g, e, rtol=1e-12, atol=1e-12)


def test_train_batchnorm_scale_pair_runs_fused_with_the_same_numbers():
    """An in-place TRAIN BatchNorm + Scale pair runs as one batch-norm kernel (NetModule
    fuses it unless a callback must see each layer): same top, gradients and running
    sums as the two layers one after the other."""
    from protonet.net.module import NetModule
    text = ('force_backward: true\nlayer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 '
            'dim: 4 dim: 5 } } }\n'
            + BN.format(top="x", params="")
            + 'layer { name: "S" type: "Scale" bottom: "x" top: "x" scale_param { '
              'bias_term: true filler { type: "gaussian" } bias_filler { type: "gaussian" } } }\n'
            + 'layer { name: "R" type: "ReLU" bottom: "x" top: "x" }\n')
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        module = NetModule(parse_text(text, caffe_pb2.NetParameter()), protonet.TRAIN)
        assert module.fused_scale
        x = torch.from_numpy(randn(2, 3, 4, 5) if not results else results[0][0])
        x = x.clone().requires_grad_()
        values, _ = module({"x": x}, after=None if fused else (lambda i, v: None))
        top = values[module.blob_index["x"]]
        top.backward(torch.linspace(-1, 1, top.numel()).reshape(top.shape))
        results.append((x.detach().numpy(), top.detach(), x.grad,
                        [p.grad for p in module.layers[2].blobs],
                        [b.detach().clone() for b in module.layers[1].blobs]))
    (_, *fused), (_, *single) = results
    for got, want in zip(fused[:2], single[:2]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(fused[2] + fused[3], single[2] + single[3]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
