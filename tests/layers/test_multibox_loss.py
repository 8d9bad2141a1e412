"""SSD's MultiBoxLoss (weiliu89/caffe `ssd`): loss and gradients against plain loops
written from the fork's C++ (MatchBBox, MineHardExamples, EncodeBBox, the SmoothL1 /
Euclidean and SoftmaxWithLoss sublayers and MultiBoxLossLayer::Backward_cpu), in
float64; and a tiny SSD that learns to find a box."""
from __future__ import annotations

import math

import numpy as np
import pytest

import protonet

from layer_helpers import build, expect_error

RNG = np.random.default_rng(201)
FLT_MIN = float(np.finfo(np.float32).tiny)


# -- the reference --------------------------------------------------------------------------
def size(b):
    return 0.0 if b[2] < b[0] or b[3] < b[1] else (b[2] - b[0]) * (b[3] - b[1])


def iou(a, b):
    if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
        return 0.0
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h / (size(a) + size(b) - w * h) if w > 0 and h > 0 else 0.0


def match_bbox(gts, priors, per_prediction, threshold, ignore_cross):
    match = [-1] * len(priors)
    best = [0.0] * len(priors)
    overlaps = {}
    for i, prior in enumerate(priors):
        if ignore_cross and any(v < 0 or v > 1 for v in prior):
            match[i] = -2
            continue
        for j, gt in enumerate(gts):
            o = iou(prior, gt)
            if o > 1e-6:
                best[i] = max(best[i], o)
                overlaps.setdefault(i, {})[j] = o
    pool = list(range(len(gts)))
    while pool:
        top, pick = -1.0, None
        for i in sorted(overlaps):
            if match[i] != -1:
                continue
            for j in pool:
                if j in overlaps[i] and overlaps[i][j] > top:
                    top, pick = overlaps[i][j], (i, j)
        if pick is None:
            break
        match[pick[0]], best[pick[0]] = pick[1], top
        pool.remove(pick[1])
    if per_prediction:
        for i in sorted(overlaps):
            if match[i] != -1:
                continue
            top, pick = -1.0, -1
            for j in range(len(gts)):
                if j in overlaps[i] and overlaps[i][j] >= threshold and overlaps[i][j] > top:
                    top, pick = overlaps[i][j], j
            if pick != -1:
                match[i], best[i] = pick, top
    return match, best


def encode(prior, var, box, code, in_target):
    var = [1.0] * 4 if in_target else var
    if code == "CORNER":
        return [(box[k] - prior[k]) / var[k] for k in range(4)]
    pw, ph = prior[2] - prior[0], prior[3] - prior[1]
    if code == "CORNER_SIZE":
        return [(box[k] - prior[k]) / (pw, ph, pw, ph)[k] / var[k] for k in range(4)]
    pcx, pcy = (prior[0] + prior[2]) / 2, (prior[1] + prior[3]) / 2
    bw, bh = box[2] - box[0], box[3] - box[1]
    bcx, bcy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return [(bcx - pcx) / pw / var[0], (bcy - pcy) / ph / var[1],
            math.log(bw / pw) / var[2], math.log(bh / ph) / var[3]]


def softmax(row):
    e = np.exp(row - row.max())
    return e / e.sum()


