"""Structure layers beyond the Caffe fixtures: types without a fixture, options the
fixtures leave at defaults, shape inference and every error path, checked against
numpy formulas and (where Caffe's gradient is the true one) gradcheck."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import protonet
from layer_helpers import build, expect_error, make_layer, run

RNG = np.random.default_rng(7)


def randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def double(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


# -- Split ---------------------------------------------------------------------------
def test_split_tops_share_data_and_sum_gradients():
    x = randn(2, 3)
    net = run('layer { name: "L" type: "Split" bottom: "x" top: "a" top: "b" top: "c" }', x=x)
    for top in "abc":
        np.testing.assert_array_equal(net.blobs[top].data, x)
    diffs = {top: randn(2, 3) for top in "abc"}
    net.backward(**diffs)
    np.testing.assert_allclose(net.blobs["x"].diff, diffs["a"] + diffs["b"] + diffs["c"],
                               rtol=1e-6)
    np.testing.assert_array_equal(net.blobs["b"].diff, diffs["b"])


def test_split_refuses_in_place():
    expect_error('layer { name: "L" type: "Split" bottom: "x" top: "x" top: "y" }',
                 {"x": (2,)}, "in-place")


# -- Concat --------------------------------------------------------------------------
def test_concat_negative_axis_and_single_bottom():
    a, b = randn(2, 3, 2), randn(2, 3, 4)
    net = run('layer { name: "L" type: "Concat" bottom: "a" bottom: "b" top: "out" '
              'concat_param { axis: -1 } }', a=a, b=b)
    np.testing.assert_array_equal(net.blobs["out"].data, np.concatenate([a, b], -1))
    net = run('layer { name: "L" type: "Concat" bottom: "a" top: "out" }', a=a)
    np.testing.assert_array_equal(net.blobs["out"].data, a)


def test_concat_legacy_concat_dim():
    a, b = randn(2, 3), randn(1, 3)
    net = run('layer { name: "L" type: "Concat" bottom: "a" bottom: "b" top: "out" '
              'concat_param { concat_dim: 0 } }', a=a, b=b)
    np.testing.assert_array_equal(net.blobs["out"].data, np.concatenate([a, b], 0))


@pytest.mark.parametrize("param, shapes, match", [
    ("axis: 0 concat_dim: 0", {"a": (2, 3), "b": (2, 3)}, "not both"),
    ("concat_dim: 2", {"a": (2, 3), "b": (2, 3)}, "concat_dim 2 out of range"),
    ("axis: 2", {"a": (2, 3), "b": (2, 3)}, "axis 2 out of range"),
    ("", {"a": (2, 3), "b": (3, 3)}, "match except on axis 1"),
    ("", {"a": (2, 3), "b": (2, 3, 1)}, "need 2 axes"),
])
def test_concat_errors(param, shapes, match):
    expect_error('layer { name: "L" type: "Concat" bottom: "a" bottom: "b" top: "out" '
                 f'concat_param {{ {param} }} }}', shapes, match)


# -- Slice ---------------------------------------------------------------------------
def test_slice_equal_split_forward_and_backward():
    x = randn(2, 6, 2)
    net = run('layer { name: "L" type: "Slice" bottom: "x" top: "a" top: "b" top: "c" }', x=x)
    for i, top in enumerate("abc"):
        np.testing.assert_array_equal(net.blobs[top].data, x[:, 2 * i:2 * i + 2])
    diffs = {top: randn(2, 2, 2) for top in "abc"}
    net.backward(**diffs)
    np.testing.assert_array_equal(net.blobs["x"].diff,
                                  np.concatenate([diffs[t] for t in "abc"], 1))


def test_slice_legacy_slice_dim():
    x = randn(4, 3)
    net = run('layer { name: "L" type: "Slice" bottom: "x" top: "a" top: "b" '
              'slice_param { slice_dim: 0 slice_point: 3 } }', x=x)
    assert net.blobs["a"].shape == (3, 3) and net.blobs["b"].shape == (1, 3)
    np.testing.assert_array_equal(net.blobs["b"].data, x[3:])


@pytest.mark.parametrize("param, match", [
    ("", "2 tops do not evenly divide"),
    ("slice_point: 1 slice_point: 2", "2 slice points need 3 tops"),
    ("slice_point: 0", "increase strictly"),
    ("slice_point: 4", "within axis 1"),
    ("axis: 1 slice_dim: 1", "not both"),
])
def test_slice_errors(param, match):
    expect_error('layer { name: "L" type: "Slice" bottom: "x" top: "a" top: "b" '
                 f'slice_param {{ {param} }} }}', {"x": (2, 3)}, match)


def test_slice_more_tops_than_axis_size():
    expect_error('layer { name: "L" type: "Slice" bottom: "x" top: "a" top: "b" top: "c" '
                 'slice_param { slice_point: 1 slice_point: 2 } }', {"x": (2, 2)},
                 "3 tops cannot slice")


# -- Eltwise -------------------------------------------------------------------------
def test_eltwise_sum_default_coeffs():
    a, b, c = randn(2, 3), randn(2, 3), randn(2, 3)
    net = run('layer { name: "L" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" '
              'top: "out" }', a=a, b=b, c=c)
    np.testing.assert_allclose(net.blobs["out"].data, a + b + c, rtol=1e-6)


@pytest.mark.parametrize("stable", [True, False])
def test_eltwise_prod_gradient(stable):
    a, b, c = randn(3, 4), randn(3, 4), randn(3, 4)
    net = run('layer { name: "L" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" '
              f'top: "out" eltwise_param {{ operation: PROD stable_prod_grad: '
              f'{str(stable).lower()} }} }}', a=a, b=b, c=c)
    np.testing.assert_allclose(net.blobs["out"].data, a * b * c, rtol=1e-6)
    g = randn(3, 4)
    net.backward(out=g)
    for name, others in (("a", b * c), ("b", a * c), ("c", a * b)):
        np.testing.assert_allclose(net.blobs[name].diff, others * g, rtol=1e-5, atol=1e-6)


def test_eltwise_prod_zero_bottom_unstable_divides_like_caffe():
    a = np.array([[0.0, 2.0]], np.float32)
    b = np.array([[3.0, 0.5]], np.float32)
    net = run('layer { name: "L" type: "Eltwise" bottom: "a" bottom: "b" top: "out" '
              'eltwise_param { operation: PROD stable_prod_grad: false } }', a=a, b=b)
    net.backward(out=np.ones((1, 2), np.float32))
    assert np.isnan(net.blobs["a"].diff[0, 0])          # 0 / 0, as Caffe's top / bottom
    np.testing.assert_allclose(net.blobs["b"].diff, [[0.0, 2.0]])


@pytest.mark.parametrize("stable", ["true", "false"])
def test_eltwise_prod_gradcheck(stable):
    layer = make_layer('name: "L" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" '
                       f'top: "out" eltwise_param {{ operation: PROD stable_prod_grad: {stable} }}',
                       (2, 3), (2, 3), (2, 3))
    assert torch.autograd.gradcheck(layer, (double(2, 3), double(2, 3), double(2, 3)))


def test_eltwise_max_tie_routing():
    a = np.array([[1.0, 2.0, 5.0, 0.0]], np.float32)
    b = np.array([[1.0, 3.0, 5.0, 4.0]], np.float32)
    c = np.array([[1.0, 3.0, 2.0, 4.0]], np.float32)
    net = run('layer { name: "L" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" '
              'top: "out" eltwise_param { operation: MAX } }', a=a, b=b, c=c)
    np.testing.assert_array_equal(net.blobs["out"].data, np.maximum(np.maximum(a, b), c))
    g = np.array([[10.0, 20.0, 30.0, 40.0]], np.float32)
    net.backward(out=g)
    # A tie of a and b goes to b; c takes over only when strictly greater.
    np.testing.assert_array_equal(net.blobs["a"].diff, [[0, 0, 0, 0]])
    np.testing.assert_array_equal(net.blobs["b"].diff, [[10, 20, 30, 40]])
    np.testing.assert_array_equal(net.blobs["c"].diff, [[0, 0, 0, 0]])


@pytest.mark.parametrize("param, shapes, match", [
    ("coeff: 1", {"a": (2,), "b": (2,)}, "one coeff per bottom"),
    ("operation: PROD coeff: 1 coeff: 2", {"a": (2,), "b": (2,)}, "SUM only"),
    ("", {"a": (2,), "b": (3,)}, "equal shapes"),
])
def test_eltwise_errors(param, shapes, match):
    expect_error('layer { name: "L" type: "Eltwise" bottom: "a" bottom: "b" top: "out" '
                 f'eltwise_param {{ {param} }} }}', shapes, match)


def test_eltwise_needs_two_bottoms():
    expect_error('layer { name: "L" type: "Eltwise" bottom: "a" top: "out" }', {"a": (2,)},
                 "at least 2 bottom")


# -- Flatten and Reshape -------------------------------------------------------------
@pytest.mark.parametrize("param, shape", [
    ("axis: 1 end_axis: 2", (2, 12, 5)),
    ("axis: 0", (120,)),
    ("axis: -2", (2, 3, 20)),
    ("axis: 2 end_axis: 1", (2, 3, 1, 4, 5)),      # Caffe inserts a 1 here
])
def test_flatten_axes(param, shape):
    x = randn(2, 3, 4, 5)
    net = run(f'layer {{ name: "L" type: "Flatten" bottom: "x" top: "out" '
              f'flatten_param {{ {param} }} }}', x=x)
    np.testing.assert_array_equal(net.blobs["out"].data, x.reshape(shape))


def test_flatten_errors():
    expect_error('layer { name: "L" type: "Flatten" bottom: "x" top: "out" '
                 'flatten_param { axis: 3 end_axis: 1 } }', {"x": (2, 3, 4, 5)}, "comes before")
    expect_error('layer { name: "L" type: "Flatten" bottom: "x" top: "x" }', {"x": (2, 3)},
                 "in-place")


@pytest.mark.parametrize("param, shape", [
    ("shape { dim: 1 } axis: -1 num_axes: 0", (2, 3, 4, 1)),
    ("shape { dim: -1 } axis: 1", (2, 12)),
    ("shape { dim: 0 dim: 2 dim: -1 }", (2, 2, 6)),
    ("shape { dim: 4 dim: 0 } axis: 1 num_axes: 2", None),   # 0 copies axis 2 -> 4*4 != 12
])
def test_reshape_shapes(param, shape):
    layer = (f'layer {{ name: "L" type: "Reshape" bottom: "x" top: "out" '
             f'reshape_param {{ {param} }} }}')
    if shape is None:
        expect_error(layer, {"x": (2, 3, 4)}, "output count must match")
        return
    x = randn(2, 3, 4)
    net = run(layer, x=x)
    np.testing.assert_array_equal(net.blobs["out"].data, x.reshape(shape))


@pytest.mark.parametrize("param, match", [
    ("shape { dim: -1 dim: -1 }", "more than one -1"),
    ("shape { dim: -2 dim: 12 }", "dims >= 0"),
    ("shape { dim: 5 dim: -1 }", "divisible"),
    ("shape { dim: 0 dim: 0 dim: 0 dim: 0 }", "no axis 3 to copy"),
    ("shape { dim: 7 }", "output count must match"),
    ("shape { dim: 1 } axis: 4", "axis 4 out of range"),
    ("shape { dim: 1 } axis: -5", "axis -5 out of range"),
    ("shape { dim: 1 } axis: 1 num_axes: -2", "num_axes must be"),
    ("shape { dim: 1 } axis: 2 num_axes: 2", "out of range"),
])
def test_reshape_errors(param, match):
    expect_error(f'layer {{ name: "L" type: "Reshape" bottom: "x" top: "out" '
                 f'reshape_param {{ {param} }} }}', {"x": (2, 3, 4)}, match)


def test_reshape_refuses_in_place():
    expect_error('layer { name: "L" type: "Reshape" bottom: "x" top: "x" '
                 'reshape_param { shape { dim: -1 } } }', {"x": (2, 3)}, "in-place")


# -- Tile ----------------------------------------------------------------------------
def test_tile_last_axis_forward_and_backward():
    x = randn(2, 3)
    net = run('layer { name: "L" type: "Tile" bottom: "x" top: "out" '
              'tile_param { axis: -1 tiles: 3 } }', x=x)
    np.testing.assert_array_equal(net.blobs["out"].data, np.tile(x, (1, 3)))
    g = randn(2, 9)
    net.backward(out=g)
    np.testing.assert_allclose(net.blobs["x"].diff, g.reshape(2, 3, 3).sum(1), rtol=1e-6)


@pytest.mark.parametrize("param, match", [("axis: 1", "must be given"),
                                          ("tiles: 0", "must be positive")])
def test_tile_errors(param, match):
    expect_error(f'layer {{ name: "L" type: "Tile" bottom: "x" top: "out" '
                 f'tile_param {{ {param} }} }}', {"x": (2, 3)}, match)


# -- Reduction -----------------------------------------------------------------------
def test_reduction_mean_with_axis_and_coeff():
    x = randn(2, 3, 4)
    net = run('layer { name: "L" type: "Reduction" bottom: "x" top: "out" '
              'reduction_param { operation: MEAN axis: 1 coeff: 3 } }', x=x)
    np.testing.assert_allclose(net.blobs["out"].data, 3 * x.reshape(2, -1).mean(1), rtol=1e-5)
    g = randn(2)
    net.backward(out=g)
    np.testing.assert_allclose(net.blobs["x"].diff,
                               np.broadcast_to((3 / 12 * g)[:, None, None], x.shape),
                               rtol=1e-6)


def test_reduction_asum_zero_gets_zero_gradient():
    x = np.array([[-2.0, 0.0, 3.0]], np.float32)
    net = run('layer { name: "L" type: "Reduction" bottom: "x" top: "out" '
              'reduction_param { operation: ASUM axis: -1 } }', x=x)
    np.testing.assert_allclose(net.blobs["out"].data, [5.0])
    net.backward(out=np.array([2.0], np.float32))
    np.testing.assert_array_equal(net.blobs["x"].diff, [[-2.0, 0.0, 2.0]])


@pytest.mark.parametrize("operation", ["SUM", "SUMSQ", "MEAN"])
def test_reduction_gradcheck(operation):
    layer = make_layer(f'name: "L" type: "Reduction" bottom: "x" top: "out" '
                       f'reduction_param {{ operation: {operation} axis: 1 coeff: -0.5 }}',
                       (2, 3, 2))
    assert torch.autograd.gradcheck(layer, (double(2, 3, 2),))


def test_reduction_axis_error():
    expect_error('layer { name: "L" type: "Reduction" bottom: "x" top: "out" '
                 'reduction_param { axis: 3 } }', {"x": (2, 3)}, "axis 3 out of range")


# -- Crop ----------------------------------------------------------------------------
def test_crop_per_axis_offsets_forward_and_backward():
    x = randn(2, 5, 6, 7)
    net = run('layer { name: "L" type: "Crop" bottom: "x" bottom: "ref" top: "out" '
              'crop_param { axis: 1 offset: 1 offset: 2 offset: 3 } }',
              x=x, ref=randn(9, 3, 4, 2))
    expected = x[:, 1:4, 2:6, 3:5]
    np.testing.assert_array_equal(net.blobs["out"].data, expected)
    g = randn(*expected.shape)
    net.backward(out=g)
    full = np.zeros_like(x)
    full[:, 1:4, 2:6, 3:5] = g
    np.testing.assert_array_equal(net.blobs["x"].diff, full)
    np.testing.assert_array_equal(net.blobs["ref"].diff, np.zeros((9, 3, 4, 2)))


def test_crop_single_offset_and_default_axis():
    x = randn(2, 3, 6, 6)
    net = run('layer { name: "L" type: "Crop" bottom: "x" bottom: "ref" top: "out" '
              'crop_param { offset: 2 } }', x=x, ref=randn(1, 1, 3, 4))
    np.testing.assert_array_equal(net.blobs["out"].data, x[:, :, 2:5, 2:6])


@pytest.mark.parametrize("param, ref, match", [
    ("axis: 0 offset: 1 offset: 1", (2, 2, 2), "give one, or one per cropped axis"),
    ("offset: 3", (2, 3, 3), "out of bounds"),
    ("axis: 3", (2, 3, 3), "axis 3 out of range"),
    ("axis: 1", (2, 3), "as many axes"),
])
def test_crop_errors(param, ref, match):
    expect_error('layer { name: "L" type: "Crop" bottom: "x" bottom: "ref" top: "out" '
                 f'crop_param {{ {param} }} }}', {"x": (2, 4, 5), "ref": ref}, match)


# -- BatchReindex --------------------------------------------------------------------
REINDEX = 'layer { name: "L" type: "BatchReindex" bottom: "x" bottom: "idx" top: "out" }'


def test_batch_reindex_accumulates_and_skips_indices():
    x, idx = randn(3, 2), np.array([2, 0, 2, 2], np.float32)
    net = run(REINDEX, x=x, idx=idx)
    np.testing.assert_array_equal(net.blobs["out"].data, x[[2, 0, 2, 2]])
    g = randn(4, 2)
    net.backward(out=g)
    expected = np.zeros_like(x)
    np.add.at(expected, [2, 0, 2, 2], g)
    np.testing.assert_allclose(net.blobs["x"].diff, expected, rtol=1e-6)
    assert not net.blobs["idx"].diff.any()


def test_batch_reindex_bad_input():
    expect_error(REINDEX, {"x": (3, 2), "idx": (2, 2)}, "must have 1 axis")
    net = build(REINDEX, {"x": (3, 2), "idx": (2,)})
    net.blobs["idx"].data[...] = [0, 3]
    with pytest.raises(protonet.NetError, match="layer 'L'.*index 3 out of range"):
        net.forward()


# -- Filter --------------------------------------------------------------------------
FILTER = ('layer { name: "L" type: "Filter" bottom: "a" bottom: "b" bottom: "sel" '
          'top: "fa" top: "fb" }')


def test_filter_several_bottoms_shapes_and_gradient():
    a, b = randn(4, 3), randn(4, 2, 2)
    sel = np.array([[0], [2], [0], [-1]], np.float32)
    net = build(FILTER, {"a": a.shape, "b": b.shape, "sel": sel.shape})
    assert net.blobs["fa"].shape == (4, 3)        # full batch before forward, like Caffe
    for name, value in (("a", a), ("b", b), ("sel", sel)):
        net.blobs[name].data[...] = value
    net.forward()
    np.testing.assert_array_equal(net.blobs["fa"].data, a[[1, 3]])
    np.testing.assert_array_equal(net.blobs["fb"].data, b[[1, 3]])
    ga, gb = randn(2, 3), randn(2, 2, 2)
    net.backward(fa=ga, fb=gb)
    expected = np.zeros_like(a)
    expected[[1, 3]] = ga
    np.testing.assert_array_equal(net.blobs["a"].diff, expected)
    assert not net.blobs["b"].diff[[0, 2]].any()
    assert not net.blobs["sel"].diff.any()


def test_filter_errors():
    expect_error('layer { name: "L" type: "Filter" bottom: "a" bottom: "sel" top: "x" '
                 'top: "y" }', {"a": (4, 3), "sel": (4,)}, "one top per data bottom")
    expect_error('layer { name: "L" type: "Filter" bottom: "a" bottom: "sel" top: "x" }',
                 {"a": (4, 3), "sel": (4, 2)}, "must be 1 on every axis")
    expect_error('layer { name: "L" type: "Filter" bottom: "a" bottom: "sel" top: "x" }',
                 {"a": (3, 3), "sel": (4,)}, "differ in their first dim")


# -- Silence -------------------------------------------------------------------------
def test_silence_has_no_tops_and_adds_no_gradient():
    x = randn(2, 3)
    net = run('layer { name: "L" type: "Silence" bottom: "x" }\n'
              'layer { name: "sum" type: "Reduction" bottom: "x" top: "s" '
              'reduction_param { operation: SUMSQ } }', x=x)
    assert "L" in net._layer_names and net.outputs == ["s"]
    net.backward(s=np.array(1.0, np.float32))
    np.testing.assert_allclose(net.blobs["x"].diff, 2 * x, rtol=1e-6)


def test_silence_takes_several_bottoms_and_no_top():
    net = run('layer { name: "L" type: "Silence" bottom: "x" bottom: "y" }',
              x=randn(2), y=randn(3))
    assert net.outputs == []
    expect_error('layer { name: "L" type: "Silence" bottom: "x" top: "y" }', {"x": (2,)},
                 "exactly 0 top")
