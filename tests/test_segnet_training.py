"""A SegNet-style net (conv-BN-ReLU, MAX pooling with its mask top, Upsample with the
mask) fed by DenseImageData trains through the Solver: the loss falls. Both BN
variants (SegNet's batch statistics, PSPNet's moving averages) take part."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from protonet.io.text import parse_text
from protonet.proto import caffe_pb2
from protonet.solver import SGDSolver

SEGNET = """
name: "segnet_tiny"
layer {{ name: "data" type: "DenseImageData" top: "data" top: "label"
  transform_param {{ mean_value: 128 mean_value: 128 mean_value: 128 scale: 0.0078125 }}
  dense_image_data_param {{ source: "pairs.txt" batch_size: 4 }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 8 kernel_size: 3 pad: 1
                       weight_filler {{ type: "msra" }} }} }}
layer {{ name: "bn1" type: "BN" bottom: "conv1" top: "conv1" {bn} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" top: "pool1_mask"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param {{ num_output: 8 kernel_size: 3 pad: 1
                       weight_filler {{ type: "msra" }} }} }}
layer {{ name: "bn2" type: "BN" bottom: "conv2" top: "conv2" {bn} }}
layer {{ name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }}
layer {{ name: "upsample1" type: "Upsample" bottom: "conv2" bottom: "pool1_mask"
  top: "up1" upsample_param {{ scale: 2 }} }}
layer {{ name: "score" type: "Convolution" bottom: "up1" top: "score"
  convolution_param {{ num_output: 3 kernel_size: 3 pad: 1
                       weight_filler {{ type: "msra" }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" }}
"""

BN = {
    "segnet": 'bn_param { scale_filler { type: "constant" value: 1 } '
              'shift_filler { type: "constant" value: 0 } }',
    "pspnet": 'param { lr_mult: 1 } param { lr_mult: 1 } param { lr_mult: 0 } '
              'param { lr_mult: 0 } bn_param { slope_filler { type: "constant" value: 1 } '
              'bias_filler { type: "constant" value: 0 } momentum: 0.9 }',
}


def write_pairs(folder: Path, count: int = 4):
    """Images whose label is their dominant colour (0 blue, 1 green, 2 red) per pixel."""
    rng = np.random.default_rng(7)
    lines = []
    for i in range(count):
        label = np.zeros((8, 8), np.uint8)
        label[rng.integers(0, 8):, :] = 1
        label[:, rng.integers(0, 8):] = 2
        image = np.full((8, 8, 3), 40, np.uint8)
        for c in range(3):
            image[..., c][label == c] = 220
        image = np.clip(image + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"i{i}.png"), image)
        cv2.imwrite(str(folder / f"l{i}.png"), label)
        lines.append(f"{folder}/i{i}.png {folder}/l{i}.png")
    (folder / "pairs.txt").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("variant", sorted(BN))
def test_segnet_style_net_trains(tmp_path, monkeypatch, variant):
    monkeypatch.chdir(tmp_path)
    write_pairs(tmp_path)
    Path("net.prototxt").write_text(SEGNET.format(bn=BN[variant]))
    solver = SGDSolver(parse_text(
        'net: "net.prototxt" base_lr: 0.05 momentum: 0.9 lr_policy: "fixed" max_iter: 40 '
        'display: 0 random_seed: 3 snapshot_after_train: false snapshot_prefix: "s"',
        caffe_pb2.SolverParameter()))
    net = solver.net
    assert len(net.params["bn1"]) == (2 if variant == "segnet" else 4)
    net.forward()
    first = float(net.blobs["loss"].data)
    solver.step(40)
    net.forward()
    last = float(net.blobs["loss"].data)
    assert last < 0.5 * first, (first, last)
    if variant == "pspnet":     # the moving statistics moved; they were not learned
        assert np.abs(net.params["bn1"][2].data).sum() > 0
