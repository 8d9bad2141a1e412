"""pycaffe's semantics that scripts depend on, checked against Caffe's documented
behaviour (net.hpp/net.cpp, pycaffe.py, python/caffe/test): blob views that stay
valid, in-place diffs, Backward from stored blobs, partial backward, and the
exception types scripts catch. Each reference is computed independently in torch."""
from __future__ import annotations

import pickle
import textwrap

import h5py
import numpy as np
import pytest
import torch

import protonet
from protonet.errors import NetError, ProtonetError

INPLACE = """
name: "inplace" %s
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 3 dim: 2 dim: 6 dim: 6 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3
          weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss"
        loss_weight: 2 }
"""


@pytest.fixture
def net_file(tmp_path):
    def make(force: bool = True) -> str:
        path = tmp_path / ("forced.prototxt" if force else "net.prototxt")
        path.write_text(INPLACE % ("force_backward: true" if force else ""))
        return str(path)
    return make


def feed(net, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rs = np.random.RandomState(seed)
    x = rs.randn(3, 2, 6, 6).astype(np.float32)
    label = np.array([0, 3, 4], np.float32)
    net.blobs["data"].data[...] = x
    net.blobs["label"].data[...] = label
    return x, label


def reference(net, x, label, weight: float = 2.0) -> dict[str, torch.Tensor]:
    """The same net in plain torch, with the conv output's gradient kept."""
    w, b = (torch.from_numpy(p.data.copy()) for p in net.params["conv"])
    w_ip, b_ip = (torch.from_numpy(p.data.copy()) for p in net.params["ip"])
    data = torch.from_numpy(x).requires_grad_(True)
    conv = torch.nn.functional.conv2d(data, w, b)
    conv.retain_grad()
    relu = torch.relu(conv)
    ip = relu.reshape(3, -1) @ w_ip.t() + b_ip
    loss = torch.nn.functional.cross_entropy(ip, torch.from_numpy(label).long())
    (loss * weight).backward()
    return {"data": data, "conv": conv, "relu": relu, "ip": ip, "loss": loss}


# --- 1. blob views stay valid ------------------------------------------------------------

def test_arrays_held_across_forward_and_backward_see_new_values(net_file):
    net = protonet.Net(net_file(), protonet.TRAIN)
    ip_data, ip_diff = net.blobs["ip"].data, net.blobs["ip"].diff
    data_diff = net.blobs["data"].diff
    x, label = feed(net, 1)
    net.forward()
    net.backward()
    ref = reference(net, x, label)
    np.testing.assert_allclose(ip_data, ref["ip"].detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(data_diff, ref["data"].grad.numpy(), rtol=1e-4, atol=1e-6)
    assert np.abs(ip_diff).sum() > 0
    x2, _ = feed(net, 2)
    net.forward()
    ref2 = reference(net, x2, label)
    np.testing.assert_allclose(ip_data, ref2["ip"].detach().numpy(), rtol=1e-5, atol=1e-5)


def test_forward_returns_views_of_the_output_blobs(net_file):
    net = protonet.Net(net_file(), protonet.TRAIN)
    feed(net, 3)
    out = net.forward(blobs=["ip"])
    assert np.shares_memory(out["loss"], net.blobs["loss"].data)
    assert np.shares_memory(out["ip"], net.blobs["ip"].data)
    before = float(out["loss"])
    feed(net, 4)
    net.forward()
    assert float(out["loss"]) == float(net.blobs["loss"].data) != before


def test_writing_through_a_held_view_feeds_the_next_forward(net_file):
    net = protonet.Net(net_file(), protonet.TRAIN)
    data = net.blobs["data"].data
    feed(net, 5)
    net.forward()
    data[...] = 0                          # the view still is the input blob's memory
    net.forward()
    expected = np.maximum(net.params["conv"][1].data, 0)      # conv of zeros: the bias
    np.testing.assert_allclose(net.blobs["conv"].data,
                               np.broadcast_to(expected[None, :, None, None], (3, 4, 4, 4)))


def test_reshape_may_reallocate(net_file):
    net = protonet.Net(net_file(), protonet.TRAIN)
    net.blobs["data"].reshape(5, 2, 6, 6)
    net.blobs["label"].reshape(5)
    net.forward()                          # Caffe's layers reshape in Forward
    assert net.blobs["conv"].data.shape == (5, 4, 4, 4)
    assert net.blobs["ip"].diff.shape == (5, 5)


# A 4x3 -> 2 classifier on DummyData with a loss: a solver's smallest train net.
TINY_TRAIN_NET = """
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 }
    data_filler { type: "gaussian" } data_filler { type: "constant" } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def test_solver_net_views_stay_valid_across_steps(tmp_path):
    net = tmp_path / "net.prototxt"
    net.write_text(TINY_TRAIN_NET)
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(f'net: "{net}" base_lr: 0.1 lr_policy: "fixed" max_iter: 5 '
                           'display: 0 snapshot_after_train: false')
    solver = protonet.SGDSolver(str(solver_file))
    loss, ip = solver.net.blobs["loss"].data, solver.net.blobs["ip"].data
    solver.step(1)
    first_ip = ip.copy()
    solver.step(1)
    assert float(loss) == float(solver.net.blobs["loss"].data)
    np.testing.assert_array_equal(ip, solver.net.blobs["ip"].data)
    assert not np.array_equal(ip, first_ip)     # new random data, new weights


# --- 2. in-place layers: the diff Caffe leaves ------------------------------------------

def test_inplace_relu_leaves_the_gradient_of_its_input(net_file):
    net = protonet.Net(net_file(), protonet.TRAIN)
    x, label = feed(net, 6)
    net.forward()
    net.backward()
    ref = reference(net, x, label)
    # data: the ReLU's output (its top, written last); diff: the gradient with respect
    # to the ReLU's input, i.e. the conv output's gradient, masked by the ReLU
    np.testing.assert_allclose(net.blobs["conv"].data, ref["relu"].detach().numpy(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.blobs["conv"].diff, ref["conv"].grad.numpy(),
                               rtol=1e-4, atol=1e-7)
    assert (net.blobs["conv"].diff[ref["conv"].detach().numpy() <= 0] == 0).all()
    assert np.abs(net.blobs["conv"].diff).sum() > 0
    np.testing.assert_allclose(net.params["conv"][0].diff, net.layers[1].blobs[0].diff)


# --- 3. backward again, and backward with no forward ----------------------------------

def test_backward_twice_after_one_forward_accumulates_param_diffs(net_file):
    net = protonet.Net(net_file(), protonet.TRAIN)
    x, label = feed(net, 7)
    net.forward()
    net.backward()
    once = net.params["ip"][0].diff.copy()
    data_diff = net.blobs["data"].diff.copy()
    net.backward()                         # the same stored blobs and diffs again
    np.testing.assert_allclose(net.params["ip"][0].diff, 2 * once, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(net.blobs["data"].diff, data_diff, rtol=1e-6)
    # a second objective on the same forward: a new top diff, no loss this time
    net.clear_param_diffs()
    g = np.random.RandomState(8).randn(3, 5).astype(np.float32)
    net.backward(start="ip", ip=g)
    relu = reference(net, x, label)["relu"].detach().numpy().reshape(3, -1)
    np.testing.assert_allclose(net.params["ip"][0].diff, g.T @ relu, rtol=1e-4, atol=1e-6)


def test_backward_on_a_fresh_net_works_from_the_stored_blobs(net_file):
    net = protonet.Net(net_file(), protonet.TRAIN)
    g = np.random.RandomState(9).randn(3, 5).astype(np.float32)
    net.blobs["ip"].diff[...] = g
    diffs = net.backward(start="ip")       # no forward ever ran: zeros in, as Caffe
    # ReLU's mask on stored zeros is all-zero, so the input diff is zero...
    assert not diffs["data"].any()
    # ...but the ip layer's own backward used the stored (zero) bottom and weights
    np.testing.assert_allclose(net.blobs["conv"].diff, np.zeros((3, 4, 4, 4)))
    np.testing.assert_allclose(net.params["ip"][1].diff, g.sum(0), rtol=1e-5)
    net.backward()                         # the whole net, loss layer included: no error


def test_backward_with_no_forward_through_a_python_layer(tmp_path, monkeypatch):
    (tmp_path / "times_three.py").write_text(textwrap.dedent("""
        import protonet
        class TimesThree(protonet.Layer):
            def setup(self, bottom, top): pass
            def reshape(self, bottom, top): top[0].reshape(*bottom[0].data.shape)
            def forward(self, bottom, top): top[0].data[...] = 3 * bottom[0].data
            def backward(self, top, propagate_down, bottom):
                bottom[0].diff[...] = 3 * top[0].diff
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    net_path = tmp_path / "py.prototxt"
    net_path.write_text("""force_backward: true
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "a" type: "Python" bottom: "data" top: "a"
        python_param { module: "times_three" layer: "TimesThree" } }
layer { name: "b" type: "Python" bottom: "a" top: "b"
        python_param { module: "times_three" layer: "TimesThree" } }
""")
    net = protonet.Net(str(net_path), protonet.TRAIN)
    net.blobs["b"].diff[...] = 5
    assert (net.backward()["data"] == 45).all()
    assert (net.blobs["a"].diff == 15).all()


# --- 4. backward(start=, end=) -----------------------------------------------------------

def test_partial_backward_returns_the_end_layers_bottom_diffs(net_file):
    net = protonet.Net(net_file(), protonet.TRAIN)
    x, label = feed(net, 10)
    net.forward()
    g = np.random.RandomState(11).randn(3, 5).astype(np.float32)
    net.blobs["ip"].diff[...] = g
    out = net.backward(start="ip", end="ip", diffs=["ip"])
    assert set(out) == {"conv", "ip"}
    w = net.params["ip"][0].data
    np.testing.assert_allclose(out["conv"], (g @ w).reshape(3, 4, 4, 4), rtol=1e-4, atol=1e-6)
    assert np.shares_memory(out["conv"], net.blobs["conv"].diff)
    assert not net.blobs["data"].diff.any()          # layers before `end` did not run
    # the rest of the way down starts from the diff the range left in "conv"
    rest = net.backward(start="relu", end="conv")
    ref_relu = reference(net, x, label)["relu"].detach().numpy()
    masked = np.where(ref_relu > 0, (g @ w).reshape(3, 4, 4, 4), 0)
    np.testing.assert_allclose(net.blobs["conv"].diff, masked, rtol=1e-4, atol=1e-6)
    assert set(rest) == {"data"} and np.abs(rest["data"]).sum() > 0


# --- 5. exception types -------------------------------------------------------------------

RAISING = """
import protonet
class Boom(protonet.Layer):
    def setup(self, bottom, top):
        if self.param_str == "setup":
            raise RuntimeError("no setup today")
    def reshape(self, bottom, top): top[0].reshape(*bottom[0].data.shape)
    def forward(self, bottom, top):
        raise ValueError("bad value")
    def backward(self, top, propagate_down, bottom): pass
"""


def python_net(tmp_path, monkeypatch, param_str: str) -> str:
    (tmp_path / "boom_layer.py").write_text(RAISING)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / f"{param_str}.prototxt"
    path.write_text(f"""
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 2 }} }} }}
layer {{ name: "boom" type: "Python" bottom: "data" top: "out"
        python_param {{ module: "boom_layer" layer: "Boom" param_str: "{param_str}" }} }}
""")
    return str(path)


def test_python_layer_setup_error_is_a_runtime_error_and_a_protonet_error(tmp_path,
                                                                          monkeypatch):
    with pytest.raises(RuntimeError) as caught:
        protonet.Net(python_net(tmp_path, monkeypatch, "setup"), protonet.TEST)
    assert isinstance(caught.value, NetError)
    assert "layer 'boom' (Python)" in str(caught.value)
    assert "no setup today" in str(caught.value)
    again = pickle.loads(pickle.dumps(caught.value))       # e.g. across processes
    assert type(again) is NetError and str(again) == str(caught.value)


def test_python_layer_forward_error_keeps_its_type(tmp_path, monkeypatch):
    net = protonet.Net(python_net(tmp_path, monkeypatch, "forward"), protonet.TEST)
    with pytest.raises(ValueError) as caught:
        net.forward()
    assert isinstance(caught.value, ProtonetError)
    assert "bad value" in str(caught.value) and "boom" in str(caught.value)


def test_lookup_errors_are_pycaffes(net_file, tmp_path):
    net = protonet.Net(net_file(), protonet.TRAIN)
    with pytest.raises(KeyError):
        net.blobs["nope"]
    with pytest.raises(ValueError):        # pycaffe: list(self._layer_names).index(...)
        net.forward(start="nope")
    with pytest.raises(IndexError):
        net.layers[99]
    with pytest.raises(RuntimeError) as caught:          # Caffe's CheckFile
        protonet.Net(str(tmp_path / "missing.prototxt"), protonet.TEST)
    assert isinstance(caught.value, ProtonetError)


# --- the rest of pycaffe's Net -----------------------------------------------------------

def test_names_loss_weights_and_callbacks(net_file):
    net = protonet.Net(net_file(), protonet.TRAIN)
    assert net.top_names["relu"] == ["conv"] and net.bottom_names["loss"] == ["ip", "label"]
    assert net.bottom_names["data"] == []
    assert net.blob_loss_weights["loss"] == 2 and net.blob_loss_weights["ip"] == 0
    assert list(net.blob_loss_weights) == net._blob_names
    events = []
    net.before_forward(lambda i: events.append(("bf", i)))
    net.after_forward(lambda i: events.append(("af", i, float(net.blobs["conv"].data.min()))))
    net.before_backward(lambda i: events.append(("bb", i)))
    net.after_backward(lambda i: events.append(("ab", i)))
    feed(net, 12)
    net.forward()
    net.backward()
    forward = [e for e in events if e[0] in ("bf", "af")]
    assert [e[:2] for e in forward] == [(k, i) for i in range(6) for k in ("bf", "af")]
    # after layer conv (1) the blob holds the conv output (negatives too); after relu none
    after = {e[1]: e[2] for e in forward if e[0] == "af"}
    assert after[1] < 0 and after[2] >= 0
    backward = [e for e in events if e[0] in ("bb", "ab")]
    assert [e[1] for e in backward[::2]] == list(range(5, -1, -1))


def test_conv_blob_shows_the_conv_output_in_an_after_forward_callback(net_file):
    net = protonet.Net(net_file(), protonet.TRAIN)
    seen = {}
    net.after_forward(lambda i: seen.setdefault(i, net.blobs["conv"].data.copy()))
    x, label = feed(net, 13)
    net.forward()
    ref = reference(net, x, label)
    np.testing.assert_allclose(seen[1], ref["conv"].detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(seen[2], ref["relu"].detach().numpy(), rtol=1e-5, atol=1e-6)


DEPLOY = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }
force_backward: true
"""


def test_forward_all_and_forward_backward_all_batch_and_pad(tmp_path):
    path = tmp_path / "deploy.prototxt"
    path.write_text(DEPLOY)
    net = protonet.Net(str(path), protonet.TEST)
    x = np.random.RandomState(14).randn(10, 3).astype(np.float32)
    w, b = net.params["ip"][0].data, net.params["ip"][1].data
    batches = list(net._batch({"data": x}))
    assert [len(bt["data"]) for bt in batches] == [4, 4, 4]
    assert not batches[-1]["data"][2:].any()
    out = net.forward_all(data=x)
    assert set(out) == {"ip"} and out["ip"].shape == (10, 2)
    np.testing.assert_allclose(out["ip"], x @ w.T + b, rtol=1e-5, atol=1e-6)
    g = np.random.RandomState(15).randn(10, 2).astype(np.float32)
    outs, diffs = net.forward_backward_all(data=x, ip=g)
    np.testing.assert_allclose(outs["ip"], x @ w.T + b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(diffs["data"], g @ w, rtol=1e-5, atol=1e-6)


def test_hdf5_weights_are_caffes_layout(net_file, tmp_path):
    net = protonet.Net(net_file(), protonet.TRAIN)
    path = tmp_path / "weights.any"
    net.save_hdf5(str(path))
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["data/conv/0"][()], net.params["conv"][0].data)
        np.testing.assert_array_equal(f["data/ip/1"][()], net.params["ip"][1].data)
    other = protonet.Net(net_file(), protonet.TRAIN)
    other.load_hdf5(str(path))
    for name, blobs in net.params.items():
        for mine, theirs in zip(blobs, other.params[name]):
            np.testing.assert_array_equal(mine.data, theirs.data)


def test_share_with_and_solver_share_weights(net_file, tmp_path):
    net = protonet.Net(net_file(), protonet.TRAIN)
    other = protonet.Net(net_file(), protonet.TRAIN)
    other.share_with(net)
    net.params["ip"][0].data[...] = 7
    assert (other.params["ip"][0].data == 7).all()
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(f'net: "{net_file()}" base_lr: 0.1 lr_policy: "fixed" '
                           'display: 0 snapshot_after_train: false')
    solver = protonet.SGDSolver(str(solver_file))
    third = protonet.Net(net_file(), protonet.TEST)
    solver.share_weights(third)
    np.testing.assert_array_equal(third.params["conv"][0].data,
                                  solver.net.params["conv"][0].data)


def test_solver_param_edits_take_effect_on_the_next_step(net_file, tmp_path):
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(f'net: "{net_file()}" base_lr: 0.1 lr_policy: "fixed" '
                           'display: 0 snapshot_after_train: false')
    solver = protonet.SGDSolver(str(solver_file))
    data = solver.net.params["ip"][1].data
    calls = []
    solver.add_callback(lambda: calls.append("start"), lambda: calls.append("grads"))
    for rate in (0.1, 0.5, 0.0):
        solver.param.base_lr = rate
        assert solver.lr == pytest.approx(rate)
        solver.net.blobs["data"].data[...] = np.random.RandomState(16).randn(3, 2, 6, 6)
        solver.net.blobs["label"].data[...] = [0, 1, 2]
        before = data.copy()
        solver.net.forward()
        solver.net.clear_param_diffs()
        solver.net.backward()
        diff = solver.net.params["ip"][1].diff.copy()
        solver.apply_update()
        np.testing.assert_allclose(before - data, rate * diff, rtol=1e-4, atol=1e-7)
    solver.step(2)
    assert calls == ["start", "grads"] * 2 and solver.iter == 5


def test_set_input_arrays_feeds_a_memory_data_layer(tmp_path):
    path = tmp_path / "mem.prototxt"
    path.write_text("""
layer { name: "data" type: "MemoryData" top: "data" top: "label"
        memory_data_param { batch_size: 2 channels: 1 height: 2 width: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 1 weight_filler { type: "constant" value: 1 } } }
""")
    net = protonet.Net(str(path), protonet.TEST)
    data = np.arange(16, dtype=np.float32).reshape(4, 1, 2, 2)
    net.set_input_arrays(data, np.arange(4, dtype=np.float32))
    out = net.forward()
    np.testing.assert_allclose(out["ip"].ravel(), data[:2].reshape(2, -1).sum(1))
    np.testing.assert_array_equal(net.blobs["label"].data.ravel(), [0, 1])


def test_layer_wrapper_reshape_and_blobs(net_file):
    net = protonet.Net(net_file(), protonet.TRAIN)
    layer = net.layers[list(net._layer_names).index("ip")]
    assert layer.type == "InnerProduct" and [b.shape for b in layer.blobs] == [(5, 64), (5,)]
    net.blobs["conv"].reshape(2, 4, 4, 4)
    layer.reshape([net.blobs["conv"]], [net.blobs["ip"]])
    assert net.blobs["ip"].shape == (2, 5)


def test_backward_after_writing_an_input_reads_the_blobs_as_they_are(net_file):
    net = protonet.Net(net_file(), protonet.TRAIN)
    feed(net, 17)
    net.forward()
    x2 = np.random.RandomState(18).randn(3, 2, 6, 6).astype(np.float32)
    net.blobs["data"].data = x2            # memory the forward's graph saved
    net.clear_param_diffs()
    net.backward()                         # no torch error: conv's backward reads x2
    g = net.blobs["conv"].diff
    expected = torch.nn.grad.conv2d_weight(torch.from_numpy(x2), (4, 2, 3, 3),
                                           torch.from_numpy(g.copy()))
    np.testing.assert_allclose(net.params["conv"][0].diff, expected.numpy(), rtol=1e-4,
                               atol=1e-5)


def test_snapshot_and_restore_round_trip(net_file, tmp_path):
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(f'net: "{net_file()}" base_lr: 0.1 momentum: 0.9 '
                           f'lr_policy: "fixed" display: 0 snapshot_after_train: false '
                           f'snapshot_prefix: "{tmp_path}/snap"')
    solver = protonet.SGDSolver(str(solver_file))
    solver.net.blobs["label"].data[...] = [0, 1, 2]
    solver.step(2)
    state = solver.snapshot()
    weights = solver.net.params["conv"][0].data.copy()
    solver.step(1)
    other = protonet.SGDSolver(str(solver_file))
    other.restore(state)
    assert other.iter == 2
    np.testing.assert_array_equal(other.net.params["conv"][0].data, weights)


def test_forward_to_an_end_reshapes_only_the_layers_it_runs(tmp_path):
    """Caffe's layers reshape in Forward: after an input reshape, forward(end=...) must
    not reshape a later InnerProduct (whose weights fix its input size), as deep-dream
    loops over GoogLeNet do; the full net works again at the original size."""
    path = tmp_path / "net.prototxt"
    path.write_text("""force_backward: true
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "gaussian" } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }
""")
    net = protonet.Net(str(path), protonet.TEST)
    src = net.blobs["data"]
    src.reshape(1, 2, 12, 10)
    src.data[...] = np.random.RandomState(19).randn(1, 2, 12, 10)
    net.forward(end="relu")
    dst = net.blobs["conv"]
    assert dst.data.shape == (1, 3, 10, 8) and net.blobs["ip"].data.shape == (1, 2)
    dst.diff[...] = dst.data
    g = net.backward(start="relu")["data"]
    assert g.shape == (1, 2, 12, 10) and np.abs(g).sum() > 0
    src.reshape(1, 2, 8, 8)
    assert net.forward()["ip"].shape == (1, 2)
