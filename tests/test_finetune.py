"""Fine-tuning: the written train_val/solver, and a whole run from a served caffemodel.

A tiny "pretrained" net is saved, served over HTTP on 127.0.0.1, downloaded into the
zoo cache with its checksum, and fine-tuned for 20 iterations on LMDBs of dark and
bright images; the validation loss must fall and the frozen layer must not move.
"""
from __future__ import annotations

import hashlib

import lmdb
import numpy as np
import pytest
import torch

import protonet
from protonet import finetune, zoo
from protonet.data.datum import raw_datum
from protonet.errors import ProtonetError
from protonet.io.upgrade import read_net, read_solver
from protonet.net.module import NetModule

from test_zoo import open_nsfw_files, run_cli, serve, tmp_zoo, write_entry  # noqa: F401

TINY = """
name: "tiny"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 1 dim: 3 dim: 10 dim: 10 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 stride: 2
                            weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc1" type: "InnerProduct" bottom: "conv1" top: "fc1"
        inner_product_param { num_output: 16 weight_filler { type: "xavier" } } }
layer { name: "relu2" type: "ReLU" bottom: "fc1" top: "fc1" }
layer { name: "fc2" type: "InnerProduct" bottom: "fc1" top: "fc2"
        inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "prob" type: "Softmax" bottom: "fc2" top: "prob" }
"""


def write_lmdb(path, count: int, size: int = 12, seed: int = 0) -> str:
    """Alternating labels: 0 = dark images, 1 = bright ones, both noisy."""
    rng = np.random.default_rng(seed)
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(count):
            label = i % 2
            pixels = rng.integers(-40, 40, (size, size, 3)) + (70 if label == 0 else 180)
            datum = raw_datum(pixels.clip(0, 255).astype(np.uint8), label)
            txn.put(f"{i:08d}".encode(), datum.SerializeToString())
    env.close()
    return str(path)


@pytest.fixture
def tiny(tmp_zoo):
    """The tiny model as a zoo entry whose weights are served, and the served bytes."""
    deploy = tmp_zoo / "tiny_deploy.prototxt"
    deploy.write_text(TINY)
    protonet.set_random_seed(3)
    protonet.Net(str(deploy), protonet.TEST).save(str(tmp_zoo / "tiny.caffemodel"))
    weights = (tmp_zoo / "tiny.caffemodel").read_bytes()
    with serve({"/tiny.caffemodel": weights}) as (server, base):
        write_entry(tmp_zoo / "zoo", "tiny", deploy=TINY, caffemodel="tiny.caffemodel",
                    caffemodel_url=f"{base}/tiny.caffemodel",
                    sha256=hashlib.sha256(weights).hexdigest(), image_size="[12, 12]",
                    crop=10, mean_value="[128, 128, 128]", scale=0.0078125,
                    channel_order="BGR", output="prob", output_shape="[1, 10]")
        yield server


def val_loss(train_val: str, weights: str, batches: int = 2) -> float:
    """Mean TEST-phase loss of the written net over the validation LMDB."""
    net = protonet.Net(train_val, protonet.TEST, weights=weights)
    with torch.no_grad():
        return float(np.mean([net.forward()["loss"] for _ in range(batches)]))


def test_finetune_a_served_model_and_the_loss_falls(tiny, tmp_zoo):
    train_db = write_lmdb(tmp_zoo / "train_lmdb", 64)
    val_db = write_lmdb(tmp_zoo / "val_lmdb", 16, seed=1)
    out = tmp_zoo / "run"
    protonet.set_random_seed(5)
    assert run_cli("finetune", "tiny", "--train", train_db, "--val", val_db,
                   "--num-classes", "2", "--freeze-through", "conv1", "--lr", "0.01",
                   "--iterations", "20", "--batch-size", "8", "--out", str(out)) == 0
    assert len(tiny.requests) == 1                      # downloaded, with its checksum
    pretrained = str(tmp_zoo / "cache" / "tiny" / "tiny.caffemodel")
    finished = str(out / "tiny_finetune_iter_20.caffemodel")
    train_val = str(out / "train_val.prototxt")
    protonet.set_random_seed(5)
    before = val_loss(train_val, pretrained)
    after = val_loss(train_val, finished)
    print(f"validation loss {before:.4f} -> {after:.4f}")
    assert before > 0.6 and after < 0.5 * before, (before, after)
    start = protonet.Net(str(tmp_zoo / "tiny_deploy.prototxt"), protonet.TEST,
                         weights=pretrained)
    end = protonet.Net(train_val, protonet.TEST, weights=finished)
    np.testing.assert_array_equal(start.params["conv1"][0].data, end.params["conv1"][0].data)
    assert not np.array_equal(start.params["fc1"][0].data, end.params["fc1"][0].data)


