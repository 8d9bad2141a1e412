"""pycaffe's Net.forward() over the whole net runs the cached inference plan
(NetModule.forward_for_inference) where that gives what the layer-by-layer forward
gives: every blob within float32 rounding, weights as the script last wrote them
(numpy writes through param views included), and the exact path everywhere else."""
from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

import protonet
from protonet.proto import caffe_pb2
from protonet.pycaffe import PLAN_PAYS_AFTER, Net
from test_inference_blobs import LOSS_NET
from test_pycaffe_semantics import TINY_TRAIN_NET
from test_speed_paths import CONV_BN_NET, module

TEXT = CONV_BN_NET       # conv/BatchNorm/Scale/ReLU, Eltwise, pooling, inner products


def make_net(text: str = TEXT, seed: int = 0, phase=caffe_pb2.TEST) -> Net:
    net = Net.from_module(module(text, phase=phase, seed=seed))
    net.blobs["data"].data[...] = np.random.RandomState(seed).randn(
        *net.blobs["data"].shape)
    return net


def exact(net: Net) -> dict[str, np.ndarray]:
    """Every blob of a whole-net forward run layer by layer (a forward callback keeps
    the plan out) on a twin net with `net`'s weights and inputs."""
    twin = make_net(TEXT, seed=99)
    twin.after_forward(lambda index: None)
    with torch.no_grad():    # (not through net.params: a view handed out drops its plan)
        for mine, theirs in zip(twin.module.layers, net.module.layers):
            for a, b in zip(mine.blobs, theirs.blobs):
                a.copy_(b)
    twin.blobs["data"].data[...] = net.blobs["data"].data
    twin.forward()
    assert twin._plan_runs == 0
    return {name: blob.data.copy() for name, blob in twin.blobs.items()}


def assert_blobs_match(net: Net, want: dict[str, np.ndarray]) -> None:
    for name, blob in net.blobs.items():
        got = blob.data
        assert got.shape == want[name].shape, name
        scale = max(float(np.abs(want[name]).max()), 1e-30)
        assert float(np.abs(got - want[name]).max()) / scale < 1e-5, name


def warm(net: Net) -> None:
    """Forwards until the net's plan has run long enough to pay for itself (a plan
    dropped sooner makes the net wait longer before building the next)."""
    runs = net._plan_runs
    for _ in range(1 + PLAN_PAYS_AFTER):
        net.forward()
    assert net._plan_runs - runs == PLAN_PAYS_AFTER


def test_the_second_whole_forward_runs_the_plan_and_every_blob_matches():
    net = make_net()
    held = net.blobs["prob"].data              # a view taken before any forward
    net.forward()
    assert net._plan_runs == 0                 # the first runs layer by layer
    first = {name: blob.data.copy() for name, blob in net.blobs.items()}
    out = net.forward()
    assert net._plan_runs == 1 and net.module._blob_plan is not None
    assert_blobs_match(net, first)
    assert_blobs_match(net, exact(net))
    assert np.shares_memory(out["prob"], held)  # results land in the persistent buffer
    np.testing.assert_array_equal(held, net.blobs["prob"].data)

    plan = net.module._blob_plan               # new input values change nothing else
    net.blobs["data"].data[...] = np.random.RandomState(5).randn(*net.blobs["data"].shape)
    net.forward()
    assert net._plan_runs == 2 and net.module._blob_plan is plan
    assert_blobs_match(net, exact(net))
    assert not np.allclose(held, first["prob"])


def test_a_layer_in_place_on_the_input_blob_leaves_it_as_caffe_does():
    text = TEXT.replace('layer { name: "conv1"', 'layer { name: "double" type: "Power" '
                        'bottom: "data" top: "data" power_param { scale: 2 } }\n'
                        'layer { name: "conv1"', 1)
    net, twin = make_net(text), make_net(text)
    twin.after_forward(lambda index: None)
    x = net.blobs["data"].data.copy()
    for _ in range(3):                  # each forward doubles the blob again (Caffe's way)
        net.forward()
        twin.forward()
    assert net._plan_runs == 2 and twin._plan_runs == 0
    np.testing.assert_allclose(net.blobs["data"].data, 8 * x, rtol=1e-6)
    assert_blobs_match(net, {name: blob.data for name, blob in twin.blobs.items()})


def test_a_write_through_a_param_view_reaches_the_next_forward():
    net = make_net()
    warm(net)
    plan, runs = net.module._blob_plan, net._plan_runs
    net.params["conv1"][0].data[...] *= -2     # numpy: no torch version changes
    net.params["bn1"][0].data[...] += 0.5      # a folded BatchNorm statistic
    net.forward()
    assert net._plan_runs == runs               # right after a write: layer by layer
    assert_blobs_match(net, exact(net))
    net.forward()                               # then a plan made with the new weights
    assert net._plan_runs == runs + 1 and net.module._blob_plan is not plan
    assert_blobs_match(net, exact(net))


