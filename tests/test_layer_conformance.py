"""Every single-layer case Caffe ran: forward, params after forward, backward."""
from __future__ import annotations

import numpy as np
import pytest

import protonet
from conformance import assert_close, cases, folder

CASES = cases("layers")


def _phase(name: str) -> int:
    return protonet.TEST if name.endswith(("_test", "_global")) else protonet.TRAIN


def _load(name: str):
    case = folder("layers", name)
    data = np.load(case / "data.npz")
    net = protonet.Net(str(case / "net.prototxt"), str(case / "weights.caffemodel"),
                       _phase(name))
    for key in data.files:
        if key.startswith("input/"):
            blob = key[len("input/"):]
            if blob in net.inputs:
                net.blobs[blob].data[...] = data[key]
    return net, data


@pytest.mark.parametrize("name", CASES)
def test_layer_case(name):
    protonet.set_random_seed(1701)
    net, data = _load(name)
    for key in data.files:
        kind, _, rest = key.partition("/")
        if kind == "param":      # as loaded, before forward may change them
            assert_close(net.params["layer"][int(rest)].data, data[key], f"{name} {key}")
    net.forward()
    for key in data.files:
        kind, _, rest = key.partition("/")
        if kind == "output":
            assert_close(net.blobs[rest].data, data[key], f"{name} {key}")
        elif kind == "param_after_forward":
            assert_close(net.params["layer"][int(rest)].data, data[key], f"{name} {key}")
    top_diffs = {k[len("top_diff/"):]: data[k] for k in data.files if k.startswith("top_diff/")}
    if not top_diffs:
        return
    net.backward(**top_diffs)
    for key in data.files:
        kind, _, rest = key.partition("/")
        if kind == "bottom_diff":
            assert_close(net.blobs[rest].diff, data[key], f"{name} {key}")
        elif kind == "param_diff":
            assert_close(net.params["layer"][int(rest)].diff, data[key], f"{name} {key}")


def test_all_cases_present():
    folder("layers")
    assert len(CASES) >= 83
