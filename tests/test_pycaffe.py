"""The pycaffe-style API: construction, blobs, params, forward/backward, weights files."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch

import protonet
from protonet.io.binary import read_binary, write_binary
from protonet.io.text import parse_text
from protonet.io.weights import read_weights
from protonet.proto import caffe_pb2

NET = """
name: "small"
%s
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 2 dim: 1 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 3 kernel_size: 3
          weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
        inner_product_param { num_output: 5
          weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "constant" value: 0.2 } } }
layer { name: "relu" type: "ReLU" bottom: "ip" top: "ip" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip" top: "ip2"
        inner_product_param { num_output: 4
          weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "constant" value: -0.1 } } }
layer { name: "prob" type: "Softmax" bottom: "ip2" top: "prob" }
"""

LAYERS = ["data", "conv", "pool", "ip", "relu", "ip2", "prob"]
BLOBS = ["data", "conv", "pool", "ip", "ip2", "prob"]


@pytest.fixture
def prototxt(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(NET % "")
    return str(path)


@pytest.fixture
def forced(tmp_path):
    path = tmp_path / "forced.prototxt"
    path.write_text(NET % "force_backward: true")
    return str(path)


def image(seed: int = 0, batch: int = 2) -> np.ndarray:
    return np.random.RandomState(seed).randn(batch, 1, 8, 8).astype(np.float32)


def torch_graph(net: protonet.Net, x: np.ndarray) -> dict[str, torch.Tensor]:
    """The small net, in plain torch, from the net's own params ('data' is a leaf)."""
    p = {name: [torch.from_numpy(b.data.copy()) for b in blobs]
         for name, blobs in net.params.items()}
    blobs = {"data": torch.from_numpy(x.copy()).requires_grad_(True)}
    blobs["conv"] = torch.nn.functional.conv2d(blobs["data"], p["conv"][0], p["conv"][1])
    blobs["pool"] = torch.nn.functional.max_pool2d(blobs["conv"], 2, 2, ceil_mode=True)
    flat = blobs["pool"].reshape(x.shape[0], -1)
    blobs["ip"] = torch.relu(flat @ p["ip"][0].t() + p["ip"][1])
    blobs["ip2"] = blobs["ip"] @ p["ip2"][0].t() + p["ip2"][1]
    blobs["prob"] = torch.softmax(blobs["ip2"], dim=1)
    return blobs


def reference_forward(net: protonet.Net, x: np.ndarray) -> np.ndarray:
    return torch_graph(net, x)["prob"].detach().numpy()


def reference_input_diff(net: protonet.Net, x: np.ndarray, top: str,
                         diff: np.ndarray) -> np.ndarray:
    blobs = torch_graph(net, x)
    blobs[top].backward(torch.from_numpy(diff))
    return blobs["data"].grad.numpy()


# --- construction ----------------------------------------------------------------------

def test_positional_and_keyword_forms(prototxt, tmp_path):
    torch.manual_seed(0)
    net = protonet.Net(prototxt, protonet.TEST)
    weights = str(tmp_path / "w.caffemodel")
    net.save(weights)
    x = image()
    expected = net.forward(data=x)["prob"]
    for other in (protonet.Net(prototxt, weights, protonet.TEST),
                  protonet.Net(prototxt, protonet.TEST, weights=weights),
                  protonet.Net(prototxt, phase=protonet.TEST, weights=weights),
                  protonet.Net(network_file=prototxt, phase=protonet.TEST, weights=weights),
                  protonet.Net(prototxt, weights=weights, phase=protonet.TEST, level=0,
                               stages=[])):
        assert other.phase == protonet.TEST
        np.testing.assert_array_equal(other.forward(data=x)["prob"], expected)


def test_phase_is_required(prototxt):
    with pytest.raises(TypeError):
        protonet.Net(prototxt)


def test_train_phase(prototxt):
    assert protonet.Net(prototxt, protonet.TRAIN).phase == protonet.TRAIN


