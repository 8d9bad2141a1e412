"""`protonet detect` and protonet.detect: on a tiny SSD built here, and on the real res10
face detector against the faces OpenCV 4 finds (tests/data/forks/res10_face_opencv.json,
made by tools/make_res10_reference.py) when its weights are in the zoo cache (CI fetches
them with `protonet zoo download res10_ssd_face`; the tests skip without them)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import torch
import pytest

import protonet
from protonet import classify, detect, finetune, zoo
from protonet.errors import ProtonetError

from test_zoo import run_cli

DATA = Path(__file__).resolve().parent / "data" / "forks"

# Two 3x3 heads over a 4x4 feature map of the image, two priors per cell, 3 classes.
TINY_SSD = """
name: "tiny_ssd"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 1 dim: 3 dim: 32 dim: 32 } } }
layer { name: "feat" type: "Convolution" bottom: "data" top: "feat"
        convolution_param { num_output: 4 kernel_size: 8 stride: 8
                            weight_filler { type: "gaussian" std: 0.05 } } }
layer { name: "loc" type: "Convolution" bottom: "feat" top: "loc"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1
                            weight_filler { type: "gaussian" std: 0.002 } } }
layer { name: "loc_perm" type: "Permute" bottom: "loc" top: "loc_perm"
        permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "loc_flat" type: "Flatten" bottom: "loc_perm" top: "loc_flat" }
layer { name: "conf" type: "Convolution" bottom: "feat" top: "conf"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1
                            weight_filler { type: "gaussian" std: 1 } } }
layer { name: "conf_perm" type: "Permute" bottom: "conf" top: "conf_perm"
        permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "conf_flat" type: "Flatten" bottom: "conf_perm" top: "conf_flat" }
layer { name: "conf_shape" type: "Reshape" bottom: "conf_flat" top: "conf_shape"
        reshape_param { shape { dim: 0 dim: -1 dim: 3 } } }
layer { name: "conf_prob" type: "Softmax" bottom: "conf_shape" top: "conf_prob"
        softmax_param { axis: 2 } }
layer { name: "conf_prob_flat" type: "Flatten" bottom: "conf_prob" top: "conf_prob_flat" }
layer { name: "priors" type: "PriorBox" bottom: "feat" bottom: "data" top: "priors"
        prior_box_param { min_size: 10 max_size: 20 variance: 0.1 variance: 0.1
                          variance: 0.2 variance: 0.2 } }
layer { name: "detection_out" type: "DetectionOutput" bottom: "loc_flat"
        bottom: "conf_prob_flat" bottom: "priors" top: "detection_out"
        detection_output_param { num_classes: 3 nms_param { nms_threshold: 0.45 }
                                 code_type: CENTER_SIZE confidence_threshold: 0.05 } }
"""


@pytest.fixture
def tiny(tmp_path):
    """The tiny SSD with seeded random weights, and three small images."""
    protonet.set_random_seed(3)
    deploy = tmp_path / "tiny.prototxt"
    deploy.write_text(TINY_SSD)
    weights = tmp_path / "tiny.caffemodel"
    protonet.Net(str(deploy), protonet.TEST).save(str(weights))
    rng = np.random.default_rng(5)
    images = []
    for i, size in enumerate([(40, 50), (32, 32), (60, 20)]):
        path = tmp_path / f"img{i}.png"
        cv2.imwrite(str(path), rng.integers(0, 256, size + (3,), dtype=np.uint8))
        images.append(str(path))
    return str(deploy), str(weights), images


def net_rows(deploy, weights, image_path):
    """The tiny net's own DetectionOutput rows for one image (resized to 32x32)."""
    net = protonet.Net(deploy, weights, protonet.TEST)
    image = cv2.resize(cv2.imread(image_path), (32, 32), interpolation=cv2.INTER_LINEAR)
    with torch.no_grad():       # the inference kernels detect() runs
        return net.forward(data=image.astype(np.float32).transpose(2, 0, 1)[None])[
            "detection_out"][0, 0]


