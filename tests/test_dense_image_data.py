"""SegNet's DenseImageData layer: image / label-image pairs from a list file.

Expected values restate the fork's dense_image_data_layer.cpp: the image goes through
the DataTransformer ((pixel - mean) * scale), the label image is read gray, resized
nearest-neighbour (cv::resize INTER_NEAREST, as the fork's ReadImageToCVMat with its
label flag) and kept as raw values in a (N, 1, H, W) top; mirror and crop move both.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest

import protonet
from protonet.data import layers as data_layers
from protonet.errors import DataError, NetError
from protonet.io.text import parse_text
from protonet.proto import caffe_pb2

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def write_pairs(folder, count=3, height=6, width=8, label_size=None):
    """`count` colour images and gray label images; the list file's path and the arrays."""
    images, labels, lines = [], [], []
    for i in range(count):
        rng = np.random.default_rng(i)
        img = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        lh, lw = label_size or (height, width)
        lab = rng.integers(0, 12, (lh, lw), dtype=np.uint8)
        cv2.imwrite(str(folder / f"img{i}.png"), img)
        cv2.imwrite(str(folder / f"lab{i}.png"), lab)
        images.append(img)
        labels.append(lab)
        lines.append(f"img{i}.png lab{i}.png")
    source = folder / "list.txt"
    source.write_text("\n".join(lines) + "\n")
    return str(source), images, labels


def dense_net(source, root, phase=TEST, batch=2, params="", transform=""):
    text = f'''layer {{ name: "d" type: "DenseImageData" top: "data" top: "label"
        transform_param {{ {transform} }}
        dense_image_data_param {{ source: "{source}" root_folder: "{root}/"
                                  batch_size: {batch} {params} }} }}'''
    net = protonet.Net(parse_text(text, caffe_pb2.NetParameter()), phase)
    data_layers.configure_data_layers(net, prefetch=False)
    return net


def test_pairs_in_list_order_with_wraparound_and_transform(tmp_path):
    source, images, labels = write_pairs(tmp_path)
    net = dense_net(source, tmp_path, transform="mean_value: 10 mean_value: 20 "
                                                "mean_value: 30 scale: 0.5")
    assert net.blobs["data"].data.shape == (2, 3, 6, 8)
    assert net.blobs["label"].data.shape == (2, 1, 6, 8)
    mean = np.array([10, 20, 30], np.float32).reshape(3, 1, 1)
    for order in ([0, 1], [2, 0], [1, 2]):
        net.forward()
        for item, index in enumerate(order):
            expected = (images[index].transpose(2, 0, 1).astype(np.float32) - mean) * 0.5
            np.testing.assert_array_equal(net.blobs["data"].data[item], expected)
            # the label keeps its raw values: no mean, no scale
            np.testing.assert_array_equal(net.blobs["label"].data[item, 0], labels[index])