def reference(loc, conf, priors, gt, classes, per_prediction=True, threshold=0.5,
              mining=True, neg_pos_ratio=3.0, neg_overlap=0.5, code="CENTER_SIZE",
              in_target=False, loss_type="SMOOTH_L1", loc_weight=1.0, normalization="VALID",
              background=0, use_difficult=True, ignore_cross=False, bp_inside=False):
    """The fork's Forward_cpu and Backward_cpu: (loss, loc diff, conf diff)."""
    num, count = loc.shape[0], priors.shape[2] // 4
    boxes, variances = priors[0, 0].reshape(count, 4), priors[0, 1].reshape(count, 4)
    loc = loc.reshape(num, count, 4)
    conf = conf.reshape(num, count, classes)
    truth = {}
    for row in gt.reshape(-1, 8):
        if row[0] == -1 or (not use_difficult and row[7]):
            continue
        truth.setdefault(int(row[0]), []).append(row)
    pairs, negatives = [], []                       # (image, prior, gt row), (image, prior)
    for i in range(num):
        if i not in truth:
            continue
        rows = truth[i]
        match, best = match_bbox([r[3:7] for r in rows], boxes, per_prediction, threshold,
                                 ignore_cross)
        positives = [j for j in range(count) if match[j] > -1]
        pairs += [(i, j, rows[match[j]]) for j in positives]
        if mining:
            losses = []
            for j in range(count):
                label = int(rows[match[j]][1]) if match[j] > -1 else background
                losses.append(-math.log(max(softmax(conf[i, j])[label], FLT_MIN)))
            eligible = [j for j in range(count) if match[j] == -1 and best[j] < neg_overlap]
            wanted = min(int(len(positives) * neg_pos_ratio), len(eligible))
            chosen = sorted(eligible, key=lambda j: -losses[j])[:wanted]
            negatives += [(i, j) for j in sorted(chosen)]
    matches = len(pairs)
    normalizer = max(1.0, {"VALID": matches, "FULL": num * count, "BATCH_SIZE": num,
                           "NONE": 1}[normalization])
    loss = 0.0
    loc_diff = np.zeros_like(loc)
    for i, j, row in pairs:
        target = encode(boxes[j], variances[j], row[3:7], code, in_target)
        pred = list(loc[i, j])
        if bp_inside:
            pred = [target[k] if boxes[j][k] < 0 or boxes[j][k] > 1 else pred[k]
                    for k in range(4)]
        for k in range(4):
            p, t = pred[k], target[k]
            if in_target:
                p, t = p / variances[j][k], t / variances[j][k]
            d = p - t
            if loss_type == "L2":
                loss += loc_weight * 0.5 * d * d / normalizer
                grad = d
            else:
                loss += loc_weight * (0.5 * d * d if abs(d) < 1 else abs(d) - 0.5) / normalizer
                grad = d if abs(d) < 1 else np.sign(d)
            loc_diff[i, j, k] = grad * loc_weight / normalizer
    conf_diff = np.zeros_like(conf)
    if mining:
        rows = [(i, j, int(row[1])) for i, j, row in pairs] + \
            [(i, j, background) for i, j in negatives]
    else:
        labels = np.full((num, count), background)
        for i, j, row in pairs:
            labels[i, j] = int(row[1])
        rows = [(i, j, int(labels[i, j])) for i in range(num) for j in range(count)]
    for i, j, label in rows:
        prob = softmax(conf[i, j])
        loss += -math.log(max(prob[label], FLT_MIN)) / normalizer
        grad = prob.copy()
        grad[label] -= 1
        conf_diff[i, j] = grad / normalizer
    return loss, loc_diff.reshape(num, -1), conf_diff.reshape(num, -1)


# -- inputs ---------------------------------------------------------------------------------
def random_priors(count, spill=False):
    centers = RNG.uniform(0.05 if not spill else -0.05, 0.95 if not spill else 1.05,
                          (count, 2))
    sides = RNG.uniform(0.1, 0.5, (count, 2))
    boxes = np.concatenate([centers - sides / 2, centers + sides / 2], axis=1)
    variances = np.tile([0.1, 0.1, 0.2, 0.2], (count, 1))
    return np.stack([boxes.reshape(-1), variances.reshape(-1)])[None].astype(np.float32)


def random_truth(num, per_image, classes, difficult=False, padding=1):
    rows = []
    for i in range(num):
        for _ in range(per_image):
            c = RNG.uniform(0.2, 0.8, 2)
            s = RNG.uniform(0.15, 0.45, 2)
            rows.append([i, RNG.integers(1, classes), 0, *(c - s / 2), *(c + s / 2),
                         float(difficult and RNG.random() < 0.3)])
    rows += [[-1] * 8] * padding
    return np.asarray(rows, np.float32)[None, None]


def run_loss(param: str, loc, conf, priors, gt):
    net = build(f'layer {{ name: "L" type: "MultiBoxLoss" bottom: "loc" bottom: "conf" '
                f'bottom: "priors" bottom: "gt" top: "loss" '
                f'propagate_down: true propagate_down: true propagate_down: false '
                f'propagate_down: false {param} }}',
                {"loc": loc.shape, "conf": conf.shape, "priors": priors.shape,
                 "gt": gt.shape})
    for name, value in dict(loc=loc, conf=conf, priors=priors, gt=gt).items():
        net.blobs[name].data[...] = value
    net.forward()
    net.backward()
    return (float(net.blobs["loss"].data), net.blobs["loc"].diff.copy(),
            net.blobs["conf"].diff.copy())


