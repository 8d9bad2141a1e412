"""Test-time augmentation: `protonet classify --oversample`, as pycaffe's
Classifier.predict(oversample=True): resize, ten crops (corners, center, mirrors),
outputs averaged."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

import protonet
from protonet import classify, zoo
from protonet.cli import main as cli_main
from protonet.errors import ProtonetError

# A linear classifier over every input pixel: its scores tell the crops apart.
LINEAR = """
name: "linear"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 1 dim: 3 dim: 4 dim: 5 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 6 } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


def pycaffe_oversample(images: np.ndarray, crop_dims) -> np.ndarray:
    """caffe.io.oversample as BVLC Caffe's python/caffe/io.py computes it (float center,
    crop origins truncated by astype(int), mirrors by flipping the width axis)."""
    shape = np.array(images[0].shape)
    crop_dims = np.array(crop_dims)
    center = shape[:2] / 2.0
    boxes = []
    for i in (0, shape[0] - crop_dims[0]):
        for j in (0, shape[1] - crop_dims[1]):
            boxes.append((i, j, i + crop_dims[0], j + crop_dims[1]))
    middle = np.concatenate([center - crop_dims / 2.0, center + crop_dims / 2.0])
    boxes.append(tuple(middle.astype(int)))
    boxes = boxes * 2
    crops = []
    for image in images:
        these = [image[a:c, b:d, :] for a, b, c, d in boxes]
        crops += these[:5] + [crop[:, ::-1, :] for crop in these[5:]]
    return np.stack(crops).astype(np.float32)


@pytest.mark.parametrize("image_shape, crop", [((8, 9), (5, 4)), ((7, 7), (4, 4)),
                                               ((6, 10), (6, 3)), ((5, 5), (5, 5))])
def test_crops_match_pycaffe(image_shape, crop):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, image_shape + (3,)).astype(np.uint8)
    got = classify.oversample(image, *crop)
    assert got.shape == (10, *crop, 3)
    np.testing.assert_array_equal(got, pycaffe_oversample(image[None], crop))
    np.testing.assert_array_equal(got[4], classify.center_crop(image, *crop))
    np.testing.assert_array_equal(got[5:], got[:5, :, ::-1])


def test_crop_larger_than_the_image_is_an_error():
    with pytest.raises(ProtonetError, match="cannot crop 9x4 from a 8x9 image"):
        classify.oversample(np.zeros((8, 9, 3), np.uint8), 9, 4)


@pytest.fixture
def linear(tmp_path):
    """(deploy path, weights path, W, b) of the linear net with random weights."""
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(LINEAR)
    net = protonet.Net(str(deploy), protonet.TEST)
    rng = np.random.default_rng(2)
    w = rng.normal(scale=0.01, size=net.params["ip"][0].data.shape).astype(np.float32)
    b = rng.normal(size=6).astype(np.float32)
    net.params["ip"][0].data[...] = w
    net.params["ip"][1].data[...] = b
    weights = tmp_path / "linear.caffemodel"
    net.save(str(weights))
    return str(deploy), str(weights), w, b


def _expected(image: np.ndarray, prep: zoo.Preprocess, w, b, oversample: bool) -> np.ndarray:
    """Classifier.predict's arithmetic in numpy: resize, crops, (x - mean) * scale,
    the net, the mean of the ten probability vectors."""
    resized = cv2.resize(image, (prep.image_size[1], prep.image_size[0]),
                         interpolation=cv2.INTER_LINEAR)
    crops = pycaffe_oversample(resized[None], (4, 5)) if oversample else \
        classify.center_crop(resized, 4, 5)[None].astype(np.float32)
    x = (crops - np.asarray(prep.mean, np.float32)) * np.float32(prep.scale)
    logits = x.transpose(0, 3, 1, 2).reshape(len(x), -1) @ w.T + b
    e = np.exp(logits - logits.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).mean(0)


@pytest.mark.parametrize("oversample", [False, True])
def test_classify_averages_the_ten_crops(tmp_path, linear, oversample):
    deploy, weights, w, b = linear
    rng = np.random.default_rng(3)
    paths, images = [], []
    for i in range(5):                  # more than one forward pass when oversampling
        image = rng.integers(0, 256, (9, 11, 3)).astype(np.uint8)
        path = tmp_path / f"img{i}.png"
        cv2.imwrite(str(path), image)
        paths.append(str(path))
        images.append(image)
    prep = zoo.Preprocess(image_size=(7, 8), crop=None, mean=(100.0, 110.0, 120.0),
                          scale=0.5)
    model = classify.Model(deploy, weights, prep)
    results = classify.classify(model, paths, k=6, oversample=oversample)
    for image, top in zip(images, results):
        expected = _expected(image, prep, w, b, oversample)
        got = np.zeros(6)
        for index, score, _ in top:
            got[index] = score
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    if oversample:     # ten crops really change the answer here
        plain = classify.classify(model, paths, k=6)
        assert [t[0][1] for t in plain] != [t[0][1] for t in results]


def test_classify_command_oversample(tmp_path, linear, capsys):
    deploy, weights, _, _ = linear
    image = tmp_path / "img.png"
    cv2.imwrite(str(image), np.full((8, 8, 3), 90, np.uint8))
    assert cli_main(["-q", "classify", "--model", deploy, "--weights", weights,
                     "--image-size", "6,7", "--oversample", "--top-k", "2",
                     str(image)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == str(image) and len(out) == 3 and out[1].startswith("  1. ")