STAGED = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "always" type: "ReLU" bottom: "data" top: "a" }
layer { name: "deep" type: "ReLU" bottom: "data" top: "b" include { min_level: 1 } }
layer { name: "extra" type: "ReLU" bottom: "data" top: "c" include { stage: "extra" } }
layer { name: "train" type: "ReLU" bottom: "data" top: "d" include { phase: TRAIN } }
"""


def _layers(net) -> list[str]:
    return [n for n in net._layer_names if not n.endswith("_split")]


def test_level_and_stages_keywords(tmp_path):
    path = tmp_path / "staged.prototxt"
    path.write_text(STAGED)
    assert _layers(protonet.Net(str(path), protonet.TEST)) == ["data", "always"]
    assert _layers(protonet.Net(str(path), protonet.TEST, level=1)) == \
        ["data", "always", "deep"]
    assert _layers(protonet.Net(str(path), protonet.TEST, stages=["extra"])) == \
        ["data", "always", "extra"]
    assert _layers(protonet.Net(str(path), phase=protonet.TRAIN, level=2,
                                stages=("extra",))) == ["data", "always", "deep", "extra",
                                                        "train"]


def test_level_argument_overrides_the_file_level(tmp_path):
    # Caffe's Net(file, phase, level, stages) always sets state.level (default 0).
    path = tmp_path / "leveled.prototxt"
    path.write_text("state { level: 3 }\n" + STAGED)
    assert _layers(protonet.Net(str(path), protonet.TEST)) == ["data", "always"]
    assert _layers(protonet.Net(str(path), protonet.TEST, level=3)) == \
        ["data", "always", "deep"]


def test_stages_in_the_file_state_are_kept(tmp_path):
    path = tmp_path / "staged.prototxt"
    path.write_text('state { stage: "extra" }\n' + STAGED)
    assert _layers(protonet.Net(str(path), protonet.TEST)) == ["data", "always", "extra"]


def test_net_from_a_net_parameter():
    param = parse_text(NET % "", caffe_pb2.NetParameter())
    net = protonet.Net(param, protonet.TEST)
    assert list(net.blobs) == BLOBS


def test_missing_prototxt_is_a_parse_error(tmp_path):
    with pytest.raises(protonet.ParseError) as info:
        protonet.Net(str(tmp_path / "absent.prototxt"), protonet.TEST)
    assert "absent.prototxt" in str(info.value)


# --- blobs, params, layers --------------------------------------------------------------

def test_blobs_params_and_layers_are_ordered(prototxt):
    net = protonet.Net(prototxt, protonet.TEST)
    assert isinstance(net.blobs, OrderedDict) and list(net.blobs) == BLOBS
    assert isinstance(net.params, OrderedDict) and list(net.params) == ["conv", "ip", "ip2"]
    assert list(net.layer_dict) == LAYERS
    assert [l.type for l in net.layers] == ["Input", "Convolution", "Pooling",
                                            "InnerProduct", "ReLU", "InnerProduct", "Softmax"]
    assert net.inputs == ["data"] and net.outputs == ["prob"]
    assert net.layer_dict["conv"].type == "Convolution"
    assert [b.shape for b in net.layer_dict["conv"].blobs] == [(3, 1, 3, 3), (3,)]
    assert net.layer_dict["relu"].blobs == []
    assert [[b.data.shape for b in blobs] for blobs in net.params.values()] == [
        [(3, 1, 3, 3), (3,)], [(5, 27), (5,)], [(4, 5), (4,)]]
    np.testing.assert_array_equal(net.params["conv"][1].data, np.full(3, 0.1, np.float32))


def test_blob_shapes_after_construction(prototxt):
    net = protonet.Net(prototxt, protonet.TEST)
    assert {n: b.shape for n, b in net.blobs.items()} == {
        "data": (2, 1, 8, 8), "conv": (2, 3, 6, 6), "pool": (2, 3, 3, 3), "ip": (2, 5),
        "ip2": (2, 4), "prob": (2, 4)}
    assert net.blobs["data"].data.shape == (2, 1, 8, 8)
    assert net.blobs["data"].data.dtype == np.float32
    assert (net.blobs["conv"].num, net.blobs["conv"].channels,
            net.blobs["conv"].height, net.blobs["conv"].width) == (2, 3, 6, 6)
    assert net.blobs["conv"].count == 216


def test_every_blob_has_data_of_its_shape_before_forward(prototxt):
    net = protonet.Net(prototxt, protonet.TEST)
    for name, blob in net.blobs.items():
        assert blob.data.shape == blob.shape, name


def test_writing_input_data_in_place_changes_the_next_forward(prototxt):
    net = protonet.Net(prototxt, protonet.TEST)
    x = image(1)
    net.blobs["data"].data[...] = x
    out = net.forward()
    np.testing.assert_allclose(out["prob"], reference_forward(net, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(net.blobs["prob"].data, out["prob"])
    first = out["prob"].copy()
    y = image(2)
    net.blobs["data"].data[...] = y
    again = net.forward()
    np.testing.assert_allclose(again["prob"], reference_forward(net, y), rtol=1e-5, atol=1e-6)
    assert not np.allclose(again["prob"], first)
    # pycaffe returns views of the output blobs: the first result shows the new values
    np.testing.assert_array_equal(out["prob"], again["prob"])


def test_blob_data_assignment(prototxt):
    net = protonet.Net(prototxt, protonet.TEST)
    x = image(3)
    net.blobs["data"].data = x
    np.testing.assert_array_equal(net.blobs["data"].data, x)
    np.testing.assert_allclose(net.forward()["prob"], reference_forward(net, x), rtol=1e-5,
                               atol=1e-6)


def test_writing_params_changes_the_output(prototxt):
    net = protonet.Net(prototxt, protonet.TEST)
    x = image(4)
    net.params["ip2"][0].data[...] = 0
    net.params["ip2"][1].data[...] = np.array([0, 0, np.log(2), 0], np.float32)
    out = net.forward(data=x)["prob"]
    np.testing.assert_allclose(out, np.tile([0.2, 0.2, 0.4, 0.2], (2, 1)), rtol=1e-5)
    net.layer_dict["ip2"].blobs[1].data[...] = 0
    np.testing.assert_allclose(net.forward(data=x)["prob"], np.full((2, 4), 0.25), rtol=1e-5)


def test_forward_with_inputs_returns_the_outputs(prototxt):
    net = protonet.Net(prototxt, protonet.TEST)
    x = image(5)
    out = net.forward(data=x)
    assert list(out) == ["prob"]
    np.testing.assert_allclose(out["prob"], reference_forward(net, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(net.blobs["data"].data, x)
    more = net.forward(blobs=["ip", "conv"], data=x)
    assert set(more) == {"prob", "ip", "conv"}
    np.testing.assert_array_equal(more["ip"], net.blobs["ip"].data)
    assert (more["ip"] >= 0).all()          # the in-place ReLU ran on 'ip'


def test_forward_rejects_unknown_inputs_and_wrong_shapes(prototxt):
    net = protonet.Net(prototxt, protonet.TEST)
    with pytest.raises(protonet.NetError):
        net.forward(image=image())
    with pytest.raises(protonet.NetError):
        net.forward(data=image(batch=3))


def test_forward_start_and_end(prototxt):
    net = protonet.Net(prototxt, protonet.TEST)
    x = image(6)
    full = net.forward(data=x)["prob"]
    partial = net.forward(end="pool")
    assert "pool" in partial
    np.testing.assert_array_equal(partial["pool"], net.blobs["pool"].data)
    rest = net.forward(start="ip")
    np.testing.assert_allclose(rest["prob"], full, rtol=1e-6)
    # Changing a middle blob and running from the next layer uses the new value.
    net.blobs["pool"].data[...] = 0
    from_ip = net.forward(start="ip")["prob"]
    w2, b2 = net.params["ip2"][0].data, net.params["ip2"][1].data
    hidden = np.maximum(net.params["ip"][1].data, 0)
    logits = hidden @ w2.T + b2
    expected = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(from_ip, np.tile(expected, (2, 1)), rtol=1e-5)


def test_backward_returns_input_diffs_with_force_backward(forced):
    net = protonet.Net(forced, protonet.TEST)
    x = image(7)
    net.forward(data=x)
    top = np.random.RandomState(8).randn(2, 4).astype(np.float32)
    diffs = net.backward(prob=top)
    assert list(diffs) == ["data"]
    expected = reference_input_diff(net, x, "prob", top)
    np.testing.assert_allclose(diffs["data"], expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(net.blobs["data"].diff, expected, rtol=1e-4, atol=1e-6)
    assert net.blobs["prob"].diff.shape == (2, 4)
    assert net.params["conv"][0].diff.shape == (3, 1, 3, 3)
    assert np.abs(net.params["conv"][0].diff).sum() > 0


def test_backward_without_force_backward_computes_nothing(prototxt):
    net = protonet.Net(prototxt, protonet.TEST)
    net.forward(data=image())
    diffs = net.backward(prob=np.ones((2, 4), np.float32))
    assert not diffs["data"].any()


def test_blob_reshape_then_net_reshape(prototxt):
    net = protonet.Net(prototxt, protonet.TEST)
    net.blobs["data"].reshape(5, 1, 8, 8)
    net.reshape()
    assert net.blobs["data"].shape == (5, 1, 8, 8)
    assert net.blobs["data"].data.shape == (5, 1, 8, 8)
    assert net.blobs["prob"].shape == (5, 4)
    assert net.blobs["conv"].shape == (5, 3, 6, 6)
    x = image(9, batch=5)
    out = net.forward(data=x)["prob"]
    assert out.shape == (5, 4)
    np.testing.assert_allclose(out, reference_forward(net, x), rtol=1e-5, atol=1e-6)


def test_net_reshape_after_a_forward_updates_every_blob(prototxt):
    net = protonet.Net(prototxt, protonet.TEST)
    net.forward(data=image())
    net.blobs["data"].reshape(3, 1, 8, 8)
    net.reshape()
    assert net.blobs["prob"].shape == (3, 4)
    assert net.blobs["conv"].data.shape == (3, 3, 6, 6)


def test_reshape_to_a_new_spatial_size(tmp_path):
    path = tmp_path / "conv.prototxt"
    path.write_text("""
    layer { name: "data" type: "Input" top: "data"
            input_param { shape { dim: 1 dim: 2 dim: 5 dim: 5 } } }
    layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
            convolution_param { num_output: 4 kernel_size: 3 pad: 1 stride: 2 } }
    """)
    net = protonet.Net(str(path), protonet.TEST)
    assert net.blobs["conv"].shape == (1, 4, 3, 3)
    net.blobs["data"].reshape(2, 2, 9, 7)
    net.reshape()
    assert net.blobs["conv"].shape == (2, 4, 5, 4)
    assert net.forward(data=np.ones((2, 2, 9, 7)))["conv"].shape == (2, 4, 5, 4)


# --- weights files ------------------------------------------------------------------------

def test_save_then_load_gives_identical_outputs(prototxt, tmp_path):
    torch.manual_seed(1)
    net = protonet.Net(prototxt, protonet.TEST)
    path = str(tmp_path / "trained.caffemodel")
    net.save(path)
    x = image(10)
    expected = net.forward(data=x)["prob"]
    torch.manual_seed(2)
    fresh = protonet.Net(prototxt, protonet.TEST)
    assert not np.array_equal(fresh.forward(data=x)["prob"], expected)
    loaded = protonet.Net(prototxt, path, protonet.TEST)
    np.testing.assert_array_equal(loaded.forward(data=x)["prob"], expected)
    for name in net.params:
        for a, b in zip(net.params[name], loaded.params[name]):
            np.testing.assert_array_equal(a.data, b.data)


def test_saved_caffemodel_lists_every_layer_like_net_to_proto(prototxt, tmp_path):
    net = protonet.Net(prototxt, protonet.TEST)
    path = str(tmp_path / "m.caffemodel")
    net.save(path)
    saved = read_binary(path, caffe_pb2.NetParameter())
    assert saved.name == "small"
    assert [l.name for l in saved.layer] == LAYERS
    assert all(l.phase == caffe_pb2.TEST for l in saved.layer)
    conv = saved.layer[1]
    assert list(conv.blobs[0].shape.dim) == [3, 1, 3, 3]
    np.testing.assert_array_equal(np.asarray(conv.blobs[0].data, np.float32),
                                  net.params["conv"][0].data.ravel())
    assert not conv.blobs[0].diff


def _file_with(net_name: str, layers: dict[str, list[np.ndarray]]) -> caffe_pb2.NetParameter:
    param = caffe_pb2.NetParameter(name=net_name)
    for name, arrays in layers.items():
        lp = param.layer.add(name=name, type="InnerProduct")
        for a in arrays:
            blob = lp.blobs.add()
            blob.shape.dim.extend(a.shape)
            blob.data.extend(a.ravel().tolist())
    return param


def test_copy_from_keeps_fillers_of_absent_layers_and_ignores_unknown_ones(prototxt,
                                                                          tmp_path):
    net = protonet.Net(prototxt, protonet.TEST)
    conv_before = [b.data.copy() for b in net.params["conv"]]
    ip_before = [b.data.copy() for b in net.params["ip"]]
    w = np.arange(20, dtype=np.float32).reshape(4, 5)
    b = np.array([1, 2, 3, 4], np.float32)
    path = str(tmp_path / "part.caffemodel")
    write_binary(path, _file_with("other", {
        "ip2": [w, b], "not_in_net": [np.ones((7, 7), np.float32)]}))
    net.copy_from(path)
    np.testing.assert_array_equal(net.params["ip2"][0].data, w)
    np.testing.assert_array_equal(net.params["ip2"][1].data, b)
    for before, blob in zip(conv_before, net.params["conv"]):
        np.testing.assert_array_equal(blob.data, before)
    for before, blob in zip(ip_before, net.params["ip"]):
        np.testing.assert_array_equal(blob.data, before)


def test_copy_from_shape_mismatch_says_to_rename_the_layer(prototxt, tmp_path):
    net = protonet.Net(prototxt, protonet.TEST)
    path = str(tmp_path / "bad.caffemodel")
    write_binary(path, _file_with("other", {
        "ip2": [np.ones((10, 5), np.float32), np.ones(10, np.float32)]}))
    with pytest.raises(protonet.WeightsError) as info:
        net.copy_from(path)
    message = str(info.value)
    assert path in message and "'ip2'" in message
    assert "[10, 5]" in message and "[4, 5]" in message
    assert "rename the layer" in message
    with pytest.raises(protonet.WeightsError):
        protonet.Net(prototxt, path, protonet.TEST)


def test_copy_from_blob_count_mismatch(prototxt, tmp_path):
    net = protonet.Net(prototxt, protonet.TEST)
    path = str(tmp_path / "bad.caffemodel")
    write_binary(path, _file_with("other", {"ip2": [np.ones((4, 5), np.float32)]}))
    with pytest.raises(protonet.WeightsError) as info:
        net.copy_from(path)
    assert "'ip2'" in str(info.value)


def test_copy_from_accepts_legacy_4d_blob_shapes(prototxt, tmp_path):
    net = protonet.Net(prototxt, protonet.TEST)
    param = caffe_pb2.NetParameter()
    lp = param.layer.add(name="ip2", type="InnerProduct")
    w = np.random.RandomState(0).randn(4, 5).astype(np.float32)
    lp.blobs.add(num=1, channels=1, height=4, width=5).data.extend(w.ravel().tolist())
    lp.blobs.add(num=1, channels=1, height=1, width=4).data.extend([0, 1, 2, 3])
    path = str(tmp_path / "legacy.caffemodel")
    write_binary(path, param)
    net.copy_from(path)
    np.testing.assert_array_equal(net.params["ip2"][0].data, w)
    np.testing.assert_array_equal(net.params["ip2"][1].data, [0, 1, 2, 3])


def test_several_weight_files_apply_in_order(prototxt, tmp_path):
    first, second = str(tmp_path / "1.caffemodel"), str(tmp_path / "2.caffemodel")
    ones, twos = np.ones((4, 5), np.float32), np.full((4, 5), 2, np.float32)
    write_binary(first, _file_with("a", {"ip2": [ones, np.ones(4, np.float32)],
                                         "ip": [np.ones((5, 27), np.float32),
                                                np.ones(5, np.float32)]}))
    write_binary(second, _file_with("b", {"ip2": [twos, np.zeros(4, np.float32)]}))
    net = protonet.Net(prototxt, protonet.TEST, weights=[first, second])
    np.testing.assert_array_equal(net.params["ip2"][0].data, twos)
    np.testing.assert_array_equal(net.params["ip"][0].data, 1)
    again = protonet.Net(prototxt, protonet.TEST)
    again.copy_from(second)
    again.copy_from(first)
    np.testing.assert_array_equal(again.params["ip2"][0].data, ones)


def test_hdf5_weights_round_trip(prototxt, tmp_path):
    pytest.importorskip("h5py")
    torch.manual_seed(3)
    net = protonet.Net(prototxt, protonet.TEST)
    path = str(tmp_path / "w.h5")
    net.save(path)
    import h5py
    with h5py.File(path, "r") as f:
        assert sorted(f["data"]) == sorted(LAYERS)
        assert sorted(f["data"]["conv"]) == ["0", "1"]
        assert f["data"]["conv"]["0"].shape == (3, 1, 3, 3)
    x = image(11)
    expected = net.forward(data=x)["prob"]
    torch.manual_seed(4)
    loaded = protonet.Net(prototxt, path, protonet.TEST)
    np.testing.assert_array_equal(loaded.forward(data=x)["prob"], expected)


SHARED = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        param { name: "w" } param { name: "b1" }
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" }
                              bias_filler { type: "gaussian" } } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        param { name: "w" } param { name: "b2" }
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" }
                              bias_filler { type: "gaussian" } } }
"""


