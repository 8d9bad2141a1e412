"""pycaffe's `.data`/`.diff` off the CPU: host buffers kept in sync with the device
tensors, as Caffe's SyncedMemory (syncedmem.cpp) does behind pycaffe's arrays.

Every scenario runs twice: "synced" forces the host-buffer path on the CPU (the
"device" tensors are CPU tensors separate from the host buffers, so a missed sync
shows), "cuda" runs it for real (skipped without a GPU). Each result is checked
against the same net on the plain CPU path, where the arrays are views."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import protonet
from protonet import hostsync

NET = """
name: "synced" force_backward: true
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 3 dim: 2 dim: 6 dim: 6 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3
          weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""

DEVICES = ["synced", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))]


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch):
    if request.param == "synced":
        monkeypatch.setenv("PROTONET_PYCAFFE_SYNCED", "1")
        return "cpu"
    monkeypatch.delenv("PROTONET_PYCAFFE_SYNCED", raising=False)
    return "cuda"


@pytest.fixture
def files(tmp_path):
    net = tmp_path / "net.prototxt"
    net.write_text(NET)
    weights = tmp_path / "w.caffemodel"
    protonet.Net(str(net), protonet.TRAIN).save(str(weights))
    return str(net), str(weights)


def pair(files, device, monkeypatch):
    """(net on the device under test, the same net on the plain CPU path)."""
    net = protonet.Net(files[0], files[1], protonet.TRAIN, device=device)
    assert net._synced
    with monkeypatch.context() as m:
        m.delenv("PROTONET_PYCAFFE_SYNCED", raising=False)
        ref = protonet.Net(files[0], files[1], protonet.TRAIN)
    assert not ref._synced
    return net, ref


def feed(*nets, seed: int = 0) -> None:
    rs = np.random.RandomState(seed)
    x, label = rs.randn(3, 2, 6, 6).astype(np.float32), np.array([0, 3, 4], np.float32)
    for net in nets:
        net.blobs["data"].data[...] = x
        net.blobs["label"].data[...] = label


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_input_written_in_place_feeds_forward(files, device, monkeypatch):
    net, ref = pair(files, device, monkeypatch)
    for seed in (0, 1):                 # the second write must not be stale either
        feed(net, ref, seed=seed)
        out = net.forward()
        close(out["loss"], ref.forward()["loss"])
        close(net.blobs["ip"].data, ref.blobs["ip"].data)


def test_blob_assignment_and_forward_keywords(files, device, monkeypatch):
    net, ref = pair(files, device, monkeypatch)
    x = np.random.RandomState(3).randn(3, 2, 6, 6).astype(np.float32)
    net.blobs["data"].data = x
    ref.blobs["data"].data = x
    close(net.forward()["loss"], ref.forward()["loss"])
    close(net.forward(data=-x)["loss"], ref.forward(data=-x)["loss"])
    close(net.blobs["data"].data, -x)


def test_param_surgery_feeds_forward(files, device, monkeypatch):
    net, ref = pair(files, device, monkeypatch)
    feed(net, ref)
    net.forward()                       # the weights were read on the device already
    for n in (net, ref):
        n.params["conv"][0].data[...] *= -1
        n.params["conv"][1].data[...] = 0.5
        n.params["ip"][0].data = np.ones((5, 64), np.float32) * 0.01
    close(net.forward()["loss"], ref.forward()["loss"])
    close(net.blobs["conv"].data, ref.blobs["conv"].data)
    close(net.params["conv"][1].data, np.full(4, 0.5))


def test_held_array_sees_new_values_on_the_next_access(files, device, monkeypatch):
    net, ref = pair(files, device, monkeypatch)
    held = net.blobs["ip"].data
    held_w = net.params["ip"][0].data
    feed(net, ref)
    net.forward()
    again = net.blobs["ip"].data        # refreshed into the same host memory
    assert np.shares_memory(held, again)
    ref.forward()
    close(held, ref.blobs["ip"].data)
    net.params["ip"][0].data[...] = 2.0
    assert np.shares_memory(held_w, net.params["ip"][0].data)
    assert float(held_w[0, 0]) == 2.0


