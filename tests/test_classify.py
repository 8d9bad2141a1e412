"""Caffe-style preprocessing, top-k ranking and `protonet classify`, on tiny nets built
here and on the real open_nsfw weights (when they can be had offline, see test_zoo)."""
from __future__ import annotations

import hashlib
import re

import cv2
import numpy as np
import pytest

from protonet import classify, zoo
from protonet.errors import ProtonetError

import conformance
from test_zoo import open_nsfw_files, run_cli, serve, tmp_zoo, write_entry  # noqa: F401

# Global average per channel, then softmax: the top class is the brightest channel
# after preprocessing, so the ranking shows what the pipeline did to the image.
CHANNEL_MEANS = """
name: "channel_means"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 1 dim: 3 dim: 6 dim: 6 } } }
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool"
        pooling_param { pool: AVE global_pooling: true } }
layer { name: "prob" type: "Softmax" bottom: "pool" top: "prob" }
"""


def bgr_image(path, size=(10, 14), bgr=(10, 200, 100)):
    image = np.empty(size + (3,), np.uint8)
    image[:] = bgr
    cv2.imwrite(str(path), image)
    return str(path)


def test_preprocess_resizes_crops_at_the_floor_centre_then_subtracts_and_scales():
    image = np.arange(8 * 9 * 3, dtype=np.uint8).reshape(8, 9, 3)
    prep = zoo.Preprocess(image_size=(8, 9), crop=(5, 4), mean=(1, 2, 3), scale=0.5)
    out = classify.preprocess(image, prep, (5, 4))
    top, left = (8 - 5) // 2, (9 - 4) // 2
    expected = (image[top:top + 5, left:left + 4].astype(np.float32) - [1, 2, 3]) * 0.5
    np.testing.assert_array_equal(out, expected.transpose(2, 0, 1))
    resized = classify.preprocess(image, zoo.Preprocess(None, None, ()), (16, 18))
    np.testing.assert_array_equal(
        resized, cv2.resize(image, (18, 16), interpolation=cv2.INTER_LINEAR)
        .astype(np.float32).transpose(2, 0, 1))
    rgb = classify.preprocess(image, zoo.Preprocess(None, None, (), channel_order="RGB"),
                              (8, 9))
    np.testing.assert_array_equal(rgb[0], image[:, :, 2])


def test_crop_larger_than_the_image_is_an_error():
    with pytest.raises(ProtonetError, match="cannot crop 9x9 from a 8x9 image"):
        classify.center_crop(np.zeros((8, 9, 3)), 9, 9)


def test_top_k_ranks_and_labels():
    scores = np.array([0.1, 0.5, 0.05, 0.35])
    assert classify.top_k(scores, 2, ["a", "b", "c", "d"]) == [(1, 0.5, "b"), (3, 0.35, "d")]
    assert classify.top_k(scores, 1) == [(1, 0.5, None)]


def test_unreadable_image_is_named(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ProtonetError, match="bad.jpg: cannot read as an image"):
        classify.load_image(str(tmp_path / "bad.jpg"))


@pytest.fixture
def channel_means(tmp_path):
    """(deploy path, an empty caffemodel's bytes) of the channel-means net."""
    import protonet
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(CHANNEL_MEANS)
    weights = tmp_path / "net.caffemodel"
    protonet.Net(str(deploy), protonet.TEST).save(str(weights))
    return deploy, weights.read_bytes()


def test_classify_a_deploy_file_with_flags(channel_means, tmp_path, capsys):
    deploy, weights = channel_means
    (tmp_path / "w.caffemodel").write_bytes(weights)
    labels = tmp_path / "labels.txt"
    labels.write_text("blue\ngreen\nred\n")
    image = bgr_image(tmp_path / "img.png")
    assert run_cli("classify", "--model", str(deploy), "--weights",
                   str(tmp_path / "w.caffemodel"), image, image, "--top-k", "2",
                   "--labels", str(labels), "--image-size", "8", "--mean-value",
                   "0,180,0") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == image and lines[3] == image
    assert re.fullmatch(r"  1\. [01]\.\d{6}\s+2  red", lines[1])       # 100 > 200 - 180 > 10
    assert re.fullmatch(r"  2\. [01]\.\d{6}\s+1  green", lines[2])


def test_classify_a_zoo_model_downloads_its_weights(channel_means, tmp_zoo, capsys):
    deploy, weights = channel_means
    with serve({"/w.caffemodel": weights}) as (server, base):
        write_entry(tmp_zoo / "zoo", "means", deploy=deploy.read_text(),
                    caffemodel="w.caffemodel", caffemodel_url=f"{base}/w.caffemodel",
                    sha256=hashlib.sha256(weights).hexdigest(), image_size="[8, 8]",
                    crop=6, mean_value="[0, 0, 0]", scale=1, channel_order="RGB",
                    labels="[first, second, third]")
        image = bgr_image(tmp_zoo / "img.png")
        assert run_cli("classify", "--model", "means", image, "--top-k", "1") == 0
        assert run_cli("classify", "--model", "means", image, "--top-k", "1") == 0
        assert len(server.requests) == 1                     # cached the second time
    out = capsys.readouterr().out
    assert out.count("  1. ") == 2 and "1  second" in out    # RGB order: G stays second


def test_deploy_file_needs_weights(channel_means, tmp_path, capsys):
    assert run_cli("classify", "--model", str(channel_means[0]),
                   bgr_image(tmp_path / "i.png")) == 1
    assert "give its --weights" in capsys.readouterr().err


def test_open_nsfw_classifies_the_cat_as_safe(open_nsfw_files, capsys):
    cat = conformance.ROOT / "data" / "images" / "cat.jpg"
    if not cat.is_file():
        pytest.skip(f"{cat} not found")
    weights, _ = open_nsfw_files
    cache = weights.parent.parent
    assert run_cli("classify", "--model", "open_nsfw", "--cache-dir", str(cache), str(cat),
                   "--top-k", "2") == 0
    lines = capsys.readouterr().out.splitlines()
    first = re.fullmatch(r"  1\. (\d\.\d{6})\s+0  SFW", lines[1])
    assert first and float(first.group(1)) > 0.99, lines
    assert re.fullmatch(r"  2\. \d\.\d{6}\s+1  NSFW", lines[2])