def test_a_held_param_view_keeps_the_net_off_the_plan():
    net = make_net()
    weight = net.params["conv1"][0].data[0]     # a view of a view, kept
    for _ in range(3):
        net.forward()
    assert net._plan_runs == 0
    weight[...] = 3.0                           # may happen between any two forwards
    net.forward()
    assert_blobs_match(net, exact(net))
    del weight
    net.forward()
    net.forward()
    assert net._plan_runs == 1
    assert_blobs_match(net, exact(net))


def test_copy_from_and_share_with_reach_the_plan(tmp_path):
    net, other = make_net(), make_net(seed=3)
    path = str(tmp_path / "other.caffemodel")
    other.save(path)
    warm(net)
    net.copy_from(path)
    warm(net)
    assert_blobs_match(net, exact(net))
    np.testing.assert_allclose(net.params["fc"][0].data, other.params["fc"][0].data)

    third = make_net(seed=4)
    net.share_with(third)
    warm(net)
    assert_blobs_match(net, exact(net))
    third.params["fcT"][0].data[...] = 0.25     # a write through the other net's view
    third.params["fcT"][1].data[...] = np.arange(4)
    net.forward()
    assert_blobs_match(net, exact(net))
    np.testing.assert_allclose(net.blobs["prob"].data,
                               np.broadcast_to(np.exp(np.arange(4)) / np.exp(np.arange(4)).sum(),
                                               (2, 4)), rtol=1e-5)


def test_a_solver_step_reaches_a_deploy_net_sharing_its_weights(tmp_path):
    train = tmp_path / "train.prototxt"
    train.write_text(TINY_TRAIN_NET)
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text("""
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 2 } }
""")
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(f'net: "{train}" base_lr: 0.5 lr_policy: "fixed" max_iter: 5 '
                           'display: 0 snapshot_after_train: false')
    solver = protonet.SGDSolver(str(solver_file))
    net = protonet.Net(str(deploy), protonet.TEST)
    net.share_with(solver.net)
    x = np.random.RandomState(0).randn(4, 3).astype(np.float32)
    for _ in range(1 + PLAN_PAYS_AFTER):
        net.forward(data=x)
    assert net._plan_runs == PLAN_PAYS_AFTER
    for _ in range(3):
        solver.step(1)
        out = net.forward(data=x)["ip"]
        out = net.forward(data=x)["ip"]         # the second builds a plan
        weight, bias = (p.data for p in solver.net.params["ip"])
        np.testing.assert_allclose(out, x @ weight.T + bias, rtol=1e-5, atol=1e-6)
        del weight, bias