def test_resize_is_bilinear_for_images_and_nearest_for_labels(tmp_path):
    source, images, labels = write_pairs(tmp_path, count=1, height=7, width=9)
    net = dense_net(source, tmp_path, batch=1, params="new_height: 4 new_width: 5")
    net.forward()
    image = cv2.resize(images[0], (5, 4), interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(labels[0], (5, 4), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(net.blobs["data"].data[0], image.transpose(2, 0, 1))
    np.testing.assert_array_equal(net.blobs["label"].data[0, 0], label)
    # a bilinear label would hold values between classes
    assert not np.array_equal(cv2.resize(labels[0], (5, 4), interpolation=cv2.INTER_LINEAR),
                              label)


def test_crop_and_mirror_move_image_and_label_together(tmp_path):
    # Channel 0 of each image is its label image, so a shared window shows as equality.
    height, width = 6, 8
    rng = np.random.default_rng(3)
    lines, labels = [], []
    for i in range(4):
        label = rng.integers(0, 200, (height, width), dtype=np.uint8)
        img = np.stack([label, label // 2, label // 3], axis=2)
        cv2.imwrite(str(tmp_path / f"img{i}.png"), img)
        cv2.imwrite(str(tmp_path / f"lab{i}.png"), label)
        labels.append(label)
        lines.append(f"img{i}.png lab{i}.png")
    (tmp_path / "list.txt").write_text(" ".join(lines))     # any whitespace separates
    protonet.set_random_seed(5)
    net = dense_net(tmp_path / "list.txt", tmp_path, TRAIN, batch=4,
                    params="mirror: true crop_height: 3 crop_width: 5")
    assert net.blobs["data"].data.shape == (4, 3, 3, 5)
    assert net.blobs["label"].data.shape == (4, 1, 3, 5)
    seen = set()
    for _ in range(5):
        net.forward()
        for item in range(4):
            label = net.blobs["label"].data[item, 0]
            np.testing.assert_array_equal(net.blobs["data"].data[item, 0], label)
            windows = [(h, w, flip) for h in range(4) for w in range(4) for flip in (0, 1)
                       if np.array_equal(label, (labels[item][:, ::-1] if flip else
                                                 labels[item])[h:h + 3, w:w + 5])]
            assert windows, "the label is no window of its label image"
            seen.update(windows)
    assert {flip for _, _, flip in seen} == {0, 1}
    assert len({(h, w) for h, w, _ in seen}) > 4


def test_single_image_batches_keep_each_image_size(tmp_path):
    (tmp_path / "a.png").write_bytes(cv2.imencode(".png", np.zeros((4, 5, 3), np.uint8))[1])
    (tmp_path / "al.png").write_bytes(cv2.imencode(".png", np.ones((4, 5), np.uint8))[1])
    (tmp_path / "b.png").write_bytes(cv2.imencode(".png", np.zeros((6, 3, 3), np.uint8))[1])
    (tmp_path / "bl.png").write_bytes(cv2.imencode(".png", np.full((6, 3), 2, np.uint8))[1])
    (tmp_path / "list.txt").write_text("a.png al.png\nb.png bl.png\n")
    net = dense_net(tmp_path / "list.txt", tmp_path, batch=1)
    net.forward()
    assert net.blobs["label"].data.shape == (1, 1, 4, 5)
    net.forward()
    assert net.blobs["label"].data.shape == (1, 1, 6, 3)
    assert (net.blobs["label"].data == 2).all()


def test_errors(tmp_path):
    source, _, _ = write_pairs(tmp_path, count=1)
    with pytest.raises(NetError, match="transform_param mirror and crop_size"):
        dense_net(source, tmp_path, transform="crop_size: 4")
    with pytest.raises(NetError, match="crop_height and crop_width together"):
        dense_net(source, tmp_path, params="crop_height: 4")
    with pytest.raises(DataError, match="smaller than crop_height"):
        dense_net(source, tmp_path, params="crop_height: 7 crop_width: 2")
    (tmp_path / "odd.txt").write_text("img0.png\n")
    with pytest.raises(DataError, match="no '<image> <label image>' pair"):
        dense_net(tmp_path / "odd.txt", tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    source, _, _ = write_pairs(other, count=2, label_size=(5, 8))
    net = dense_net(source, other)
    with pytest.raises(DataError, match="label image 'lab0.png' is 5x8; they must match"):
        net.forward()


def test_enet_label_divide_factor(tmp_path):
    source, images, labels = write_pairs(tmp_path, count=1, height=8, width=12)
    net = dense_net(source, tmp_path, batch=1,
                    params="new_height: 8 new_width: 12 label_divide_factor: 4")
    assert net.blobs["label"].data.shape == (1, 1, 2, 3)
    net.forward()
    np.testing.assert_array_equal(
        net.blobs["label"].data[0, 0],
        cv2.resize(labels[0], (3, 2), interpolation=cv2.INTER_NEAREST))
    np.testing.assert_array_equal(net.blobs["data"].data[0], images[0].transpose(2, 0, 1))


def test_shuffle_keeps_pairs_together_and_covers_each_epoch(tmp_path):
    # image i is filled with 10 * i, its label with i: pairs show in the tops
    lines = []
    for i in range(5):
        cv2.imwrite(str(tmp_path / f"img{i}.png"), np.full((3, 4, 3), 10 * i, np.uint8))
        cv2.imwrite(str(tmp_path / f"lab{i}.png"), np.full((3, 4), i, np.uint8))
        lines.append(f"img{i}.png lab{i}.png")
    (tmp_path / "list.txt").write_text("\n".join(lines))
    protonet.set_random_seed(11)
    net = dense_net(tmp_path / "list.txt", tmp_path, TRAIN, batch=5, params="shuffle: true")
    orders = []
    for _ in range(3):
        net.forward()
        labels = net.blobs["label"].data[:, 0, 0, 0].astype(int).tolist()
        np.testing.assert_array_equal(net.blobs["data"].data[:, 0, 0, 0],
                                      np.array(labels) * 10.0)
        assert sorted(labels) == list(range(5))
        orders.append(labels)
    assert any(order != list(range(5)) for order in orders)
