"""`protonet segment` and protonet.segment, end to end on tiny FCN-style nets built here:
score maps to label PNGs and colour overlays, per-class fractions as JSON."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

import protonet
from protonet import cli
from protonet.segment import voc_palette

# 1x1 convolution whose class c (< 3) scores channel c; class 3 scores a constant 60:
# the label of a pixel is its brightest channel, or 3 where all are below 60. Average
# pooling halves the map, so segment has to resize the scores back to the image.
CHANNELS = """
name: "channels"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 1 dim: 3 dim: 8 dim: 12 } } }
layer { name: "score" type: "Convolution" bottom: "data" top: "score"
        convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "pool" type: "Pooling" bottom: "score" top: "pool"
        pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
"""

RANDOM_FCN = """
name: "fcn"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 1 dim: 3 dim: 12 dim: 12 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 6 kernel_size: 3 stride: 2 pad: 1
                            weight_filler { type: "gaussian" std: 0.5 }
                            bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "score" type: "Convolution" bottom: "conv1" top: "score"
        convolution_param { num_output: 5 kernel_size: 1
                            weight_filler { type: "gaussian" std: 1 } } }
layer { name: "up" type: "Interp" bottom: "score" top: "up" interp_param { zoom_factor: 2 } }
"""


def quadrant_image(path):
    """16x24 BGR in 8-pixel columns: blue; green over red; black."""
    image = np.zeros((16, 24, 3), np.uint8)
    image[:, :8] = (255, 0, 0)
    image[:8, 8:16] = (0, 255, 0)
    image[8:, 8:16] = (0, 0, 255)
    cv2.imwrite(str(path), image)
    return image


def channels_model(tmp_path):
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(CHANNELS)
    net = protonet.Net(str(deploy), protonet.TEST)
    weight = np.zeros((4, 3, 1, 1), np.float32)
    weight[[0, 1, 2], [0, 1, 2]] = 1
    net.params["score"][0].data[...] = weight
    net.params["score"][1].data[...] = [0, 0, 0, 60]
    weights = tmp_path / "w.caffemodel"
    net.save(str(weights))
    return str(deploy), str(weights)


def test_voc_palette():
    palette = voc_palette()
    assert palette.shape == (256, 3)
    assert palette[0].tolist() == [0, 0, 0]
    assert palette[1].tolist() == [128, 0, 0]
    assert palette[2].tolist() == [0, 128, 0]
    assert palette[3].tolist() == [128, 128, 0]
    assert palette[4].tolist() == [0, 0, 128]
    assert palette[15].tolist() == [192, 128, 128]
    assert palette[255].tolist() == [224, 224, 192]
    assert len({tuple(c) for c in palette}) == 256


def test_segment_writes_labels_overlay_and_json(tmp_path, capsys):
    deploy, weights = channels_model(tmp_path)
    image = quadrant_image(tmp_path / "quad.png")
    out = tmp_path / "out"
    assert cli.main(["segment", "--model", deploy, "--weights", weights,
                     str(tmp_path / "quad.png"), "--out", str(out), "--alpha", "0.25",
                     "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    labels = cv2.imread(str(out / "quad_labels.png"), cv2.IMREAD_UNCHANGED)
    assert labels.shape == (16, 24) and labels.dtype == np.uint8
    # interiors of the regions, away from the bands the resize blends
    assert (labels[:, :6] == 0).all()
    assert (labels[:6, 10:14] == 1).all()
    assert (labels[10:, 10:14] == 2).all()
    assert (labels[:, 18:] == 3).all()
    overlay = cv2.imread(str(out / "quad_overlay.png"))
    colour = voc_palette()[labels][..., ::-1].astype(np.float32)
    expected = np.rint(0.75 * image.astype(np.float32) + 0.25 * colour)
    np.testing.assert_array_equal(overlay, expected.astype(np.uint8))
    [entry] = report
    assert entry["height"] == 16 and entry["width"] == 24
    assert entry["overlay"] == str(out / "quad_overlay.png")
    counts = np.bincount(labels.reshape(-1), minlength=4) / labels.size
    fractions = {c["class"]: c["fraction"] for c in entry["classes"]}
    assert fractions == {c: pytest.approx(counts[c], abs=1e-6) for c in range(4)}


def test_random_fcn_labels_are_the_argmax_of_resized_scores(tmp_path, capsys):
    deploy = tmp_path / "fcn.prototxt"
    deploy.write_text(RANDOM_FCN)
    protonet.set_random_seed(3)
    net = protonet.Net(str(deploy), protonet.TEST)
    weights = tmp_path / "fcn.caffemodel"
    net.save(str(weights))
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (18, 15, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "small.png"), image)
    assert cli.main(["segment", "--model", str(deploy), "--weights", str(weights),
                     str(tmp_path / "small.png"), "--out", str(tmp_path),
                     "--mean-value", "100,110,120", "--scale", "0.02"]) == 0
    printed = capsys.readouterr().out
    assert "small_overlay.png" in printed and "class" in printed
    # Independently: preprocess with OpenCV/numpy, run the net, resize each class's
    # scores bilinearly (OpenCV's half-pixel rule) to the image and take the argmax.
    resized = cv2.resize(image, (12, 12), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    x = ((resized - np.array([100, 110, 120], np.float32)) * np.float32(0.02))
    net.blobs["data"].data[...] = x.transpose(2, 0, 1)[None]
    net.forward()
    scores = net.blobs["up"].data[0]
    assert scores.shape == (5, 11, 11)        # Interp: 6 + 5 * (2 - 1)
    up = np.stack([cv2.resize(s, (15, 18), interpolation=cv2.INTER_LINEAR) for s in scores])
    expected = up.argmax(axis=0)
    labels = cv2.imread(str(tmp_path / "small_labels.png"), cv2.IMREAD_UNCHANGED)
    assert labels.shape == (18, 15)
    assert (labels == expected).mean() > 0.99
    assert len(np.unique(labels)) > 1


def test_segment_errors(tmp_path, capsys):
    deploy, weights = channels_model(tmp_path)
    assert cli.main(["segment", "--model", deploy, "--weights", weights,
                     str(tmp_path / "missing.png")]) == 1
    assert "missing.png: cannot read" in capsys.readouterr().err
    assert cli.main(["segment", "--model", deploy, "--weights", weights, "x.png",
                     "--alpha", "2"]) == 1
    assert "--alpha must be between 0 and 1" in capsys.readouterr().err


def test_segment_command_module_imports_nothing_heavy_at_top_level():
    # the protonet package itself loads torch; the command module adds nothing at import
    import ast
    import protonet.commands.segment as command
    tree = ast.parse(open(command.__file__).read())
    modules = {alias.name for node in tree.body if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module or "." for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert modules == {"__future__", "json", "pathlib"}


def test_image_size_reshapes_the_net(tmp_path, capsys):
    deploy, weights = channels_model(tmp_path)
    quadrant_image(tmp_path / "quad.png")
    assert cli.main(["segment", "--model", deploy, "--weights", weights,
                     str(tmp_path / "quad.png"), str(tmp_path / "quad.png"), "--out",
                     str(tmp_path), "--image-size", "16,24", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [e["labels"] for e in report] == [str(tmp_path / "quad_labels.png"),
                                             str(tmp_path / "quad_2_labels.png")]
    labels = cv2.imread(str(tmp_path / "quad_2_labels.png"), cv2.IMREAD_UNCHANGED)
    # at the image's own size the pooled map is 8x12: the regions' bands are sharper
    assert (labels[:, :7] == 0).all() and (labels[:, 17:] == 3).all()