def test_a_net_whose_plans_do_not_pay_waits_longer_before_building_one():
    """Input shapes that keep changing (a server's batch sizes) would rebuild the plan
    every other forward; a plan dropped before it paid for itself doubles the wait, and
    one that paid sets it back."""
    net = make_net()
    plans = []
    for i in range(48):
        if i % 2 == 0:
            net.blobs["data"].reshape((i // 2) % 2 + 1, 3, 17, 15)
        net.forward()
        if net.module._blob_plan is not None and net.module._blob_plan not in plans:
            plans.append(net.module._blob_plan)
    assert len(plans) == 1 and net._plan_runs == 1 and net._plan_wait == 4
    assert_blobs_match(net, exact(net))
    for _ in range(net._plan_wait + PLAN_PAYS_AFTER):   # stable long enough: it pays
        net.forward()
    runs = net._plan_runs
    assert net.module._blob_plan is not None and runs > PLAN_PAYS_AFTER
    net.blobs["data"].reshape(3, 3, 17, 15)      # a shape it has not had
    net.forward()
    net.forward()
    assert net._plan_wait == 2 and net._plan_runs == runs + 1


def _python_layer_net(tmp_path, monkeypatch):
    (tmp_path / "times_two_plan.py").write_text(textwrap.dedent("""
        import protonet
        class TimesTwo(protonet.Layer):
            def setup(self, bottom, top): pass
            def reshape(self, bottom, top): top[0].reshape(*bottom[0].data.shape)
            def forward(self, bottom, top): top[0].data[...] = 2 * bottom[0].data
            def backward(self, top, propagate_down, bottom): pass
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return make_net(TEXT + 'layer { name: "py" type: "Python" bottom: "prob" top: "py" '
                    'python_param { module: "times_two_plan" layer: "TimesTwo" } }')


def _forward_with(net: Net, case: str):
    if case == "partial":
        return net.forward(start="conv1")
    if case == "up_to_the_last_layer":
        return net.forward(end="prob")
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return net.forward()
    if case == "input_shape_changes":
        shape = net.blobs["data"].shape
        net.blobs["data"].reshape(shape[0] % 3 + 1, *shape[1:])
    return net.forward()


CASES = ["plain", "partial", "up_to_the_last_layer", "callback", "train_phase",
         "force_backward", "loss_with_learnable_params", "python_layer", "autocast",
         "host_buffers", "held_param_view", "input_shape_changes"]


@pytest.mark.parametrize("case", CASES)
def test_what_the_plan_cannot_reproduce_runs_layer_by_layer(case, tmp_path, monkeypatch):
    if case == "host_buffers":
        monkeypatch.setenv("PROTONET_PYCAFFE_SYNCED", "1")
    text = {"force_backward": "force_backward: true\n" + TEXT,
            "loss_with_learnable_params": LOSS_NET}.get(case, TEXT)
    phase = caffe_pb2.TRAIN if case == "train_phase" else caffe_pb2.TEST
    net = _python_layer_net(tmp_path, monkeypatch) if case == "python_layer" else \
        make_net(text, phase=phase)
    if case == "callback":
        net.before_forward(lambda index: None)
    held = net.params["fc"][0].data if case == "held_param_view" else None   # noqa: F841
    for _ in range(3):
        _forward_with(net, case)
    if case == "plain":                   # the control: this harness sees the plan
        assert net._plan_runs == 2
    else:
        assert net._plan_runs == 0
        assert getattr(net.module, "_blob_plan", None) is None


# A ResNet join: conv -> BatchNorm -> Scale (in place) summed with a shortcut, then ReLU.
JOIN_NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 dim: 7 dim: 7 } } }
layer { name: "short" type: "Convolution" bottom: "data" top: "short"
        convolution_param { num_output: 6 kernel_size: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "c" type: "Convolution" bottom: "data" top: "c"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "bn" type: "BatchNorm" bottom: "c" top: "c" batch_norm_param { use_global_stats: true } }
layer { name: "sc" type: "Scale" bottom: "c" top: "c"
        scale_param { bias_term: true filler { type: "uniform" min: 0.5 max: 2 } } }
layer { name: "sum" type: "Eltwise" bottom: "short" bottom: "c" top: "sum" }
layer { name: "relu" type: "ReLU" bottom: "sum" top: "sum" }
layer { name: "pool" type: "Pooling" bottom: "sum" top: "pool" pooling_param { pool: AVE global_pooling: true } }
"""


def _join_net():
    net = make_net(JOIN_NET, seed=3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        mean, var, factor = net.module.layers[net.module.layer_names.index("bn")].blobs
        mean.normal_(0, 1, generator=gen), var.uniform_(0.5, 2, generator=gen)
        factor.fill_(1.0)
    return net


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_a_joined_convolutions_own_top_is_made_when_a_script_reads_it():
    net = _join_net()
    twin = _join_net()
    twin.after_forward(lambda index: None)             # the exact, layer-by-layer path
    twin.forward()
    want = {name: blob.data.copy() for name, blob in twin.blobs.items()}
    for _ in range(3):
        net.forward()
    assert net._plan_runs == 2
    c = net.module.blob_index["c"]
    assert list(net._pending) == [c] and net._values[c] is None   # not made yet
    assert_blobs_match(net, want)                    # reading "c" makes it
    assert not net._pending
    held = net.blobs["c"].data                       # a held view is filled at once
    net.blobs["data"].data[...] *= -1
    net.forward()
    assert net._plan_runs == 3 and not net._pending
    twin.blobs["data"].data[...] = net.blobs["data"].data
    twin.forward()
    np.testing.assert_allclose(held, twin.blobs["c"].data, rtol=1e-5, atol=1e-6)
    net.forward()                                    # and a partial forward reads it
    net.forward(start="sum")
    np.testing.assert_allclose(net.blobs["pool"].data, twin.blobs["pool"].data,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_protonet_test_scores_a_joined_net_as_the_layer_by_layer_forward(tmp_path, capsys):
    """`protonet test` reads only the outputs, so its plan joins the shortcut sum and
    never makes the joined convolution's own top; the scores stay the exact path's."""
    from protonet.cli import main as cli_main
    text = JOIN_NET.replace(
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 '
        'dim: 7 dim: 7 } } }',
        'layer { name: "data" type: "DummyData" top: "data" dummy_data_param { shape { '
        'dim: 2 dim: 4 dim: 7 dim: 7 } data_filler { type: "constant" value: 0.7 } } }')
    assert text != JOIN_NET
    path, weights = tmp_path / "net.prototxt", str(tmp_path / "w.caffemodel")
    path.write_text(text)
    net = protonet.Net(str(path), protonet.TEST)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in net.module.layers:
            for blob in layer.blobs:
                blob.uniform_(0.1, 1.5, generator=gen)
    net.save(weights)
    exact_scores = net.forward()["pool"].ravel().copy()     # the first: layer by layer
    assert net._plan_runs == 0
    values, _ = net.module.forward_for_inference(pending=(pending := {}))
    assert list(pending) == [net.module.blob_index["c"]]
    assert values[net.module.blob_index["c"]] is None
    capsys.readouterr()
    assert cli_main(["test", "--model", str(path), "--weights", weights,
                     "--iterations", "1"]) == 0
    scores = [float(line.rsplit("= ", 1)[1]) for line in capsys.readouterr().err.splitlines()
              if "Batch 0, pool = " in line]
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5, atol=1e-6)