def test_diff_written_then_partial_backward(files, device, monkeypatch):
    net, ref = pair(files, device, monkeypatch)
    feed(net, ref)
    net.forward()
    ref.forward()
    top = np.random.RandomState(5).randn(3, 5).astype(np.float32)
    for n in (net, ref):
        n.clear_param_diffs()
        n.blobs["ip"].diff[...] = top
        got = n.backward(start="ip")
    back = net.backward(start="ip")     # again: from the same top diff, params add up
    ref_back = ref.backward(start="ip")
    close(back["data"], ref_back["data"])
    close(net.blobs["conv"].diff, ref.blobs["conv"].diff)
    close(net.params["conv"][0].diff, ref.params["conv"][0].diff)
    close(got["data"], back["data"])
    net.blobs["ip"].diff = np.zeros((3, 5), np.float32)
    close(net.backward(start="ip")["data"], np.zeros((3, 2, 6, 6)))


def test_param_diff_written_then_clear(files, device, monkeypatch):
    net, _ = pair(files, device, monkeypatch)
    feed(net)
    net.forward()
    net.backward()
    assert np.abs(net.params["conv"][0].diff).sum() > 0
    net.params["conv"][0].diff[...] = 7.0       # pushed before the clear, then zeroed
    net.clear_param_diffs()
    assert not net.params["conv"][0].diff.any()


def solvers(files, device, monkeypatch, tmp_path):
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(f'net: "{files[0]}" weights: "{files[1]}" base_lr: 0.1 '
                           'momentum: 0.9 lr_policy: "fixed" display: 0 '
                           'snapshot_after_train: false')
    solver = protonet.SGDSolver(str(solver_file), device)
    with monkeypatch.context() as m:
        m.delenv("PROTONET_PYCAFFE_SYNCED", raising=False)
        ref = protonet.SGDSolver(str(solver_file), "cpu")
    assert solver.net._synced and not ref.net._synced
    return solver, ref


def test_solver_step_after_param_edit(files, device, monkeypatch, tmp_path):
    solver, ref = solvers(files, device, monkeypatch, tmp_path)
    for s in (solver, ref):
        feed(s.net)
        s.step(1)
        s.net.params["ip"][0].data[...] = 0.02          # net surgery between steps
        s.net.params["conv"][1].data[...] *= 3
        feed(s.net, seed=2)
        s.step(1)
    close(solver.net.params["ip"][0].data, ref.net.params["ip"][0].data)
    close(solver.net.params["conv"][0].data, ref.net.params["conv"][0].data)
    close(solver.net.params["conv"][0].diff, ref.net.params["conv"][0].diff)
    close(solver.net.blobs["loss"].data, ref.net.blobs["loss"].data)


def test_solver_update_after_diff_edit_and_snapshot(files, device, monkeypatch, tmp_path):
    solver, ref = solvers(files, device, monkeypatch, tmp_path)
    for s in (solver, ref):
        feed(s.net)
        s.net.forward()
        s.net.clear_param_diffs()
        s.net.backward()
        s.net.params["ip"][1].diff[...] = 1.0           # a hand-made gradient
        s.apply_update()
    close(solver.net.params["ip"][1].data, ref.net.params["ip"][1].data)
    close(solver.net.params["ip"][0].data, ref.net.params["ip"][0].data)
    solver.net.params["ip"][1].data[...] = 4.0          # save writes the edit
    path = tmp_path / "edited.caffemodel"
    solver.net.save(str(path))
    ref.net.copy_from(str(path))
    close(ref.net.params["ip"][1].data, np.full(5, 4.0))


def test_copy_from_after_surgery_keeps_absent_layers(files, device, monkeypatch, tmp_path):
    net, _ = pair(files, device, monkeypatch)
    net.params["conv"][1].data[...] = 9.0
    net.params["ip"][1].data[...] = 9.0
    other = tmp_path / "other.prototxt"         # only "ip" in the file
    other.write_text(NET.replace('name: "conv"', 'name: "conv_other"'))
    saved = tmp_path / "ip.caffemodel"
    source = protonet.Net(str(other), protonet.TRAIN)
    source.params["ip"][1].data[...] = 1.5
    source.save(str(saved))
    net.copy_from(str(saved))
    close(net.params["ip"][1].data, np.full(5, 1.5))
    close(net.params["conv"][1].data, np.full(4, 9.0))


