"""SSD's PriorBox, DetectionOutput, Permute and Normalize (weiliu89/caffe `ssd`).

Forward against OpenCV 4 dnn's outputs (tests/data/forks/detection_*, made by
tools/make_detection_fixtures.py); what OpenCV does differently from the fork (it
ignores img_size/img_h/img_w and nms_param.eta, lacks CORNER_SIZE, clips priors by
default, sorts detections by score, writes no -1 row when nothing is found) is checked
against plain-loop references written from the fork's C++. Backward of Permute and
Normalize: gradcheck in float64 where the fork's gradient is the true one, the fork's
Backward_cpu formulas otherwise.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import protonet
from protonet.layers.detection import _Normalize

from layer_helpers import build, expect_error, make_layer, run

DATA = Path(__file__).resolve().parents[1] / "data" / "forks"
RNG = np.random.default_rng(1414)
RTOL, ATOL = 1e-4, 1e-5


def fixture(name: str):
    return np.load(DATA / f"{name}.npz")


def fixture_net(name: str, weights: bool = False) -> protonet.Net:
    if weights:
        return protonet.Net(str(DATA / f"{name}.prototxt"), str(DATA / f"{name}.caffemodel"),
                            protonet.TEST)
    return protonet.Net(str(DATA / f"{name}.prototxt"), protonet.TEST)


def canonical(rows: np.ndarray) -> np.ndarray:
    """Detections in one order whatever the writer's: image, label, score descending."""
    return rows[np.lexsort((-rows[:, 2], rows[:, 1], rows[:, 0]))]


# -- PriorBox ---------------------------------------------------------------------------------
def test_prior_box_matches_opencv():
    data = fixture("detection_priorbox")
    names = [k[4:] for k in data.files if k.startswith("out_")]
    out = fixture_net("detection_priorbox").forward(blobs=names)
    for name in names:
        np.testing.assert_allclose(out[name], data[f"out_{name}"], rtol=RTOL, atol=ATOL,
                                   err_msg=name)


def prior_boxes(param: str, feature=(1, 1, 3, 4), image=(1, 1, 60, 80)) -> np.ndarray:
    net = run(f'layer {{ name: "L" type: "PriorBox" bottom: "f" bottom: "i" top: "p" '
              f'prior_box_param {{ {param} }} }}',
              f=np.zeros(feature, np.float32), i=np.zeros(image, np.float32))
    return net.blobs["p"].data


def loop_priors(h, w, img_h, img_w, step_h, step_w, offset, boxes):
    """The fork's Forward_cpu loops for one list of (width, height) per position."""
    out = []
    for y in range(h):
        for x in range(w):
            cx, cy = (x + offset) * step_w, (y + offset) * step_h
            for bw, bh in boxes:
                out += [(cx - bw / 2) / img_w, (cy - bh / 2) / img_h,
                        (cx + bw / 2) / img_w, (cy + bh / 2) / img_h]
    return np.asarray(out, np.float32)


def test_prior_box_img_size_and_default_variance():
    top = prior_boxes("min_size: 10 img_h: 120 img_w: 90 offset: 0.5")
    expected = loop_priors(3, 4, 120, 90, 40, 22.5, 0.5, [(10, 10)])
    np.testing.assert_allclose(top[0, 0], expected, rtol=RTOL, atol=ATOL)
    assert top.shape == (1, 2, 3 * 4 * 4)
    np.testing.assert_array_equal(top[0, 1], np.float32(0.1))   # the fork's default
    square = prior_boxes("min_size: 10 img_size: 100 step: 7")
    np.testing.assert_allclose(square[0, 0], loop_priors(3, 4, 100, 100, 7, 7, 0.5,
                                                         [(10, 10)]), rtol=RTOL, atol=ATOL)


