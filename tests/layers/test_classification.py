"""Softmax, ArgMax and Accuracy beyond the Caffe fixtures: tie rules, output shape
conventions, options the fixtures leave at defaults, and every error path, checked
against numpy references written from Caffe's definitions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import protonet
from layer_helpers import build, expect_error, make_layer, run

RNG = np.random.default_rng(11)


def randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


# -- Softmax -------------------------------------------------------------------------
def numpy_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def test_softmax_large_scores_negative_axis():
    x = randn(2, 3, 4) * 50 + 1000          # exp(1000) overflows without the max shift
    net = run('layer { name: "L" type: "Softmax" bottom: "x" top: "out" '
              'softmax_param { axis: -1 } }', x=x)
    out = net.blobs["out"].data
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, numpy_softmax(x, -1), rtol=1e-5, atol=1e-7)


def test_softmax_backward_matches_caffe_formula():
    x, g = randn(2, 4, 3), randn(2, 4, 3)
    net = run('layer { name: "L" type: "Softmax" bottom: "x" top: "out" }', x=x)
    net.backward(out=g)
    y = numpy_softmax(x, 1)
    expected = (g - (g * y).sum(1, keepdims=True)) * y
    np.testing.assert_allclose(net.blobs["x"].diff, expected, rtol=1e-4, atol=1e-6)


def test_softmax_gradcheck():
    layer = make_layer('name: "L" type: "Softmax" bottom: "x" top: "out" '
                       'softmax_param { axis: 0 }', (3, 2))
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_softmax_axis_error():
    expect_error('layer { name: "L" type: "Softmax" bottom: "x" top: "out" '
                 'softmax_param { axis: 2 } }', {"x": (2, 3)}, "axis 2 out of range")


# -- ArgMax --------------------------------------------------------------------------
def test_argmax_ties_rank_larger_index_first():
    x = np.array([[1.0, 5.0, 2.0, 5.0, 5.0]], np.float32)
    net = run('layer { name: "L" type: "ArgMax" bottom: "x" top: "out" '
              'argmax_param { top_k: 4 out_max_val: true } }', x=x)
    assert net.blobs["out"].shape == (1, 2, 4)
    np.testing.assert_array_equal(net.blobs["out"].data, [[[4, 3, 1, 2], [5, 5, 5, 2]]])


def test_argmax_without_axis_flattens_items_and_pads_shape():
    x = randn(2, 3, 2, 2)
    net = run('layer { name: "L" type: "ArgMax" bottom: "x" top: "out" '
              'argmax_param { top_k: 3 } }', x=x)
    assert net.blobs["out"].shape == (2, 1, 3, 1)
    expected = np.argsort(-x.reshape(2, -1), axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(net.blobs["out"].data.reshape(2, 3), expected)


def test_argmax_indices_along_axis():
    x = randn(2, 5, 3)
    net = run('layer { name: "L" type: "ArgMax" bottom: "x" top: "out" '
              'argmax_param { axis: -2 top_k: 2 } }', x=x)
    assert net.blobs["out"].shape == (2, 2, 3)
    expected = np.argsort(-x, axis=1, kind="stable")[:, :2]
    np.testing.assert_array_equal(net.blobs["out"].data, expected)


def test_argmax_sends_no_gradient():
    layer = make_layer('name: "L" type: "ArgMax" bottom: "x" top: "out" '
                       'argmax_param { out_max_val: true axis: 1 }', (2, 3))
    out = layer(torch.randn(2, 3, requires_grad=True))
    assert not out.requires_grad and not layer.allow_force_backward(0)


@pytest.mark.parametrize("param, match", [
    ("top_k: 0", "at least 1"),
    ("top_k: 7", "top_k 7 exceeds the 6 values"),
    ("axis: 1 top_k: 4", "top_k 4 exceeds axis 1"),
    ("axis: 3", "axis 3 out of range"),
])
def test_argmax_errors(param, match):
    expect_error(f'layer {{ name: "L" type: "ArgMax" bottom: "x" top: "out" '
                 f'argmax_param {{ {param} }} }}', {"x": (2, 3, 2)}, match)


# -- Accuracy ------------------------------------------------------------------------
def numpy_accuracy(scores, labels, top_k, ignore=None):
    """Caffe's rule on (N, C) scores: correct when fewer than top_k other classes
    score at least as high as the true class."""
    hits, totals = np.zeros(scores.shape[1]), np.zeros(scores.shape[1])
    for row, label in zip(scores, labels.astype(int)):
        if label == ignore:
            continue
        totals[label] += 1
        hits[label] += (row >= row[label]).sum() - 1 < top_k
    per_class = np.divide(hits, totals, out=np.zeros_like(hits), where=totals > 0)
    return hits.sum() / max(totals.sum(), 1), per_class


def test_accuracy_tie_counts_against_the_true_class():
    scores = np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 0.0], [0.0, 1.0, 0.5]], np.float32)
    labels = np.array([1, 0, 1], np.float32)
    net = run('layer { name: "L" type: "Accuracy" bottom: "x" bottom: "label" top: "acc" }',
              x=scores, label=labels)
    np.testing.assert_allclose(net.blobs["acc"].data, 1 / 3, rtol=1e-6)
    net = run('layer { name: "L" type: "Accuracy" bottom: "x" bottom: "label" top: "acc" '
              'accuracy_param { top_k: 2 } }', x=scores, label=labels)
    np.testing.assert_allclose(net.blobs["acc"].data, 1.0)


def test_accuracy_spatial_axis_with_per_class():
    scores, labels = randn(2, 4, 3, 2), RNG.integers(0, 4, (2, 3, 2)).astype(np.float32)
    net = run('layer { name: "L" type: "Accuracy" bottom: "x" bottom: "label" top: "acc" '
              'top: "per" accuracy_param { top_k: 2 ignore_label: 3 } }',
              x=scores, label=labels)
    flat_scores = scores.transpose(0, 2, 3, 1).reshape(-1, 4)
    accuracy, per_class = numpy_accuracy(flat_scores, labels.reshape(-1), 2, ignore=3)
    assert net.blobs["acc"].shape == () and net.blobs["per"].shape == (4,)
    np.testing.assert_allclose(net.blobs["acc"].data, accuracy, rtol=1e-6)
    np.testing.assert_allclose(net.blobs["per"].data, per_class, rtol=1e-6)


def test_accuracy_truncates_labels_and_handles_all_ignored():
    scores = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
    net = run('layer { name: "L" type: "Accuracy" bottom: "x" bottom: "label" top: "acc" }',
              x=scores, label=np.array([1.7, 0.2], np.float32))
    np.testing.assert_allclose(net.blobs["acc"].data, 1.0)
    net = run('layer { name: "L" type: "Accuracy" bottom: "x" bottom: "label" top: "acc" '
              'top: "per" accuracy_param { ignore_label: 0 } }',
              x=scores, label=np.zeros(2, np.float32))
    assert net.blobs["acc"].data == 0 and not net.blobs["per"].data.any()


def test_accuracy_sends_no_gradient():
    layer = make_layer('name: "L" type: "Accuracy" bottom: "x" bottom: "label" top: "acc"',
                       (2, 3), (2,))
    out = layer(torch.randn(2, 3, requires_grad=True), torch.tensor([0.0, 2.0]))
    assert not out.requires_grad
    assert not layer.allow_force_backward(0) and not layer.allow_force_backward(1)


@pytest.mark.parametrize("param, shapes, match", [
    ("top_k: 4", {"x": (2, 3), "label": (2,)}, "top_k 4 exceeds"),
    ("", {"x": (2, 3), "label": (3,)}, "3 labels for 2 predictions"),
    ("axis: 2", {"x": (2, 3), "label": (2,)}, "axis 2 out of range"),
])
def test_accuracy_shape_errors(param, shapes, match):
    expect_error('layer { name: "L" type: "Accuracy" bottom: "x" bottom: "label" top: "acc" '
                 f'accuracy_param {{ {param} }} }}', shapes, match)


def test_accuracy_label_out_of_range():
    net = build('layer { name: "L" type: "Accuracy" bottom: "x" bottom: "label" top: "acc" }',
                {"x": (2, 3), "label": (2,)})
    net.blobs["label"].data[...] = [0, 3]
    with pytest.raises(protonet.NetError, match="layer 'L'.*label 3 is not a class"):
        net.forward()


def test_accuracy_too_many_tops():
    expect_error('layer { name: "L" type: "Accuracy" bottom: "x" bottom: "label" top: "a" '
                 'top: "b" top: "c" }', {"x": (2, 3), "label": (2,)}, "at most 2 top")