def test_hdf5_round_trip_with_a_shared_first_param(tmp_path):
    # Caffe's ToHDF5 writes only owned params, so ip2's group holds dataset "1"
    # alone; CopyTrainedLayersFromHDF5 loads it into param 1 and skips the shared 0.
    pytest.importorskip("h5py")
    prototxt = tmp_path / "shared.prototxt"
    prototxt.write_text(SHARED)
    torch.manual_seed(5)
    net = protonet.Net(str(prototxt), protonet.TEST)
    path = str(tmp_path / "shared.h5")
    net.save(path)
    import h5py
    with h5py.File(path, "r") as f:
        assert sorted(f["data"]["ip1"]) == ["0", "1"]
        assert sorted(f["data"]["ip2"]) == ["1"]
    x = np.random.RandomState(0).randn(2, 3).astype(np.float32)
    expected = net.forward(data=x)["ip2"]
    torch.manual_seed(6)
    loaded = protonet.Net(str(prototxt), path, protonet.TEST)
    np.testing.assert_array_equal(loaded.params["ip2"][1].data, net.params["ip2"][1].data)
    np.testing.assert_array_equal(loaded.forward(data=x)["ip2"], expected)


def test_hdf5_missing_unshared_param_is_an_error(tmp_path):
    h5py = pytest.importorskip("h5py")
    prototxt = tmp_path / "shared.prototxt"
    prototxt.write_text(SHARED)
    net = protonet.Net(str(prototxt), protonet.TEST)
    path = str(tmp_path / "bad.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("data/ip1/0", data=np.ones((3, 3), np.float32))   # no bias
    with pytest.raises(protonet.WeightsError) as info:
        net.copy_from(path)
    assert "'ip1'" in str(info.value)


def test_hdf5_shape_mismatch_says_to_rename(prototxt, tmp_path):
    h5py = pytest.importorskip("h5py")
    net = protonet.Net(prototxt, protonet.TEST)
    path = str(tmp_path / "bad.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("data/ip2/0", data=np.ones((9, 5), np.float32))
        f.create_dataset("data/ip2/1", data=np.ones(9, np.float32))
    with pytest.raises(protonet.WeightsError) as info:
        net.copy_from(path)
    assert "rename the layer" in str(info.value)


def test_hdf5_weights_detected_by_content_like_caffe(prototxt, tmp_path):
    # Caffe's CopyTrainedLayersFrom asks H5Fis_hdf5, not the file name.
    pytest.importorskip("h5py")
    torch.manual_seed(7)
    net = protonet.Net(prototxt, protonet.TEST)
    h5 = tmp_path / "w.h5"
    net.save(str(h5))
    disguised = tmp_path / "w.caffemodel"
    disguised.write_bytes(h5.read_bytes())
    loaded = protonet.Net(prototxt, str(disguised), protonet.TEST)
    for name in net.params:
        for a, b in zip(net.params[name], loaded.params[name]):
            np.testing.assert_array_equal(a.data, b.data)


@pytest.mark.parametrize("shared", ["weight", "bias"])
def test_hdf5_with_shared_params_under_another_name(tmp_path, shared):
    pytest.importorskip("h5py")
    prototxt = tmp_path / "shared.prototxt"
    text = SHARED if shared == "weight" else SHARED.replace(
        'param { name: "w" } param { name: "b1" }', 'param { } param { name: "b" }').replace(
        'param { name: "w" } param { name: "b2" }', 'param { } param { name: "b" }')
    prototxt.write_text(text)
    torch.manual_seed(10)
    net = protonet.Net(str(prototxt), protonet.TEST)
    h5 = tmp_path / "w.h5"
    net.save(str(h5))
    disguised = tmp_path / "w.caffemodel"
    disguised.write_bytes(h5.read_bytes())
    x = np.random.RandomState(0).randn(2, 3).astype(np.float32)
    expected = net.forward(data=x)["ip2"]
    torch.manual_seed(11)
    loaded = protonet.Net(str(prototxt), str(disguised), protonet.TEST)
    np.testing.assert_array_equal(loaded.forward(data=x)["ip2"], expected)


def test_bad_weight_files_are_parse_errors(prototxt, tmp_path):
    net = protonet.Net(prototxt, protonet.TEST)
    for name, content in (("junk.caffemodel", b"\xff" * 40), ("junk.h5", b"not hdf5")):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(protonet.ParseError) as info:
            net.copy_from(str(path))
        assert str(path) in str(info.value)
    with pytest.raises(protonet.ParseError):
        net.copy_from(str(tmp_path / "absent.caffemodel"))


def test_v1_caffemodel_loads_by_name(prototxt, tmp_path):
    old = caffe_pb2.NetParameter(name="old")
    V1 = caffe_pb2.V1LayerParameter
    conv = old.layers.add(name="conv", type=V1.CONVOLUTION)
    conv.bottom.append("data")
    conv.top.append("conv")
    conv.convolution_param.num_output = 3
    w = np.random.RandomState(1).randn(3, 1, 3, 3).astype(np.float32)
    conv.blobs.add(num=3, channels=1, height=3, width=3).data.extend(w.ravel().tolist())
    conv.blobs.add(num=1, channels=1, height=1, width=3).data.extend([5, 6, 7])
    relu = old.layers.add(name="relu_old", type=V1.RELU)
    relu.bottom.append("conv")
    relu.top.append("conv")
    ip2 = old.layers.add(name="ip2", type=V1.INNER_PRODUCT)
    ip2.blobs.add(num=1, channels=1, height=4, width=5).data.extend([0.5] * 20)
    ip2.blobs.add(num=1, channels=1, height=1, width=4).data.extend([1, 2, 3, 4])
    path = str(tmp_path / "v1.caffemodel")
    write_binary(path, old)
    with pytest.warns(UserWarning):
        upgraded = read_weights(path)
    assert [l.name for l in upgraded.layer] == ["conv", "relu_old", "ip2"]
    with pytest.warns(UserWarning):
        net = protonet.Net(prototxt, path, protonet.TEST)
    np.testing.assert_array_equal(net.params["conv"][0].data, w)
    np.testing.assert_array_equal(net.params["conv"][1].data, [5, 6, 7])
    np.testing.assert_array_equal(net.params["ip2"][0].data, np.full((4, 5), 0.5))
    np.testing.assert_array_equal(net.params["ip2"][1].data, [1, 2, 3, 4])


PERMISSIVE = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 6 } } }
layer { name: "a" type: "InnerProduct" bottom: "data" top: "a" param { name: "w" }
        inner_product_param { num_output: 4 bias_term: false
                              weight_filler { type: "gaussian" } } }
