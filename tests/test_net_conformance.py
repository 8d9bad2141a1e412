"""Whole published nets: structure after upgrade and forward values against Caffe."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

import protonet
from conformance import ROOT, cases, folder

NETS = cases("nets")


def _rule():
    spec = importlib.util.spec_from_file_location("conformance_rule", folder("rule.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _net(name: str):
    case = folder("nets", name)
    golden = json.loads((case / "golden.json").read_text())
    net = protonet.Net(str(case / "net.prototxt"), protonet.TEST)
    for blob in golden["inputs"]:
        shape = list(net.blobs[blob].shape)
        net.blobs[blob].reshape(golden["batch"], *shape[1:])
    net.reshape()
    return net, golden


@pytest.mark.parametrize("name", NETS)
def test_structure_matches_caffe(name):
    net, golden = _net(name)
    assert net.inputs == golden["inputs"]
    assert net.outputs == golden["outputs"]
    assert [(n, list(b.shape)) for n, b in net.blobs.items()] == \
        [(n, list(s)) for n, s in golden["blobs"]]
    layers = [(l.name, l.type, [list(b.shape) for b in l.blobs]) for l in net.layers]
    assert layers == [(n, t, [list(s) for s in shapes]) for n, t, shapes in golden["layers"]]
    assert sum(p.numel() for p in net.module.parameters()) == golden["num_params"]


@pytest.mark.parametrize("name", NETS)
def test_forward_matches_caffe(name):
    rule = _rule()
    net, golden = _net(name)
    expected = np.load(folder("nets", name) / "golden.npz")
    for layer in net.layers:
        arrays = rule.param_arrays(layer.name, layer.type, [b.shape for b in layer.blobs])
        for blob, array in zip(layer.blobs, arrays):
            blob.data[...] = array
    for blob in golden["inputs"]:
        net.blobs[blob].data[...] = rule.rule_input(blob, net.blobs[blob].shape)
    with torch.no_grad():
        net.forward()
    for key in expected.files:
        kind, _, blob = key.partition("/")
        ours = net.blobs[blob].data
        theirs = expected[key]
        scale = max(float(expected[f"stats/{blob}"][2]), 1e-30)
        if kind == "sample":
            index = np.linspace(0, ours.size - 1, min(32, ours.size)).astype(np.int64)
            got = ours.ravel()[index]
        elif kind == "output":
            got = ours
        else:
            got = np.array([ours.mean(), ours.std(), np.abs(ours).max()])
        err = np.abs(np.asarray(got, np.float64) - theirs).max() / scale
        assert err <= 1e-3, f"{name} {key}: max error {err:.2e} of the blob's max |value|"