CASES = [
    ("", {}),
    ("match_type: BIPARTITE", dict(per_prediction=False)),
    ("mining_type: NONE loc_loss_type: L2 code_type: CORNER", dict(
        mining=False, loss_type="L2", code="CORNER")),
    ("code_type: CORNER_SIZE neg_pos_ratio: 1.5 neg_overlap: 0.3 loc_weight: 2",
     dict(code="CORNER_SIZE", neg_pos_ratio=1.5, neg_overlap=0.3, loc_weight=2.0)),
    ("encode_variance_in_target: true overlap_threshold: 0.3",
     dict(in_target=True, threshold=0.3)),
    ("use_difficult_gt: false ignore_cross_boundary_bbox: true bp_inside: true",
     dict(use_difficult=False, ignore_cross=True, bp_inside=True)),
]
NORMALIZATIONS = ["VALID", "FULL", "BATCH_SIZE", "NONE"]


@pytest.mark.parametrize("extra, kw", CASES)
@pytest.mark.parametrize("normalization", ["VALID", "BATCH_SIZE"])
def test_loss_and_gradients_are_the_forks(extra, kw, normalization):
    num, count, classes = 3, 60, 4
    loc = (RNG.standard_normal((num, count * 4)) * 0.8).astype(np.float32)
    conf = (RNG.standard_normal((num, count * classes)) * 2).astype(np.float32)
    priors = random_priors(count, spill="ignore_cross" in kw)
    gt = random_truth(num - 1, 3, classes, difficult="use_difficult" in kw)  # image 2: none
    code = "" if "code_type" in extra else "code_type: CENTER_SIZE"
    kw = dict({"code": "CENTER_SIZE"}, **kw)
    param = (f"multibox_loss_param {{ num_classes: {classes} {code} {extra} }} "
             f"loss_param {{ normalization: {normalization} }}")
    loss, loc_diff, conf_diff = run_loss(param, loc, conf, priors, gt)
    expected = reference(loc.astype(np.float64), conf.astype(np.float64),
                         priors.astype(np.float64), gt, classes,
                         normalization=normalization, **kw)
    assert loss == pytest.approx(expected[0], rel=1e-4)
    np.testing.assert_allclose(loc_diff, expected[1], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(conf_diff, expected[2], rtol=1e-4, atol=1e-6)
    assert np.count_nonzero(loc_diff) > 0 and np.count_nonzero(conf_diff) > 0


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_normalizers(normalization):
    num, count, classes = 2, 30, 3
    loc = RNG.standard_normal((num, count * 4)).astype(np.float32)
    conf = RNG.standard_normal((num, count * classes)).astype(np.float32)
    priors, gt = random_priors(count), random_truth(num, 2, classes)
    loss, _, _ = run_loss(f"multibox_loss_param {{ num_classes: {classes} }} "
                          f"loss_param {{ normalization: {normalization} }}",
                          loc, conf, priors, gt)
    expected = reference(loc.astype(np.float64), conf.astype(np.float64),
                         priors.astype(np.float64), gt, classes, code="CORNER",
                         normalization=normalization)
    assert loss == pytest.approx(expected[0], rel=1e-4)


def test_no_ground_truth_gives_zero():
    loc = RNG.standard_normal((2, 40)).astype(np.float32)
    conf = RNG.standard_normal((2, 30)).astype(np.float32)
    gt = np.full((1, 1, 1, 8), -1, np.float32)
    loss, loc_diff, conf_diff = run_loss("multibox_loss_param { num_classes: 3 }", loc,
                                         conf, random_priors(10), gt)
    assert loss == 0 and not loc_diff.any() and not conf_diff.any()


@pytest.mark.parametrize("param, match", [
    ("multibox_loss_param { num_classes: 3 share_location: false }", "share_location"),
    ("multibox_loss_param { num_classes: 3 conf_loss_type: LOGISTIC }", "LOGISTIC"),
    ("multibox_loss_param { num_classes: 3 mining_type: HARD_EXAMPLE }", "HARD_EXAMPLE"),
    ("multibox_loss_param { }", "num_classes"),
])
def test_unsupported_settings_are_named(param, match):
    expect_error(f'layer {{ name: "L" type: "MultiBoxLoss" bottom: "l" bottom: "c" '
                 f'bottom: "p" bottom: "g" top: "loss" {param} }}',
                 {"l": (1, 8), "c": (1, 6), "p": (1, 2, 8), "g": (1, 1, 1, 8)}, match)


def test_background_in_the_ground_truth_is_an_error():
    gt = np.array([[[[0, 0, 0, 0.1, 0.1, 0.5, 0.5, 0]]]], np.float32)
    with pytest.raises(protonet.NetError, match="background label"):
        run_loss("multibox_loss_param { num_classes: 3 }",
                 np.zeros((1, 40), np.float32), np.zeros((1, 30), np.float32),
                 random_priors(10), gt)


TINY_TRAIN = """
name: "tiny_ssd_train"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 2 dim: 3 dim: 32 dim: 32 } } }
layer { name: "gt" type: "Input" top: "gt"
        input_param { shape { dim: 1 dim: 1 dim: 2 dim: 8 } } }
layer { name: "feat" type: "Convolution" bottom: "data" top: "feat"
        convolution_param { num_output: 8 kernel_size: 8 stride: 8
                            weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "feat" top: "feat" }
layer { name: "loc" type: "Convolution" bottom: "feat" top: "loc"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1
                            weight_filler { type: "xavier" } } }
layer { name: "loc_perm" type: "Permute" bottom: "loc" top: "loc_perm"
        permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "loc_flat" type: "Flatten" bottom: "loc_perm" top: "loc_flat" }
layer { name: "conf" type: "Convolution" bottom: "feat" top: "conf"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1
                            weight_filler { type: "xavier" } } }
layer { name: "conf_perm" type: "Permute" bottom: "conf" top: "conf_perm"
        permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "conf_flat" type: "Flatten" bottom: "conf_perm" top: "conf_flat" }
layer { name: "priors" type: "PriorBox" bottom: "feat" bottom: "data" top: "priors"
        prior_box_param { min_size: 10 max_size: 20 variance: 0.1 variance: 0.1
                          variance: 0.2 variance: 0.2 } }
layer { name: "mbox_loss" type: "MultiBoxLoss" bottom: "loc_flat" bottom: "conf_flat"
        bottom: "priors" bottom: "gt" top: "mbox_loss"
        propagate_down: true propagate_down: true propagate_down: false
        propagate_down: false
        multibox_loss_param { num_classes: 3 code_type: CENTER_SIZE overlap_threshold: 0.5
                              neg_pos_ratio: 3 neg_overlap: 0.5 } }
"""


def test_a_tiny_ssd_learns_its_boxes(tmp_path):
    """SGD on two images with one box each: the loss falls."""
    protonet.set_random_seed(7)
    net_file = tmp_path / "train.prototxt"
    net_file.write_text(TINY_TRAIN)
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(f'net: "{net_file}"\nbase_lr: 0.01\nmomentum: 0.9\n'
                           'lr_policy: "fixed"\nmax_iter: 30\ndisplay: 0\n'
                           'snapshot_after_train: false\nsolver_mode: CPU\n')
    solver = protonet.get_solver(str(solver_file))
    images = RNG.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    images[0, :, 4:16, 4:16] += 2
    images[1, :, 16:28, 12:24] -= 2
    gt = np.array([[0, 1, 0, 4 / 32, 4 / 32, 16 / 32, 16 / 32, 0],
                   [1, 2, 0, 12 / 32, 16 / 32, 24 / 32, 28 / 32, 0]], np.float32)
    solver.net.blobs["data"].data[...] = images
    solver.net.blobs["gt"].data[...] = gt[None, None]
    losses = []
    for _ in range(30):
        solver.step(1)
        losses.append(float(solver.net.blobs["mbox_loss"].data))
    assert np.mean(losses[-5:]) < 0.2 * np.mean(losses[:5])
