"""Loss layers against independent numpy formulas, beyond what the Caffe fixtures cover.

Covers every normalization mode, ignore_label, the probability top, legacy options,
infogain matrices from a file, loss-weight scaling through a net, Caffe's clamped and
margin gradients, and the error messages (which must name the layer).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import protonet
from protonet.io.binary import write_binary
from protonet.io.text import parse_text
from protonet.io.weights import array_to_blob
from protonet.layers import layer_class
from protonet.proto import caffe_pb2

FLT_MIN = np.finfo(np.float32).tiny
RNG = np.random.default_rng(7)


# -- helpers ---------------------------------------------------------------------------
def make_net(layer: str, inputs: dict[str, tuple[int, ...]], force_backward: bool = True):
    lines = [f"force_backward: {str(force_backward).lower()}"]
    for name, shape in inputs.items():
        dims = " ".join(f"dim: {d}" for d in shape)
        lines.append(f'layer {{ name: "in_{name}" type: "Input" top: "{name}" '
                     f"input_param {{ shape {{ {dims} }} }} }}")
    lines.append(layer)
    return protonet.Net(parse_text("\n".join(lines), caffe_pb2.NetParameter()),
                        protonet.TRAIN)


def run(net, **values):
    """Forward and backward (loss tops seeded with their weights); returns the net."""
    for name, value in values.items():
        net.blobs[name].data[...] = value
    net.forward()
    net.backward()
    return net


def make_layer(text: str, bottom_shapes):
    """A bare layer module, set up for these bottom shapes (for gradcheck)."""
    param = parse_text(text, caffe_pb2.LayerParameter())
    layer = layer_class(param.type)(param, protonet.TRAIN)
    layer.setup(bottom_shapes)
    layer.reshape(bottom_shapes)
    return layer


def close(ours, theirs, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(ours, np.float64), theirs, rtol=rtol, atol=atol)


def labels(shape, classes):
    return RNG.integers(0, classes, size=shape).astype(np.float32)


def softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def normalizer(mode, valid, outer, inner):
    size = {"FULL": outer * inner, "VALID": valid, "BATCH_SIZE": outer, "NONE": 1}[mode]
    return max(1.0, float(size))


def softmax_loss_ref(x, label, mode="VALID", ignore=None, axis=1, weight=1.0):
    """Loss and gradient of SoftmaxWithLoss, positions flattened around the class axis."""
    x = np.asarray(x, np.float64)
    classes = x.shape[axis]
    moved = np.moveaxis(x, axis, -1)
    p = softmax(moved, -1).reshape(-1, classes)
    lab = label.reshape(-1).astype(np.int64)
    valid = lab != ignore if ignore is not None else np.ones(lab.shape, bool)
    safe = np.where(valid, lab, 0)
    picked = p[np.arange(len(lab)), safe]
    norm = normalizer(mode, valid.sum(), int(np.prod(x.shape[:axis])),
                      int(np.prod(x.shape[axis + 1:])))
    loss = -np.log(np.maximum(picked, FLT_MIN))[valid].sum() / norm
    grad = p.copy()
    grad[np.arange(len(lab)), safe] -= 1
    grad *= valid[:, None] * weight / norm
    grad = np.moveaxis(grad.reshape(moved.shape), -1, axis)
    return loss, grad, np.moveaxis(p.reshape(moved.shape), -1, axis)


SOFTMAX_LOSS = ('layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "label" '
                'top: "loss" {extra} }}')


# -- SoftmaxWithLoss -------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["FULL", "VALID", "BATCH_SIZE", "NONE"])
@pytest.mark.parametrize("ignore", [None, 1])
def test_softmax_loss_normalization_and_ignore(mode, ignore):
    x = RNG.normal(size=(2, 3, 2, 2)).astype(np.float32)
    label = labels((2, 1, 2, 2), 3)
    label[0, 0, 0, 0] = 1   # at least one ignored position when ignore == 1
    extra = f"loss_param {{ normalization: {mode}" + \
        ("" if ignore is None else f" ignore_label: {ignore}") + " }"
    net = run(make_net(SOFTMAX_LOSS.format(extra=extra), {"x": x.shape, "label": label.shape}),
              x=x, label=label)
    loss, grad, _ = softmax_loss_ref(x, label, mode, ignore)
    close(net.blobs["loss"].data, loss)
    close(net.blobs["x"].diff, grad)
    assert not net.blobs["label"].diff.any()


@pytest.mark.parametrize("normalize, mode", [("true", "VALID"), ("false", "BATCH_SIZE")])
def test_softmax_loss_legacy_normalize(normalize, mode):
    x = RNG.normal(size=(4, 3, 2)).astype(np.float32)
    label = labels((4, 2), 3)
    label[0, 0] = 2
    extra = f"loss_param {{ normalize: {normalize} ignore_label: 2 }}"
    net = run(make_net(SOFTMAX_LOSS.format(extra=extra), {"x": x.shape, "label": label.shape}),
              x=x, label=label)
    loss, grad, _ = softmax_loss_ref(x, label, mode, ignore=2)
    close(net.blobs["loss"].data, loss)
    close(net.blobs["x"].diff, grad)


def test_softmax_loss_normalization_wins_over_normalize():
    x = RNG.normal(size=(4, 3)).astype(np.float32)
    label = labels((4,), 3)
    extra = "loss_param { normalize: true normalization: NONE }"
    net = run(make_net(SOFTMAX_LOSS.format(extra=extra), {"x": x.shape, "label": label.shape}),
              x=x, label=label)
    close(net.blobs["loss"].data, softmax_loss_ref(x, label, "NONE")[0])


def test_softmax_loss_all_ignored_divides_by_one():
    x = RNG.normal(size=(3, 4)).astype(np.float32)
    label = np.full((3,), 5.0, np.float32)     # outside the classes, but ignored
    extra = "loss_param { ignore_label: 5 }"
    net = run(make_net(SOFTMAX_LOSS.format(extra=extra), {"x": x.shape, "label": label.shape}),
              x=x, label=label)
    assert net.blobs["loss"].data == 0
    assert not net.blobs["x"].diff.any()


def test_softmax_loss_prob_top_and_shapes():
    x = RNG.normal(size=(2, 5, 3)).astype(np.float32)
    label = labels((2, 5), 3)
    layer = ('layer { name: "loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "label" '
             'top: "loss" top: "prob" softmax_param { axis: -1 } loss_weight: 1 '
             'loss_weight: 5 }')
    net = make_net(layer, {"x": x.shape, "label": label.shape})
    assert net.blobs["loss"].shape == () and net.blobs["prob"].shape == x.shape
    run(net, x=x, label=label)
    loss, grad, prob = softmax_loss_ref(x, label, axis=2)
    close(net.blobs["loss"].data, loss)
    close(net.blobs["prob"].data, prob)
    close(net.blobs["x"].diff, grad)     # Caffe ignores the diff of the prob top


def test_softmax_loss_weight_scales_gradient_through_net():
    x = RNG.normal(size=(3, 4)).astype(np.float32)
    label = labels((3,), 4)
    net = run(make_net(SOFTMAX_LOSS.format(extra="loss_weight: 2.5"),
                       {"x": x.shape, "label": label.shape}), x=x, label=label)
    loss, grad, _ = softmax_loss_ref(x, label, weight=2.5)
    close(net.blobs["loss"].data, loss)       # the top holds the unweighted loss
    close(net.blobs["x"].diff, grad)


def test_softmax_loss_gradcheck():
    layer = make_layer('name: "l" type: "SoftmaxWithLoss" bottom: "x" bottom: "y" top: "l" '
                       'loss_param { ignore_label: 0 normalization: FULL }',
                       [(2, 3, 2), (2, 2)])
    x = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[0.0, 1.0], [2.0, 1.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: layer(s, y), (x,))


# -- InfogainLoss ----------------------------------------------------------------------
def infogain_ref(x, label, H, mode="VALID", ignore=None, axis=1):
    x = np.asarray(x, np.float64)
    classes = x.shape[axis]
    moved = np.moveaxis(x, axis, -1)
    p = softmax(moved, -1).reshape(-1, classes)
    lab = label.reshape(-1).astype(np.int64)
    valid = lab != ignore if ignore is not None else np.ones(lab.shape, bool)
    rows = H[np.where(valid, lab, 0)]
    norm = normalizer(mode, valid.sum(), int(np.prod(x.shape[:axis])),
                      int(np.prod(x.shape[axis + 1:])))
    loss = -(rows * np.log(np.maximum(p, 1e-20))).sum(1)[valid].sum() / norm
    grad = (p * rows.sum(1, keepdims=True) - rows) * valid[:, None] / norm
    return loss, np.moveaxis(grad.reshape(moved.shape), -1, axis)


def write_infogain(path, H):
    write_binary(str(path), array_to_blob(H.astype(np.float32).reshape(1, 1, *H.shape)))
    return str(path)


@pytest.mark.parametrize("mode", ["FULL", "VALID", "BATCH_SIZE", "NONE"])
def test_infogain_from_file(tmp_path, mode):
    H = RNG.uniform(size=(3, 3))
    source = write_infogain(tmp_path / "H.binaryproto", H)
    x = RNG.normal(size=(2, 4, 3)).astype(np.float32)
    label = labels((2, 4), 3)
    label[0, 0] = 1
    layer = ('layer { name: "loss" type: "InfogainLoss" bottom: "x" bottom: "label" '
             f'top: "loss" top: "prob" infogain_loss_param {{ source: "{source}" axis: 2 }} '
             f'loss_param {{ ignore_label: 1 normalization: {mode} }} }}')
    net = make_net(layer, {"x": x.shape, "label": label.shape})
    assert net.blobs["prob"].shape == x.shape
    run(net, x=x, label=label)
    loss, grad = infogain_ref(x, label, H, mode, ignore=1, axis=2)
    close(net.blobs["loss"].data, loss)
    close(net.blobs["x"].diff, grad)
    close(net.blobs["prob"].data, softmax(x.astype(np.float64), 2))


def test_infogain_matrix_bottom_gets_no_gradient():
    H = RNG.uniform(size=(1, 1, 4, 4)).astype(np.float32)
    x = RNG.normal(size=(5, 4)).astype(np.float32)
    label = labels((5,), 4)
    layer = ('layer { name: "loss" type: "InfogainLoss" bottom: "x" bottom: "label" '
             'bottom: "H" top: "loss" loss_weight: 3 }')
    net = run(make_net(layer, {"x": x.shape, "label": label.shape, "H": H.shape}),
              x=x, label=label, H=H)
    loss, grad = infogain_ref(x, label, H.reshape(4, 4).astype(np.float64))
    close(net.blobs["loss"].data, loss)
    close(net.blobs["x"].diff, 3 * grad)
    assert not net.blobs["H"].diff.any() and not net.blobs["label"].diff.any()


def test_infogain_gradcheck():
    H = torch.rand(3, 3, dtype=torch.float64)
    layer = make_layer('name: "l" type: "InfogainLoss" bottom: "x" bottom: "y" bottom: "H" '
                       'top: "l"', [(4, 3), (4,), (3, 3)])
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0.0, 2.0, 1.0, 2.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: layer(s, y, H), (x,))


@pytest.mark.parametrize("setting, message", [
    ("", "infogain_loss_param.source"),
    ('infogain_loss_param { source: "/nonexistent/H.binaryproto" }', "file not found"),
    ('infogain_loss_param { source: "BAD" }', "9 entries; 4 classes need 4x4"),
    ('infogain_loss_param { source: "BAD" } loss_param { normalize: true }', "normalize"),
])
def test_infogain_errors(tmp_path, setting, message):
    setting = setting.replace("BAD", write_infogain(tmp_path / "H3.binaryproto", np.eye(3)))
    layer = ('layer { name: "gain" type: "InfogainLoss" bottom: "x" bottom: "label" '
             f"top: \"loss\" {setting} }}")
    with pytest.raises(protonet.NetError, match=message) as info:
        make_net(layer, {"x": (2, 4), "label": (2,)})
    assert "layer 'gain' (InfogainLoss)" in str(info.value)


# -- EuclideanLoss ---------------------------------------------------------------------
def test_euclidean_loss_counts_per_item_and_both_gradients():
    a = RNG.normal(size=(4, 6)).astype(np.float32)
    b = RNG.normal(size=(4, 2, 3)).astype(np.float32)
    layer = ('layer { name: "loss" type: "EuclideanLoss" bottom: "a" bottom: "b" '
             'top: "loss" loss_weight: 0.5 }')
    net = run(make_net(layer, {"a": a.shape, "b": b.shape}), a=a, b=b)
    diff = a.astype(np.float64) - b.reshape(4, 6)
    close(net.blobs["loss"].data, (diff ** 2).sum() / 4 / 2)
    close(net.blobs["a"].diff, 0.5 * diff / 4)
    close(net.blobs["b"].diff, -0.5 * diff.reshape(b.shape) / 4)


def test_euclidean_gradcheck():
    layer = make_layer('name: "l" type: "EuclideanLoss" bottom: "a" bottom: "b" top: "l"',
                       [(3, 2), (3, 2)])
    a, b = (torch.randn(3, 2, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(layer, (a, b))


# -- SigmoidCrossEntropyLoss -----------------------------------------------------------
def sigmoid_xent_ref(x, t, mode, ignore=None):
    x, t = np.asarray(x, np.float64), np.asarray(t, np.float64)
    valid = t.astype(np.int64) != ignore if ignore is not None else np.ones(x.shape, bool)
    per_item = -(x * (t - (x >= 0)) - np.log1p(np.exp(x - 2 * x * (x >= 0))))
    norm = normalizer(mode, valid.sum(), x.shape[0], x[0].size)
    grad = (1 / (1 + np.exp(-x)) - t) * valid / norm
    return per_item[valid].sum() / norm, grad


@pytest.mark.parametrize("loss_param, mode", [
    ("", "BATCH_SIZE"), ("normalization: FULL", "FULL"), ("normalization: VALID", "VALID"),
    ("normalization: NONE", "NONE"), ("normalize: true", "VALID"),
    ("normalize: false", "BATCH_SIZE")])
def test_sigmoid_cross_entropy_normalization_and_ignore(loss_param, mode):
    x = (RNG.normal(size=(3, 2, 2)) * 3).astype(np.float32)
    x[0, 0, 0] = 0.0                           # gradient at 0 is sigmoid(0) - t
    t = RNG.uniform(size=x.shape).astype(np.float32)
    t[1, 1] = -1.0
    layer = ('layer { name: "loss" type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "t" '
             f'top: "loss" loss_param {{ ignore_label: -1 {loss_param} }} }}')
    net = run(make_net(layer, {"x": x.shape, "t": (3, 4)}), x=x, t=t.reshape(3, 4))
    loss, grad = sigmoid_xent_ref(x, t, mode, ignore=-1)
    close(net.blobs["loss"].data, loss)
    close(net.blobs["x"].diff, grad)
    assert not net.blobs["t"].diff.any()


def test_sigmoid_cross_entropy_gradcheck():
    layer = make_layer('name: "l" type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "t" '
                       'top: "l"', [(3, 4), (3, 4)])
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.rand(3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: layer(s, t), (x,))


# -- HingeLoss -------------------------------------------------------------------------
def hinge_ref(x, label, norm):
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    sign = np.ones_like(x)
    sign[np.arange(len(x)), label.astype(np.int64)] = -1
    margin = np.maximum(0, 1 + sign * x)
    if norm == "L1":
        return margin.sum() / len(x), sign * (margin > 0) / len(x)
    return (margin ** 2).sum() / len(x), 2 * sign * margin / len(x)


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge_loss_with_kinks(norm):
    x = RNG.normal(size=(4, 3, 1, 1)).astype(np.float32)
    label = np.array([0, 2, 1, 1], np.float32)
    x[0, 0] = 1.0    # label score exactly at the margin
    x[1, 0] = -1.0   # other score exactly at the margin
    layer = ('layer { name: "loss" type: "HingeLoss" bottom: "x" bottom: "label" top: "loss" '
             f"hinge_loss_param {{ norm: {norm} }} loss_weight: 2 }}")
    net = run(make_net(layer, {"x": x.shape, "label": (4, 1)}), x=x, label=label[:, None])
    loss, grad = hinge_ref(x, label, norm)
    close(net.blobs["loss"].data, loss)
    close(net.blobs["x"].diff, 2 * grad.reshape(x.shape))
    assert net.blobs["x"].diff[0, 0] == 0 and net.blobs["x"].diff[1, 0] == 0


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge_gradcheck(norm):
    layer = make_layer(f'name: "l" type: "HingeLoss" bottom: "x" bottom: "y" top: "l" '
                       f"hinge_loss_param {{ norm: {norm} }}", [(3, 4), (3,)])
    x = torch.tensor([[0.3, -2.0, 0.5, 1.7], [-0.4, 0.2, 3.0, 0.1], [0.6, -0.3, -1.5, 0.8]],
                     dtype=torch.float64, requires_grad=True)   # no score near a kink
    y = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: layer(s, y), (x,))


# -- MultinomialLogisticLoss -----------------------------------------------------------
def test_multinomial_logistic_clamps_probability_and_gradient():
    p = RNG.uniform(0.1, 1, size=(3, 4)).astype(np.float32)
    label = np.array([1, 3, 0], np.float32)
    p[1, 3] = 0.0
    layer = ('layer { name: "loss" type: "MultinomialLogisticLoss" bottom: "p" '
             'bottom: "label" top: "loss" loss_weight: 2 }')
    net = run(make_net(layer, {"p": p.shape, "label": (3, 1, 1, 1)}),
              p=p, label=label.reshape(3, 1, 1, 1))
    picked = np.maximum(p[np.arange(3), label.astype(int)].astype(np.float64), 1e-20)
    close(net.blobs["loss"].data, -np.log(picked).sum() / 3)
    grad = np.zeros((3, 4))
    grad[np.arange(3), label.astype(int)] = -2 / 3 / picked
    close(net.blobs["p"].diff, grad)
    assert np.isfinite(net.blobs["p"].diff).all()


def test_multinomial_logistic_gradcheck():
    layer = make_layer('name: "l" type: "MultinomialLogisticLoss" bottom: "p" bottom: "y" '
                       'top: "l"', [(3, 4), (3,)])
    p = torch.rand(3, 4, dtype=torch.float64).add(0.1).requires_grad_()
    y = torch.tensor([3.0, 0.0, 2.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: layer(s, y), (p,))


# -- ContrastiveLoss -------------------------------------------------------------------
def contrastive_ref(a, b, sim, margin, legacy):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = a - b
    dist_sq = (diff ** 2).sum(1)
    dist = np.sqrt(dist_sq)
    n = len(a)
    if legacy:
        apart = np.maximum(margin - dist_sq, 0)
        coef = np.where(margin - dist_sq > 0, -1.0, 0.0)
    else:
        apart = np.maximum(margin - dist, 0) ** 2
        coef = np.where(margin - dist > 0, -(margin - dist) / (dist + 1e-4), 0.0)
    similar = sim.astype(np.int64) != 0
    loss = np.where(similar, dist_sq, apart).sum() / n / 2
    grad = np.where(similar, 1.0, coef)[:, None] * diff / n
    return loss, grad


@pytest.mark.parametrize("legacy", [False, True])
def test_contrastive_loss(legacy):
    a = RNG.normal(size=(6, 3, 1, 1)).astype(np.float32) * 0.5
    b = RNG.normal(size=(6, 3, 1, 1)).astype(np.float32) * 0.5
    sim = np.array([1, 0, 0, 1, 0, 0.5], np.float32)   # 0.5 truncates to dissimilar
    layer = ('layer { name: "loss" type: "ContrastiveLoss" bottom: "a" bottom: "b" '
             'bottom: "sim" top: "loss" contrastive_loss_param { margin: 2 '
             f'legacy_version: {str(legacy).lower()} }} loss_weight: 3 }}')
    net = run(make_net(layer, {"a": a.shape, "b": b.shape, "sim": (6, 1, 1, 1)}),
              a=a, b=b, sim=sim.reshape(6, 1, 1, 1))
    loss, grad = contrastive_ref(a.reshape(6, 3), b.reshape(6, 3), sim, 2.0, legacy)
    close(net.blobs["loss"].data, loss)
    close(net.blobs["a"].diff, 3 * grad.reshape(a.shape))
    close(net.blobs["b"].diff, -3 * grad.reshape(b.shape))
    assert not net.blobs["sim"].diff.any()


def test_contrastive_legacy_gradcheck():
    layer = make_layer('name: "l" type: "ContrastiveLoss" bottom: "a" bottom: "b" '
                       'bottom: "s" top: "l" contrastive_loss_param { legacy_version: true '
                       "margin: 4 }", [(4, 2), (4, 2), (4,)])
    a = torch.tensor([[0.1, 0.2], [1.0, -0.5], [0.3, 0.3], [2.0, 2.0]], dtype=torch.float64,
                     requires_grad=True)
    b = torch.zeros(4, 2, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, y: layer(x, y, s), (a, b))


# -- errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("layer, inputs, message", [
    (SOFTMAX_LOSS.format(extra=""), {"x": (2, 3, 4), "label": (2, 3)},
     "has 6 labels for 8 predictions"),
    (SOFTMAX_LOSS.format(extra=""), {"x": (2, 3), "label": (3,)}, "same first dimension"),
    (SOFTMAX_LOSS.format(extra="softmax_param { axis: 3 }"), {"x": (2, 3), "label": (2,)},
     "axis 3 out of range"),
    (SOFTMAX_LOSS.format(extra="propagate_down: true propagate_down: true"),
     {"x": (2, 3), "label": (2,)}, "cannot back-propagate to bottom 1"),
    ('layer { name: "loss" type: "EuclideanLoss" bottom: "x" bottom: "label" }',
     {"x": (2, 3), "label": (2, 4)}, r"differ in size per item \(3 vs 4\)"),
    ('layer { name: "loss" type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "label" }',
     {"x": (2, 3), "label": (2, 2)}, "has 4 targets for 6 scores"),
    ('layer { name: "loss" type: "HingeLoss" bottom: "x" bottom: "label" }',
     {"x": (2, 3), "label": (2, 2)}, "one label per item"),
    ('layer { name: "loss" type: "MultinomialLogisticLoss" bottom: "x" bottom: "label" }',
     {"x": (2, 3), "label": (2, 3)}, r"label must be shaped \(N,\)"),
    ('layer { name: "loss" type: "ContrastiveLoss" bottom: "x" bottom: "label" bottom: "s" }',
     {"x": (2, 3), "label": (2, 4), "s": (2,)}, "with the same C"),
    ('layer { name: "loss" type: "ContrastiveLoss" bottom: "x" bottom: "label" bottom: "s" }',
     {"x": (2, 3), "label": (2, 3), "s": (3,)}, "one similarity label per pair"),
    ('layer { name: "loss" type: "ContrastiveLoss" bottom: "x" bottom: "label" bottom: "s" }',
     {"x": (2, 3, 1, 1, 1), "label": (2, 3), "s": (2,)}, "more than 4 axes"),
    ('layer { name: "loss" type: "HingeLoss" bottom: "x" }', {"x": (2, 3)},
     "exactly 2 bottom"),
])
def test_setup_errors_name_the_layer(layer, inputs, message):
    with pytest.raises(protonet.NetError, match=message) as info:
        make_net(layer, inputs)
    assert "layer 'loss'" in str(info.value)


@pytest.mark.parametrize("layer_type", ["SoftmaxWithLoss", "HingeLoss",
                                        "MultinomialLogisticLoss"])
def test_label_out_of_range_names_the_layer(layer_type):
    layer = f'layer {{ name: "loss" type: "{layer_type}" bottom: "x" bottom: "label" }}'
    net = make_net(layer, {"x": (2, 3), "label": (2,)})
    net.blobs["x"].data[...] = 0.5
    net.blobs["label"].data[...] = [0, 3]
    with pytest.raises(protonet.NetError, match=r"label 3 is outside \[0, 3\)") as info:
        net.forward()
    assert f"layer 'loss' ({layer_type})" in str(info.value)


def test_contrastive_accepts_propagate_down_on_similarity():
    layer = ('layer { name: "loss" type: "ContrastiveLoss" bottom: "a" bottom: "b" '
             'bottom: "s" propagate_down: true propagate_down: true propagate_down: true }')
    net = run(make_net(layer, {"a": (2, 2), "b": (2, 2), "s": (2,)}),
              a=[[0, 1], [1, 0]], b=[[1, 1], [0, 0]], s=[1, 0])
    assert not net.blobs["s"].diff.any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_losses_on_cuda():
    x = RNG.normal(size=(2, 3, 2)).astype(np.float32)
    label = labels((2, 2), 3)
    layer = ('layer { name: "loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "label" '
             'top: "loss" top: "prob" loss_param { ignore_label: 0 } }')
    text = ('force_backward: true\n'
            'layer { name: "in_x" type: "Input" top: "x" input_param { shape { dim: 2 '
            'dim: 3 dim: 2 } } }\n'
            'layer { name: "in_l" type: "Input" top: "label" input_param { shape { dim: 2 '
            'dim: 2 } } }\n' + layer)
    net = protonet.Net(parse_text(text, caffe_pb2.NetParameter()), protonet.TRAIN,
                       device="cuda")
    net.blobs["x"].data = x
    net.blobs["label"].data = label
    net.forward()
    net.backward()
    loss, grad, _ = softmax_loss_ref(x, label, ignore=0)
    close(net.blobs["loss"].data, loss)
    close(net.blobs["x"].diff, grad)
