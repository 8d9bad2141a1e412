"""Same seed, same numbers: what Caffe draws after `set_random_seed`, bit for bit
(../shared/conformance/rng; skips without it)."""
from __future__ import annotations

import numpy as np
import pytest

import protonet
from conformance import folder

FILLED = ["gauss", "unif", "xavier_in", "xavier_out", "msra_avg", "unitball", "sparse"]


@pytest.fixture(scope="module")
def golden():
    return np.load(folder("rng") / "golden.npz")


def same_bits(ours, theirs, what: str) -> None:
    ours = np.asarray(ours)
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} != {theirs.shape}"
    if theirs.dtype == np.float32:
        different = ours.astype(np.float32).view(np.uint32) != theirs.view(np.uint32)
    else:
        different = ours != theirs
    assert not different.any(), f"{what}: {int(different.sum())} of {theirs.size} differ"


def test_every_filler_and_a_dropout_mask(golden, monkeypatch):
    monkeypatch.chdir(folder("rng"))
    protonet.set_random_seed(42)
    net = protonet.Net("fillers.prototxt", protonet.TRAIN)
    for name in FILLED:
        for i, blob in enumerate(net.params[name]):
            same_bits(blob.data, golden[f"fillers/{name}/{i}"], f"{name} param {i}")
    net.blobs["data"].data[...] = 1
    net.forward()
    out, conv = net.blobs["drop"].data, net.blobs["gauss"].data
    mask = golden["fillers/dropout_mask"]
    same_bits((out != 0).astype(np.uint8), mask, "dropout mask")
    # The output is the mask times the scale times the convolution's top, whose float32
    # sums differ from OpenBLAS's by an ulp: exact given our top, Caffe's within that.
    scale = np.float32(1.0 / (1.0 - float(np.float32(0.6))))
    same_bits(conv * mask.astype(np.float32) * scale, out, "dropout of our top")
    theirs = golden["fillers/dropout_out"]
    assert np.abs(out - theirs).max() <= 1e-6 * np.abs(theirs).max()


def test_random_crop_and_mirror_batches(golden, monkeypatch):
    monkeypatch.chdir(folder("rng"))
    protonet.set_random_seed(42)
    net = protonet.Net("data_crop_mirror.prototxt", protonet.TRAIN)
    for k in range(3):
        net.forward()
        same_bits(net.blobs["data"].data, golden[f"crop_mirror/batch{k}/data"],
                  f"batch {k} data")
        same_bits(net.blobs["label"].data, golden[f"crop_mirror/batch{k}/label"],
                  f"batch {k} labels")


def test_image_data_shuffle(golden, monkeypatch):
    monkeypatch.chdir(folder("rng"))
    protonet.set_random_seed(42)
    net = protonet.Net("imagedata_shuffle.prototxt", protonet.TRAIN)
    labels = []
    for _ in range(6):                      # 24 labels: the 12-image list reshuffled twice
        net.forward()
        labels.extend(net.blobs["label"].data.tolist())
    same_bits(np.array(labels, dtype=np.float32), golden["shuffle/labels"], "labels")


def test_solver_initial_params(golden, monkeypatch):
    monkeypatch.chdir(folder("solvers"))
    solver = protonet.get_solver("../rng/solver_init.solver.prototxt")
    for name in ("conv", "ip1", "ip2"):
        for i, blob in enumerate(solver.net.params[name]):
            same_bits(blob.data, golden[f"solver_init/{name}/{i}"], f"{name} param {i}")