layer { name: "r" type: "Reshape" bottom: "data" top: "r"
        reshape_param { shape { dim: 2 dim: 3 dim: 2 } } }
layer { name: "b" type: "InnerProduct" bottom: "r" top: "b"
        param { name: "w" share_mode: PERMISSIVE }
        inner_product_param { num_output: 12 axis: 2 bias_term: false } }
"""


@pytest.mark.parametrize("suffix", [".caffemodel", ".h5"])
def test_permissive_shared_weights_save_and_load(tmp_path, suffix):
    if suffix == ".h5":
        pytest.importorskip("h5py")
    prototxt = tmp_path / "permissive.prototxt"
    prototxt.write_text(PERMISSIVE)
    torch.manual_seed(8)
    net = protonet.Net(str(prototxt), protonet.TEST)
    assert net.params["a"][0].shape == (4, 6) and net.params["b"][0].shape == (12, 2)
    np.testing.assert_array_equal(net.params["b"][0].data.ravel(),
                                  net.params["a"][0].data.ravel())
    path = str(tmp_path / ("w" + suffix))
    net.save(path)
    if suffix == ".caffemodel":
        saved = read_binary(path, caffe_pb2.NetParameter())
        shapes = {l.name: [list(b.shape.dim) for b in l.blobs] for l in saved.layer}
        assert shapes["a"] == [[4, 6]] and shapes["b"] == [[12, 2]]
    x = np.random.RandomState(2).randn(2, 6).astype(np.float32)
    expected = net.forward(data=x)
    torch.manual_seed(9)
    loaded = protonet.Net(str(prototxt), path, protonet.TEST)
    out = loaded.forward(data=x)
    for name in ("a", "b"):
        np.testing.assert_array_equal(out[name], expected[name])


LOSS_NET = """
layer { name: "data" type: "Input" top: "data" top: "target"
        input_param { shape { dim: 3 dim: 4 } shape { dim: 3 dim: 2 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "target" top: "loss"
        loss_weight: 2 }
"""


def test_loss_net_forward_and_backward():
    if "EuclideanLoss" not in protonet.layers.registered_types():
        pytest.skip("EuclideanLoss is not registered yet")
    net = protonet.Net(parse_text(LOSS_NET, caffe_pb2.NetParameter()), protonet.TRAIN)
    rs = np.random.RandomState(0)
    x, t = rs.randn(3, 4).astype(np.float32), rs.randn(3, 2).astype(np.float32)
    out = net.forward(data=x, target=t)
    w, b = net.params["ip"][0].data.copy(), net.params["ip"][1].data.copy()
    r = x @ w.T + b - t
    assert list(out) == ["loss"] and out["loss"].shape == ()
    # The loss blob holds the layer's own loss; loss_weight scales only the gradient.
    np.testing.assert_allclose(out["loss"], (r ** 2).sum() / 2 / 3, rtol=1e-5)
    diffs = net.backward()
    assert set(diffs) == {"data", "target"}
    assert not diffs["data"].any()          # no force_backward: inputs get no diff
    np.testing.assert_allclose(net.blobs["ip"].diff, 2 * r / 3, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.params["ip"][0].diff, 2 * r.T @ x / 3, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(net.params["ip"][1].diff, 2 * r.sum(0) / 3, rtol=1e-5,
                               atol=1e-6)
    # As in Caffe, param diffs accumulate over backward passes until cleared.
    net.forward(data=x, target=t)
    net.backward()
    np.testing.assert_allclose(net.params["ip"][0].diff, 4 * r.T @ x / 3, rtol=1e-5,
                               atol=1e-6)


def test_backward_uses_diffs_written_into_top_blobs(forced):
    net = protonet.Net(forced, protonet.TEST)
    x = image(12)
    g = np.random.RandomState(13).randn(2, 4).astype(np.float32)
    expected = reference_input_diff(net, x, "prob", g)
    net.forward(data=x)
    net.blobs["prob"].diff[...] = g
    np.testing.assert_allclose(net.backward()["data"], expected, rtol=1e-5, atol=1e-7)


def test_backward_from_a_middle_layer(forced):
    net = protonet.Net(forced, protonet.TEST)
    x = image(14)
    g = np.random.RandomState(15).randn(2, 4).astype(np.float32)
    expected = reference_input_diff(net, x, "ip2", g)
    net.forward(data=x, end="ip2")
    net.blobs["ip2"].diff[...] = g
    np.testing.assert_allclose(net.backward(start="ip2")["data"], expected, rtol=1e-5,
                               atol=1e-7)