def test_reshape_gives_new_buffers(files, device, monkeypatch):
    net, ref = pair(files, device, monkeypatch)
    old = net.blobs["data"].data
    x = np.random.RandomState(7).randn(5, 2, 6, 6).astype(np.float32)
    for n in (net, ref):
        n.blobs["data"].reshape(5, 2, 6, 6)
        n.blobs["label"].reshape(5)
        n.blobs["data"].data[...] = x
        n.blobs["label"].data[...] = [0, 1, 2, 3, 4]
        n.forward()
    assert net.blobs["data"].data.shape == (5, 2, 6, 6) and old.shape == (3, 2, 6, 6)
    assert net.blobs["ip"].data.shape == (5, 5)
    close(net.blobs["ip"].data, ref.blobs["ip"].data)
    close(net.blobs["loss"].data, ref.blobs["loss"].data)


def test_only_shown_tensors_get_host_buffers(files, device, monkeypatch):
    net, _ = pair(files, device, monkeypatch)
    index = net.module.blob_index
    net.forward()
    net.backward()                      # they return the outputs and the input diffs
    returned = {(index["loss"], False), (index["data"], True), (index["label"], True)}
    assert set(net._copies) == returned     # nothing else shown, nothing else copied
    net.blobs["ip"].data
    assert set(net._copies) == returned | {(index["ip"], False)}
    net.forward()           # pushed before the pass, newer on the device after it
    assert net._copies[index["ip"], False].head == hostsync.AT_DEVICE
    assert hostsync._pending == {net._copies[index["loss"], False]}     # returned


def test_cpu_path_stays_zero_copy(files, monkeypatch):
    monkeypatch.delenv("PROTONET_PYCAFFE_SYNCED", raising=False)
    net = protonet.Net(files[0], protonet.TRAIN)
    data = net.blobs["data"].data
    weight = net.params["ip"][0].data
    assert np.shares_memory(data, net._value(net.module.blob_index["data"]).numpy())
    assert np.shares_memory(weight, net.params["ip"][0]._leaf.detach().numpy())
    assert not net._copies


def test_update_and_clear_reach_held_param_arrays(files, device, monkeypatch, tmp_path):
    """Caffe's Blob::Update runs where the data's head is: weights a script holds
    (read or written since the last pass) show the update, as in Caffe's own
    test_solver.test_apply_update; clear_param_diffs zeroes held diffs."""
    solver, _ = solvers(files, device, monkeypatch, tmp_path)
    net = solver.net
    data = net.layers[1].blobs[0].data
    data[...] = 0
    net.layers[1].blobs[0].diff[...] = 1
    solver.apply_update()               # lr 0.1, no momentum history yet
    close(data, np.full(data.shape, -0.1))
    feed(net)
    net.forward()
    net.backward()
    diff = net.params["conv"][0].diff
    assert np.abs(diff).max() > 0
    net.clear_param_diffs()
    assert not diff.any()


def test_reading_between_forward_and_backward_keeps_the_forward(tmp_path, device):
    """Reading blobs and weights between forward() and backward() copies them back
    unchanged: backward still uses the forward's Dropout mask, as Caffe's does."""
    path = tmp_path / "drop.prototxt"
    path.write_text("""force_backward: true
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 50 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 40 weight_filler { type: "gaussian" } } }
layer { name: "drop" type: "Dropout" bottom: "ip" top: "out" dropout_param { dropout_ratio: 0.5 } }
""")
    net = protonet.Net(str(path), protonet.TRAIN, device=device)
    net.blobs["data"].data[...] = 1.0
    out = net.forward()["out"].copy()
    net.blobs["ip"].data, net.params["ip"][0].data         # read only
    net.blobs["out"].diff[...] = 1.0
    grad = net.backward(start="drop", end="drop", diffs=["ip"])["ip"]
    np.testing.assert_array_equal(grad == 0, out == 0)      # the forward's mask
    assert (grad == 0).any() and (grad != 0).any()