def test_prior_box_truncates_sizes_and_skips_repeated_ratios():
    # The fork keeps min/max sizes in an int; an aspect ratio given twice (or 1) is one.
    top = prior_boxes("min_size: 10.7 max_size: 20.9 aspect_ratio: 2 aspect_ratio: 2.0000001 "
                      "aspect_ratio: 1 flip: false variance: 0.5")
    s2 = math.sqrt(2)
    boxes = [(10, 10), (math.sqrt(200), math.sqrt(200)), (10 * s2, 10 / s2)]
    np.testing.assert_allclose(top[0, 0], loop_priors(3, 4, 60, 80, 20, 20, 0.5, boxes),
                               rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("param, match", [
    ("max_size: 5", "min_size"),
    ("min_size: 10 max_size: 5", "greater"),
    ("min_size: 10 variance: 0.1 variance: 0.2", "1 or 4 variances"),
    ("min_size: 10 img_size: 10 img_h: 5 img_w: 5", "not both"),
    ("min_size: 10 step: 8 step_h: 4 step_w: 4", "not both"),
])
def test_prior_box_errors(param, match):
    expect_error(f'layer {{ name: "L" type: "PriorBox" bottom: "f" bottom: "i" top: "p" '
                 f'prior_box_param {{ {param} }} }}', {"f": (1, 1, 2, 2), "i": (1, 1, 8, 8)},
                 match)


# -- DetectionOutput --------------------------------------------------------------------------
DETECTION_FIXTURES = ["detection_center_size", "detection_corner", "detection_unshared",
                      "detection_three_classes"]


def detect(name: str):
    data = fixture(name)
    net = fixture_net(name)
    out = net.forward(**{k[3:]: data[k] for k in data.files if k.startswith("in_")})
    return out["detection_out"], data["out_detection_out"], net


@pytest.mark.parametrize("name", DETECTION_FIXTURES)
def test_detection_output_matches_opencv(name):
    ours, theirs, _ = detect(name)
    theirs = theirs[0, 0][theirs[0, 0, :, 2] > 0]      # OpenCV pads with zero rows
    assert ours.shape == (1, 1, len(theirs), 7)
    ours, theirs = canonical(ours[0, 0]), canonical(theirs)
    np.testing.assert_array_equal(ours[:, :2], theirs[:, :2])
    np.testing.assert_allclose(ours[:, 2], theirs[:, 2], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ours[:, 3:], theirs[:, 3:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", DETECTION_FIXTURES)
def test_detection_output_rows_in_caffe_order(name):
    # The fork writes image by image, labels ascending, each label's boxes by score.
    rows = detect(name)[0][0, 0]
    np.testing.assert_array_equal(rows, canonical(rows))


def reference_detections(loc, conf, priors, classes, code, share=True, background=0,
                         threshold=-np.inf, nms=0.45, top_k=-1, eta=1.0, keep_top_k=-1,
                         in_target=False):
    """The fork's DetectionOutput::Forward_cpu as plain loops over one image (float64)."""
    count = priors.shape[-1] // 4
    boxes, variances = priors[0, 0].reshape(count, 4), priors[0, 1].reshape(count, 4)
    loc = loc.reshape(count, -1, 4)
    conf = conf.reshape(count, classes)

    def decode(p, v, l):
        v = np.ones(4) if in_target else v
        if code == "CORNER":
            return p + v * l
        pw, ph = p[2] - p[0], p[3] - p[1]
        if code == "CORNER_SIZE":
            return p + v * l * np.array([pw, ph, pw, ph])
        cx, cy = (p[0] + p[2]) / 2, (p[1] + p[3]) / 2
        x, y = v[0] * l[0] * pw + cx, v[1] * l[1] * ph + cy
        w, h = math.exp(v[2] * l[2]) * pw, math.exp(v[3] * l[3]) * ph
        return np.array([x - w / 2, y - h / 2, x + w / 2, y + h / 2])

    def size(b):
        return 0.0 if b[2] < b[0] or b[3] < b[1] else (b[2] - b[0]) * (b[3] - b[1])

    def iou(a, b):
        w = min(a[2], b[2]) - max(a[0], b[0])
        h = min(a[3], b[3]) - max(a[1], b[1])
        return w * h / (size(a) + size(b) - w * h) if w > 0 and h > 0 else 0.0

    found = []
    for c in range(classes):
        if c == background:
            continue
        decoded = [decode(boxes[p], variances[p], loc[p, 0 if share else c])
                   for p in range(count)]
        order = sorted([p for p in range(count) if conf[p, c] > threshold],
                       key=lambda p: -conf[p, c])
        order = order[:top_k] if top_k > -1 else order
        kept, limit = [], nms
        for p in order:
            keep = all(iou(decoded[p], decoded[k]) <= limit for k in kept)
            if keep:
                kept.append(p)
                if eta < 1 and limit > 0.5:
                    limit *= eta
        found += [(c, conf[p, c], *decoded[p]) for p in kept]
    if keep_top_k > -1 and len(found) > keep_top_k:
        found = sorted(sorted(found, key=lambda f: -f[1])[:keep_top_k], key=lambda f: f[0])
    return np.array([(0, *f) for f in found]).reshape(-1, 7)


def random_detection_inputs(priors_per_cell=4, classes=3, loc_classes=1, sharp=4.0):
    f, i = np.zeros((1, 1, 5, 4), np.float32), np.zeros((1, 1, 50, 40), np.float32)
    count = 5 * 4 * priors_per_cell
    logits = RNG.standard_normal((count, classes)) * sharp
    conf = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    loc = RNG.standard_normal((1, count * loc_classes * 4)).astype(np.float32) * 0.3
    return f, i, loc, conf.reshape(1, -1).astype(np.float32)


def detection_net(param: str, f, i, loc, conf, prior="min_size: 12 max_size: 24 "
                  "aspect_ratio: 2 variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2"):
    net = run(f'layer {{ name: "P" type: "PriorBox" bottom: "f" bottom: "i" top: "priors" '
              f'prior_box_param {{ {prior} }} }}\n'
              f'layer {{ name: "L" type: "DetectionOutput" bottom: "loc" bottom: "conf" '
              f'bottom: "priors" top: "det" detection_output_param {{ {param} }} }}',
              f=f, i=i, loc=loc, conf=conf)
    return net.blobs["det"].data, net.blobs["priors"].data


@pytest.mark.parametrize("code, extra, kw", [
    ("CENTER_SIZE", "nms_param { nms_threshold: 0.8 top_k: 60 eta: 0.8 }",
     dict(nms=0.8, top_k=60, eta=0.8)),
    ("CORNER_SIZE", "nms_param { nms_threshold: 0.3 } keep_top_k: 15",
     dict(nms=0.3, keep_top_k=15)),
    ("CENTER_SIZE", "variance_encoded_in_target: true nms_param { nms_threshold: 0.5 } "
                    "background_label_id: 1", dict(nms=0.5, in_target=True, background=1)),
    ("CORNER", "share_location: false nms_param { nms_threshold: 0.4 top_k: 10 } "
               "background_label_id: -1", dict(nms=0.4, top_k=10, share=False,
                                               background=-1)),
])
def test_detection_output_against_the_forks_loops(code, extra, kw):
    share = kw.get("share", True)
    f, i, loc, conf = random_detection_inputs(loc_classes=1 if share else 3)
    det, priors = detection_net(f"num_classes: 3 code_type: {code} confidence_threshold: 0.05 "
                                f"{extra}", f, i, loc, conf)
    expected = reference_detections(loc.astype(np.float64), conf.astype(np.float64),
                                    priors.astype(np.float64), 3, code, threshold=0.05, **kw)
    assert len(expected) > 5
    np.testing.assert_allclose(det[0, 0], expected, rtol=RTOL, atol=1e-5)


def test_eta_shrinks_the_threshold():
    f, i, loc, conf = random_detection_inputs()
    plain, _ = detection_net("num_classes: 3 code_type: CENTER_SIZE nms_param "
                             "{ nms_threshold: 0.9 }", f, i, loc, conf)
    adaptive, _ = detection_net("num_classes: 3 code_type: CENTER_SIZE nms_param "
                                "{ nms_threshold: 0.9 eta: 0.7 }", f, i, loc, conf)
    assert adaptive.shape[2] < plain.shape[2]


def test_no_detections_gives_a_minus_one_row_per_image():
    f, i, loc, conf = random_detection_inputs()
    batch = {k: np.concatenate([v, v]) for k, v in dict(f=f, i=i, loc=loc, conf=conf).items()}
    det, _ = detection_net("num_classes: 3 confidence_threshold: 1.5", **batch)
    expected = np.full((1, 1, 2, 7), -1, np.float32)
    expected[0, 0, :, 0] = [0, 1]
    np.testing.assert_array_equal(det, expected)


def test_detection_output_shape_checks():
    expect_error('layer { name: "L" type: "DetectionOutput" bottom: "l" bottom: "c" '
                 'bottom: "p" top: "d" detection_output_param { num_classes: 2 } }',
                 {"l": (1, 16), "c": (1, 6), "p": (1, 2, 16)}, "confidences")
    expect_error('layer { name: "L" type: "DetectionOutput" bottom: "l" bottom: "c" '
                 'bottom: "p" top: "d" }', {"l": (1, 16), "c": (1, 8), "p": (1, 2, 16)},
                 "num_classes")


# -- Permute and Normalize --------------------------------------------------------------------
def test_permute_and_normalize_match_opencv():
    data = fixture("detection_permute_normalize")
    names = [k[4:] for k in data.files if k.startswith("out_")]
    out = fixture_net("detection_permute_normalize", weights=True).forward(
        blobs=names, data=data["in_data"])
    for name in names:
        np.testing.assert_allclose(out[name], data[f"out_{name}"], rtol=RTOL, atol=ATOL,
                                   err_msg=name)


def test_permute_fills_in_unlisted_axes_and_passes_gradients_back():
    x = RNG.standard_normal((2, 3, 4, 5))
    net = run('layer { name: "L" type: "Permute" bottom: "x" top: "y" '
              'permute_param { order: 2 order: 0 } }', x=x.astype(np.float32))
    np.testing.assert_array_equal(net.blobs["y"].data,
                                  x.astype(np.float32).transpose(2, 0, 1, 3))
    layer = make_layer('name: "L" type: "Permute" bottom: "x" top: "y" '
                       'permute_param { order: 0 order: 3 order: 1 order: 2 }', (2, 3, 4, 5))
    t = torch.tensor(x, requires_grad=True)
    assert torch.autograd.gradcheck(layer.forward, (t,))
    expect_error('layer { name: "L" type: "Permute" bottom: "x" top: "y" '
                 'permute_param { order: 4 } }', {"x": (1, 2, 3, 4)}, "not an axis")


def fork_normalize_backward(x, scale, top_diff, across, eps):
    """The fork's Backward_cpu in float64 numpy: (bottom diff, scale diff)."""
    n, c = x.shape[:2]
    x3, d3 = x.reshape(n, c, -1), top_diff.reshape(n, c, -1)
    s = scale.reshape(1, -1, 1) if scale.size > 1 else scale.reshape(1, 1, 1)
    if across:
        norm = np.sqrt((x3 ** 2).sum(axis=(1, 2), keepdims=True) + eps)
        a = (x3 * d3).sum(axis=(1, 2), keepdims=True)
        bottom = (d3 - x3 * a / norm / norm) / norm
    else:
        norm = np.sqrt((x3 ** 2).sum(axis=1, keepdims=True) + eps)
        a = (x3 * d3).sum(axis=1, keepdims=True)
        bottom = (d3 - x3 * a / norm ** 2) / norm
    top = x3 / norm * s
    scale_diff = (top * d3).sum() / scale if scale.ndim == 0 else \
        (top * d3).sum(axis=(0, 2)) / scale
    return (bottom * s).reshape(x.shape), scale_diff


@pytest.mark.parametrize("across", [True, False])
@pytest.mark.parametrize("shared", [True, False])
def test_normalize_backward_is_the_forks(across, shared):
    x = RNG.standard_normal((2, 3, 4, 2))
    scale = np.array(1.7) if shared else RNG.uniform(0.5, 3, 3)
    top_diff = RNG.standard_normal(x.shape)
    xt = torch.tensor(x, requires_grad=True)
    st = torch.tensor(scale, requires_grad=True)
    _Normalize.apply(xt, st, across, 1e-10).backward(torch.tensor(top_diff))
    bottom, scale_diff = fork_normalize_backward(x, scale, top_diff, across, 1e-10)
    np.testing.assert_allclose(xt.grad.numpy(), bottom, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(st.grad.numpy(), scale_diff, rtol=1e-10, atol=1e-12)
    if shared:      # one scale: the fork's gradient is the true one
        assert torch.autograd.gradcheck(
            lambda a, b: _Normalize.apply(a, b, across, 1e-10), (xt.detach().requires_grad_(),
                                                                st.detach().requires_grad_()))


def test_normalize_learns_its_scale_through_the_net():
    x = RNG.standard_normal((2, 4, 3, 3)).astype(np.float32)
    net = build('layer { name: "L" type: "Normalize" bottom: "x" top: "y" norm_param { '
                'across_spatial: false channel_shared: false scale_filler { type: "constant" '
                'value: 20 } } }', {"x": x.shape})
    assert net.params["L"][0].data.shape == (4,)
    np.testing.assert_array_equal(net.params["L"][0].data, 20)
    net.blobs["x"].data[...] = x
    net.forward()
    net.blobs["y"].diff[...] = 1
    net.backward()
    _, expected = fork_normalize_backward(x.astype(np.float64), np.full(4, 20.0),
                                          np.ones(x.shape), False, 1e-10)
    np.testing.assert_allclose(net.params["L"][0].diff, expected, rtol=1e-4, atol=1e-4)
    shared = build('layer { name: "L" type: "Normalize" bottom: "x" top: "y" }',
                   {"x": x.shape})
    assert shared.params["L"][0].data.shape == ()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_detection_layers_on_cuda():
    data = fixture("detection_center_size")
    for device in ("cpu", "cuda"):
        net = protonet.Net(str(DATA / "detection_center_size.prototxt"), protonet.TEST,
                           device=device)
        out = net.forward(**{k[3:]: data[k] for k in data.files if k.startswith("in_")})
        if device == "cpu":
            cpu = out["detection_out"]
    np.testing.assert_allclose(out["detection_out"], cpu, rtol=RTOL, atol=1e-5)