def test_written_files_are_plain_caffe_and_rerun_with_train(tiny, tmp_zoo, capsys):
    train_db = write_lmdb(tmp_zoo / "train_lmdb", 16)
    val_db = write_lmdb(tmp_zoo / "val_lmdb", 6, seed=1)
    out = tmp_zoo / "files"
    assert run_cli("finetune", "tiny", "--train", train_db, "--val", val_db,
                   "--num-classes", "3", "--iterations", "4", "--batch-size", "4",
                   "--out", str(out), "--write-only") == 0
    command = f"protonet train --solver {out / 'solver.prototxt'}"
    assert capsys.readouterr().out.strip() == command
    net = read_net(str(out / "train_val.prototxt"))
    layers = {l.name: l for l in net.layer}
    assert [l.type for l in net.layer[:2]] == ["Data", "Data"]
    assert "fc2" not in layers and "prob" not in layers
    new = layers["fc2_ft"]
    assert new.inner_product_param.num_output == 3 and list(new.top) == ["fc2_ft"]
    assert [(p.lr_mult, p.decay_mult) for p in new.param] == [(10, 1), (20, 0)]
    assert [(p.lr_mult, p.decay_mult) for p in layers["conv1"].param] == [(1, 1), (2, 0)]
    assert list(layers["loss"].bottom) == ["fc2_ft", "label"]
    transform = net.layer[0].transform_param
    assert transform.crop_size == 10 and transform.mirror and list(transform.mean_value) == \
        [128, 128, 128] and transform.scale == pytest.approx(1 / 128)
    solver = read_solver(str(out / "solver.prototxt"))
    assert solver.max_iter == 4 and list(solver.test_iter) == [2] and solver.base_lr == pytest.approx(0.001)
    assert list(solver.weights) == [str(tmp_zoo / "cache" / "tiny" / "tiny.caffemodel")]
    if "train" not in protonet.cli.COMMANDS:
        pytest.skip("`protonet train` is not registered yet")
    assert run_cli("train", "--solver", str(out / "solver.prototxt")) == 0
    assert (out / "tiny_finetune_iter_4.caffemodel").is_file()


def options(tmp_path, **kw) -> finetune.Options:
    return finetune.Options(str(tmp_path / "t"), str(tmp_path / "v"), 5, **kw)


def test_freeze_through_is_checked(tmp_path):
    entry = zoo.load_entry("bvlc_reference_caffenet")
    with pytest.raises(ProtonetError, match="no layer named 'conv_5'.*'conv5'"):
        finetune.train_val(entry, options(tmp_path, freeze_through="conv_5"))
    with pytest.raises(ProtonetError, match="must come before the retrained layer 'fc8'"):
        finetune.train_val(entry, options(tmp_path, freeze_through="fc8"))


def test_a_convolutional_classifier_is_renamed_with_its_consumers(tmp_path):
    entry = zoo.load_entry("squeezenet_1_1")
    net = finetune.train_val(entry, options(tmp_path, freeze_through="fire9/concat"))
    layers = {l.name: l for l in net.layer}
    assert layers["conv10_ft"].convolution_param.num_output == 5
    assert list(layers["relu_conv10"].top) == ["conv10_ft"]
    assert list(layers["pool10"].bottom) == ["conv10_ft"]
    assert list(layers["loss"].bottom) == ["pool10", "label"]
    frozen = [l for l in net.layer if l.type == "Convolution" and l.name != "conv10_ft"]
    assert all(p.lr_mult == 0 for l in frozen for p in l.param) and len(frozen) == 25
    db = write_lmdb(tmp_path / "db", 2, size=256)
    for layer in net.layer[:2]:
        layer.data_param.source = db
        layer.data_param.batch_size = 1
    module = NetModule(net, phase=protonet.TRAIN)
    assert module.blob_shapes[module.blob_names.index("pool10")] == (1, 5, 1, 1)


@pytest.mark.parametrize("name", [e.name for e in zoo.entries() if e.task == "classification"])
def test_every_entry_yields_a_finetuning_net(name, tmp_path):
    net = finetune.train_val(zoo.load_entry(name), options(tmp_path))
    types = [l.type for l in net.layer]
    assert types[:2] == ["Data", "Data"] and types[-2:] == ["Accuracy", "SoftmaxWithLoss"]
    assert "Input" not in types and "Softmax" not in types
    retrained = [l for l in net.layer if l.name.endswith("_ft")]
    assert len(retrained) == 1 and [p.lr_mult for p in retrained[0].param][0] == 10


def test_open_nsfw_finetunes_on_a_small_lmdb(open_nsfw_files, tmp_path):
    """Real pretrained weights: three iterations on the conformance images, converted by
    our own convert-imageset, run on the CPU and leave a snapshot with the new head."""
    from conformance import ROOT
    images = ROOT / "data" / "images"
    if not (images / "list.txt").is_file():
        pytest.skip(f"conformance images not found at {images}")
    weights, _ = open_nsfw_files
    lines = [l.split() for l in (images / "list.txt").read_text().splitlines() if l.strip()]
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{path} {int(label) % 2}\n" for path, label in lines))
    db = tmp_path / "db"
    assert run_cli("convert-imageset", "--resize_height", "256", "--resize_width", "256",
                   "--no-progress", f"{images}/", str(listing), str(db)) == 0
    out = tmp_path / "run"
    assert run_cli("finetune", "open_nsfw", "--train", str(db), "--val", str(db),
                   "--num-classes", "2", "--iterations", "3", "--batch-size", "2",
                   "--weights", str(weights), "--out", str(out)) == 0
    snapshots = sorted(out.rglob("*_iter_3.caffemodel"))
    assert snapshots, f"no final snapshot under {out}"
    tuned = protonet.Net(str(out / "train_val.prototxt"), str(snapshots[0]), protonet.TEST)
    assert any(p.shape[0] == 2 for blobs in tuned.params.values() for p in blobs)
