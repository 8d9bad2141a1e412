"""Ensembles (`protonet test --ensemble`, protonet.ensemble): members, their mean, and
the heads on averaged predictions, against numpy; globs of snapshots; Caffe's meaning of
several --weights without --ensemble."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import protonet
from protonet.cli import main as cli_main
from protonet.ensemble import Ensemble, expand_weights
from protonet.errors import ProtonetError
from protonet.net.module import NetModule
from protonet.io.upgrade import read_net
from protonet.proto import caffe_pb2

from test_solver import CLASSES, work  # noqa: F401  (the tiny HDF5 net and its data)

# The tiny net plus an Accuracy on a Softmax (its bottom is already a probability:
# averaged as it is) and a plain Softmax output (averaged over the members).
PROB_LAYERS = """
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" include { phase: TEST } }
layer { name: "prob_acc" type: "Accuracy" bottom: "prob" bottom: "label" top: "prob_acc"
  include { phase: TEST } }
layer { name: "out" type: "Softmax" bottom: "ip" top: "out" include { phase: TEST } }
"""
MEMBERS = 3


def _data():
    import h5py
    with h5py.File("data.h5", "r") as f:
        return f["data"][...], f["label"][...].astype(int)


@pytest.fixture
def members(work):
    """Three weights files of the tiny net with different random weights: (paths, W, b)."""
    Path("weights").mkdir()
    net = protonet.Net("net.prototxt", protonet.TEST)
    rng = np.random.default_rng(5)
    paths, ws, bs = [], [], []
    for k in range(MEMBERS):
        w = rng.normal(size=net.params["ip"][0].data.shape).astype(np.float32)
        b = rng.normal(size=CLASSES).astype(np.float32)
        net.params["ip"][0].data[...] = w
        net.params["ip"][1].data[...] = b
        path = f"weights/tiny_iter_{(k + 1) * 5}.caffemodel"     # 5, 10, 15
        net.save(path)
        paths.append(path)
        ws.append(w)
        bs.append(b)
    return paths, ws, bs


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _expected(ws, bs, mean: str) -> dict:
    x, y = _data()
    logits = [x @ w.T + b for w, b in zip(ws, bs)]
    probs = [_softmax(z) for z in logits]
    rows = np.arange(len(y))
    members = [{"acc": float((z.argmax(1) == y).mean()),
                "loss": float(-np.log(p[rows, y]).mean())} for z, p in zip(logits, probs)]
    avg_p = np.mean(probs, 0)
    if mean == "prob":
        ens_p = avg_p
    else:
        ens_p = _softmax(np.mean(logits, 0))
    return {"members": members, "acc": float((ens_p.argmax(1) == y).mean()),
            "loss": float(-np.log(ens_p[rows, y]).mean()),
            "prob_acc": float((avg_p.argmax(1) == y).mean()), "prob": avg_p}


def _module(text: str) -> NetModule:
    Path("test_net.prototxt").write_text(text)
    return NetModule(read_net("test_net.prototxt"), phase=caffe_pb2.TEST)


@pytest.mark.parametrize("mean", ["prob", "score"])
def test_members_mean_and_ensemble_against_numpy(members, mean):
    paths, ws, bs = members
    expected = _expected(ws, bs, mean)
    scorer = Ensemble(_module(Path("net.prototxt").read_text() + PROB_LAYERS), paths, mean)
    result = scorer.run(3, log_batches=False)          # 3 batches of 4: all 12 rows
    for got, want in zip(result.members, expected["members"]):
        assert got["acc"] == pytest.approx(want["acc"])
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert result.member_mean["acc"] == pytest.approx(
        np.mean([m["acc"] for m in expected["members"]]))
    assert result.ensemble["acc"] == pytest.approx(expected["acc"])
    assert result.ensemble["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert result.loss == pytest.approx(expected["loss"], rel=1e-5)
    # A Softmax output's probabilities are averaged as they are, in either mode.
    assert result.ensemble["prob_acc"] == pytest.approx(expected["prob_acc"])
    batches = expected["prob"].reshape(3, -1).mean(0)      # Caffe's per-element means
    np.testing.assert_allclose(result.ensemble["out"], batches, rtol=1e-5)


def test_heads_and_predictions_are_found_through_splits(members):
    paths, _, _ = members
    scorer = Ensemble(_module(Path("net.prototxt").read_text()), paths)
    module = scorer.module
    names = {module.layer_names[module.steps[k].layer] for k in scorer.heads}
    assert names == {"loss", "acc"}
    predictions = {module.blob_names[b]: axis for b, axis in scorer.predictions.items()}
    assert all(name.startswith("ip") for name in predictions)      # ip's split tops
    assert set(predictions.values()) == {1}
    assert scorer.sources == 1


def test_a_layer_one_file_lacks_keeps_its_filler(members, tmp_path):
    paths, _, _ = members
    empty = protonet.caffe_pb2.NetParameter(name="nothing")
    (tmp_path / "empty.caffemodel").write_bytes(empty.SerializeToString())
    torch.manual_seed(0)
    module = _module(Path("net.prototxt").read_text())
    filler = [p.detach().clone() for p in module.parameters()]
    scorer = Ensemble(module, [paths[0], str(tmp_path / "empty.caffemodel")])
    for got, want in zip(scorer.members[1], filler):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(scorer.members[0][0], filler[0])


def test_globs_sort_by_iteration_and_skip_ema_files(members):
    paths, _, _ = members
    Path("weights/tiny_iter_10.ema.caffemodel").write_bytes(Path(paths[1]).read_bytes())
    assert expand_weights("weights/tiny_iter_*.caffemodel") == paths     # 5, 10, 15
    assert expand_weights("weights/*.ema.caffemodel") == ["weights/tiny_iter_10.ema.caffemodel"]
    assert expand_weights(f"{paths[2]}, weights/tiny_iter_1?.caffemodel") == \
        [paths[2], paths[1], paths[2]]
    with pytest.raises(ProtonetError, match="no file matches"):
        expand_weights("weights/none_*.caffemodel")


def _final_scores(text: str) -> dict:
    """The `name = value` lines after the last 'Loss:' line of a test log."""
    tail = text[text.rindex("Loss: "):]
    return {name: float(value)
            for name, value in re.findall(r"^\S+ \S+ (\w+) = ([-+\d.e]+)", tail, re.M)}


def test_test_command_ensemble_and_caffes_comma_meaning(members, capsys):
    paths, ws, bs = members
    expected = _expected(ws, bs, "prob")
    assert cli_main(["test", "--model", "net.prototxt", "--weights",
                     "weights/tiny_iter_*.caffemodel", "--ensemble", "--iterations", "3"]) == 0
    err = capsys.readouterr().err
    assert "Members' mean: acc = " in err and err.count("Member ") == MEMBERS
    scores = _final_scores(err)
    assert scores["acc"] == pytest.approx(expected["acc"], abs=1e-6)
    assert scores["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    # Without --ensemble, several files are copied in order: the last one wins.
    assert cli_main(["test", "--model", "net.prototxt", "--weights", ",".join(paths),
                     "--iterations", "3"]) == 0
    last = _final_scores(capsys.readouterr().err)
    assert last["acc"] == pytest.approx(expected["members"][-1]["acc"], abs=1e-6)
    assert last["loss"] == pytest.approx(expected["members"][-1]["loss"], rel=1e-5)
    # ... and a pattern is a mistake there.
    assert cli_main(["test", "--model", "net.prototxt", "--weights",
                     "weights/tiny_iter_*.caffemodel", "--iterations", "1"]) == 1
    assert "patterns are expanded only with --ensemble" in capsys.readouterr().err