def test_api_reads_detection_output_rows(tiny):
    deploy, weights, images = tiny
    model = detect.Model(deploy, weights, zoo.Preprocess(None, None, ()),
                         labels=["bg", "cat", "dog"])
    results = detect.detect(model, images, threshold=0.3)
    assert [r.path for r in results] == images
    for result, path in zip(results, images):
        rows = net_rows(deploy, weights, path)
        rows = rows[(rows[:, 1] >= 0) & (rows[:, 2] >= 0.3)]
        assert len(result.detections) == len(rows)
        height, width = cv2.imread(path).shape[:2]
        assert (result.width, result.height) == (width, height)
        for d, row in zip(result.detections, rows):
            assert (d.label, d.name) == (int(row[1]), ["bg", "cat", "dog"][int(row[1])])
            # detect() runs the images as one batch, net_rows one at a time: oneDNN may
            # pick other kernels, so float32 rounding (not the reading) may differ.
            assert d.score == pytest.approx(float(row[2]), rel=1e-5, abs=1e-6)
            np.testing.assert_allclose(d.relative, row[3:], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(d.box, np.asarray(d.relative) * [width, height, width,
                                                                        height], rtol=1e-6)
    assert sum(len(r.detections) for r in results) > 0


def test_cli_json_text_and_drawn_images(tiny, tmp_path, capsys):
    deploy, weights, images = tiny
    out = tmp_path / "drawn"
    same_name = tmp_path / "other"
    same_name.mkdir()
    twin = same_name / "img0.png"
    twin.write_bytes(Path(images[0]).read_bytes())
    assert run_cli("detect", "--model", deploy, "--weights", weights, *images, str(twin),
                   "--threshold", "0.3", "--json", "--out", str(out)) == 0
    payload = json.loads(capsys.readouterr().out)
    api = detect.detect(detect.Model(deploy, weights, zoo.Preprocess(None, None, ())),
                        images + [str(twin)], threshold=0.3)
    assert [p["detections"] for p in payload] == [r.to_dict()["detections"] for r in api]
    drawn = [p["drawn"] for p in payload]
    assert [Path(d).name for d in drawn] == ["img0.png", "img1.png", "img2.png", "img0_1.png"]
    for entry, path in zip(payload, drawn):
        picture = cv2.imread(path)
        assert picture.shape == (entry["height"], entry["width"], 3)
        changed = np.any(picture != cv2.imread(entry["path"]))
        assert changed == bool(entry["detections"])
    assert run_cli("detect", "--model", deploy, "--weights", weights, images[0],
                   "--threshold", "0.3") == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{images[0]}: {len(payload[0]['detections'])} detection")


def test_deploy_file_needs_weights_and_an_ssd_output(tiny, tmp_path, capsys):
    deploy, weights, images = tiny
    assert run_cli("detect", "--model", deploy, images[0]) == 1
    assert "give its --weights too" in capsys.readouterr().err
    plain = tmp_path / "plain.prototxt"
    plain.write_text('layer { name: "data" type: "Input" top: "data" input_param { '
                     'shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }\n'
                     'layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" '
                     'pooling_param { pool: AVE global_pooling: true } }\n')
    model = detect.Model(str(plain), weights, zoo.Preprocess(None, None, ()))
    with pytest.raises(ProtonetError, match=r"\[1, 1, N, 7\]"):
        detect.detect(model, images[:1])


def test_a_zoo_entry_brings_weights_preprocessing_and_a_labels_file(tiny, tmp_path,
                                                                    monkeypatch):
    deploy, weights, images = tiny
    zoo_root = tmp_path / "zoo" / "tiny_ssd"
    zoo_root.mkdir(parents=True)
    (zoo_root / "deploy.prototxt").write_text(TINY_SSD)
    (zoo_root / "names.txt").write_text("bg\ncat\ndog\n")
    digest = zoo.file_digest(Path(weights), "sha256")
    (zoo_root / "readme.md").write_text(
        f"---\nname: tiny_ssd\ntask: detection\ncaffemodel: tiny.caffemodel\n"
        f"sha256: {digest}\nmean_value: [5, 5, 5]\nscale: 1\nthreshold: 0.3\n"
        "labels_file: names.txt\n---\n")
    monkeypatch.setenv("PROTONET_ZOO", str(tmp_path / "zoo"))
    monkeypatch.setenv("PROTONET_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "tiny_ssd").mkdir(parents=True)
    (tmp_path / "cache" / "tiny_ssd" / "tiny.caffemodel").write_bytes(Path(weights).read_bytes())
    model = detect.zoo_model("tiny_ssd")
    assert (model.labels, model.threshold, model.preprocess.mean) == (
        ["bg", "cat", "dog"], 0.3, (5.0, 5.0, 5.0))
    found = detect.detect(model, images)
    assert sum(len(r.detections) for r in found) > 0
    assert all(d.score >= 0.3 and d.name in ("cat", "dog") for r in found
               for d in r.detections)


def test_detection_and_classification_entries_stay_apart():
    with pytest.raises(ProtonetError, match="detection model: use `protonet detect`"):
        classify.zoo_model("res10_ssd_face")
    with pytest.raises(ProtonetError, match="not a detector; use `protonet classify`"):
        detect.zoo_model("bvlc_alexnet")
    with pytest.raises(ProtonetError, match="retrains a classifier"):
        finetune.train_val(zoo.load_entry("res10_ssd_face"), None)


# -- the real res10 face detector -------------------------------------------------------------
def reference():
    return json.loads((DATA / "res10_face_opencv.json").read_text())


@pytest.fixture(scope="module")
def res10_weights():
    entry = zoo.load_entry("res10_ssd_face")
    try:
        zoo.verify(entry)
    except ProtonetError as e:
        pytest.skip(f"res10 face detector weights not in the cache: {e}")
    return str(zoo.weights_path(entry))


@pytest.fixture(scope="module")
def face_images(tmp_path_factory):
    """The reference's test images: matplotlib's grace_hopper.jpg, and it beside its
    mirror image, written losslessly."""
    import matplotlib
    photo_path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not photo_path.is_file():
        pytest.skip("matplotlib's sample data has no grace_hopper.jpg")
    photo = cv2.imread(str(photo_path))
    folder = tmp_path_factory.mktemp("faces")
    pair = folder / "grace_hopper_pair.png"
    cv2.imwrite(str(pair), np.hstack([photo, photo[:, ::-1]]))
    return {"grace_hopper": str(photo_path), "grace_hopper_pair": str(pair)}


def assert_same_faces(found: dict, name: str, threshold: float):
    expected = reference()["images"][name]
    assert [found["height"], found["width"], 3] == expected["shape"]
    rows = [[d["label"], d["score"], *d["relative"]] for d in found["detections"]]
    assert len(rows) == len(expected["rows"]), (rows, expected["rows"])
    for ours, theirs in zip(sorted(rows, key=lambda r: -r[1]),
                            sorted(expected["rows"], key=lambda r: -r[1])):
        assert ours[0] == theirs[0]
        np.testing.assert_allclose(ours[1:], theirs[1:], rtol=0, atol=1e-3)


def test_res10_finds_the_faces_opencv_finds_python_api(res10_weights, face_images):
    threshold = reference()["threshold"]
    model = detect.zoo_model("res10_ssd_face")
    results = detect.detect(model, list(face_images.values()), threshold=threshold)
    for name, result in zip(face_images, results):
        assert_same_faces(result.to_dict(), name, threshold)
    best = max(results[1].detections, key=lambda d: d.score)
    assert best.name == "face" and best.score > 0.99


def test_res10_finds_the_faces_opencv_finds_cli(res10_weights, face_images, tmp_path, capsys):
    threshold = reference()["threshold"]
    assert run_cli("detect", "--model", "res10_ssd_face", *face_images.values(),
                   "--threshold", str(threshold), "--json", "--out", str(tmp_path)) == 0
    payload = json.loads(capsys.readouterr().out)
    for name, found in zip(face_images, payload):
        assert_same_faces(found, name, threshold)
        assert os.path.isfile(found["drawn"])
    # The default threshold (0.5, from the zoo entry) keeps the two real faces only.
    assert run_cli("detect", "--model", "res10_ssd_face", face_images["grace_hopper_pair"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith(": 2 detections")
