"""Same seed, same numbers: what Caffe draws after `set_random_seed`, bit for bit
(../shared/conformance/rng; skips without it)."""
from __future__ import annotations

import hashlib

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


WINDOWS = """\
# 0
img00.png
3
46
52
5
3 0.2 12 13 18 25
3 0.7 12 9 46 35
1 0.6 16 4 38 16
2 0.9 25 8 46 21
2 0.6 23 2 48 27
# 1
img02.png
3
53
20
5
3 0.7 1 11 11 35
2 0.9 8 15 19 52
2 0.9 8 0 13 50
1 0.1 9 15 19 40
1 0.7 1 6 19 46
# 2
img04.png
3
58
50
5
1 0.9 25 4 46 36
1 0.1 10 28 46 47
3 0.1 17 9 43 20
3 0.6 17 6 46 48
2 0.1 9 14 18 56
# 3
img06.png
3
51
52
5
1 0.7 18 7 31 22
2 0.9 1 19 47 31
1 0.9 2 21 14 29
3 0.6 22 17 47 33
1 0.6 8 16 27 47
"""


def test_window_data_draws_from_its_prefetch_generator(tmp_path, monkeypatch):
    """WindowData (TRAIN, mirror, context_pad) over the conformance images: window
    choices and mirror coins from its PrefetchRand generator, seeded in Caffe's order.
    Labels and a hash of 4 batches as BVLC Caffe gave them (pycaffe, seed 9)."""
    images = folder("data", "images")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "windows.txt").write_text(WINDOWS)
    (tmp_path / "net.prototxt").write_text(
        'layer { name: "w" type: "WindowData" top: "data" top: "label"\n'
        '  include { phase: TRAIN }\n  transform_param { mirror: true crop_size: 8 }\n'
        f'  window_data_param {{ source: "windows.txt" root_folder: "{images}/" '
        'batch_size: 6 fg_threshold: 0.5 bg_threshold: 0.5 fg_fraction: 0.5 '
        'context_pad: 1 } }\n')
    protonet.set_random_seed(9)
    net = protonet.Net("net.prototxt", protonet.TRAIN)
    labels, data = [], []
    for _ in range(4):
        net.forward()
        labels.append(net.blobs["label"].data.astype(int).tolist())
        data.append(net.blobs["data"].data.astype(np.float32).tobytes())
    assert labels == [[0, 0, 0, 1, 1, 2], [0, 0, 0, 2, 1, 3], [0, 0, 0, 3, 1, 3],
                      [0, 0, 0, 3, 1, 2]]
    assert hashlib.sha256(b"".join(data)).hexdigest()[:16] == "71ea69addf0782e0"


def test_image_data_crop_mirror_shuffle_and_rand_skip(tmp_path, monkeypatch):
    """ImageData in TRAIN with crop, mirror, shuffle and rand_skip, then a filled
    layer: the main stream's draws at set-up (transformer seeds, shuffle seed,
    rand_skip, thread seed) are Caffe's, so the next layer's weights are too. Labels
    and hashes as BVLC Caffe gave them (pycaffe, seed 21)."""
    images = folder("data", "images")
    monkeypatch.chdir(tmp_path)
    # the PNG images only: JPEG decoders may differ by a few levels
    pngs = [line for line in (images / "list.txt").read_text().splitlines() if ".png" in line]
    (tmp_path / "pngs.txt").write_text("\n".join(pngs) + "\n")
    (tmp_path / "net.prototxt").write_text(
        'layer { name: "d" type: "ImageData" top: "data" top: "label"\n'
        '  include { phase: TRAIN }\n  transform_param { crop_size: 6 mirror: true }\n'
        f'  image_data_param {{ source: "pngs.txt" root_folder: "{images}/" '
        'batch_size: 5 new_height: 8 new_width: 8 shuffle: true rand_skip: 7 } }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
        'inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 1 } } }\n')
    protonet.set_random_seed(21)
    net = protonet.Net("net.prototxt", protonet.TRAIN)
    weights = net.params["ip"][0].data.astype(np.float32).tobytes()
    assert hashlib.sha256(weights).hexdigest()[:16] == "700ae7baf836efbd"
    labels, data = [], []
    for _ in range(5):
        net.forward()
        labels.append(net.blobs["label"].data.astype(int).tolist())
        data.append(net.blobs["data"].data.astype(np.float32).tobytes())
    assert labels == [[0, 2, 2, 0, 0], [2, 0, 3, 0, 3], [2, 2, 0, 0, 0], [0, 3, 2, 2, 0],
                      [0, 0, 2, 0, 3]]
    assert hashlib.sha256(b"".join(data)).hexdigest()[:16] == "7d6443ea3b9b7b4f"
