"""`protonet time` times the work `caffe time` does: the backward computes the
gradients Caffe's Net::Init marks (bottom_need_backward, param_propagate_down), in the
layer-by-layer pass and in the whole-net forward + backward alike.

Caffe's rule (net.cpp, Net::Init), which the expectations below spell out by hand:
a blob needs backward when a layer upstream has a param with lr_mult != 0; a layer's
bottoms keep that flag only when the layer feeds a loss (and propagate_down allows);
every param with lr_mult != 0 has its gradient computed by its layer's Backward, which
`caffe time` calls for every layer; force_backward turns on every bottom but labels and
every param."""
from __future__ import annotations

import pytest
import torch

from protonet.io.text import parse_text
from protonet.net.module import NetModule
from protonet.proto import caffe_pb2
from protonet.timing import TimingOptions, backward_targets, time_net, training_step

DEPLOY = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 12 dim: 12 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  param { lr_mult: 0 } param { lr_mult: 0 }
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "fc" type: "InnerProduct" bottom: "conv2" top: "fc"
  inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""

TRAIN = """
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 2 dim: 3 dim: 12 dim: 12 } shape { dim: 2 }
                     data_filler { type: "gaussian" } data_filler { type: "constant" } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "side" type: "InnerProduct" bottom: "pool1" top: "side"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc"
  inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "fc" bottom: "label" top: "acc" }
"""


def build(text: str, phase=caffe_pb2.TRAIN) -> NetModule:
    return NetModule(parse_text(text, caffe_pb2.NetParameter()), phase=phase)


def expected_targets(module: NetModule) -> dict[str, tuple[list[int], list[int]]]:
    """{layer: (bottom positions, param indices)} from backward_targets, by name."""
    out = {}
    steps = [s for s in module.steps if not s.is_input]
    for step, target in zip(steps, backward_targets(module)):
        layer = module.layers[step.layer]
        ids = [i for i, p in enumerate(layer.blobs) if any(p is q for q in target.params)]
        out[module.layer_names[step.layer]] = (list(target.bottoms), ids)
    return out


def test_deploy_net_computes_param_gradients_only():
    net = build(DEPLOY)
    assert expected_targets(net) == {
        "conv1": ([], [0, 1]), "relu1": ([], []), "pool1": ([], []),
        "conv2": ([], []),                    # lr_mult 0: no propagate-down
        "fc": ([], [0, 1]), "prob": ([], [])}


def test_train_net_follows_the_loss():
    net = build(TRAIN)
    assert expected_targets(net) == {
        "data": ([], []),
        "conv1": ([], [0, 1]),                # data needs no backward: no params above
        "relu1": ([0], []), "pool1": ([0], []),
        "side": ([], [0, 1]),                 # feeds no loss: its params only
        "fc": ([0], [0, 1]),
        "loss": ([0], []),                    # not the label
        "acc": ([], []),
        # the Split layers Caffe inserts too
        "label_data_1_split": ([], []), "pool1_pool1_0_split": ([0], []),
        "fc_fc_0_split": ([0], [])}


def test_force_backward_and_propagate_down():
    forced = build("force_backward: true\n" + DEPLOY)
    targets = expected_targets(forced)
    assert targets["conv1"] == ([0], [0, 1]) and targets["conv2"] == ([0], [0, 1])
    assert targets["prob"] == ([0], [])
    text = TRAIN.replace('bottom: "pool1" top: "fc"',
                         'bottom: "pool1" top: "fc" propagate_down: false')
    assert expected_targets(build(text))["fc"] == ([], [0, 1])


def observe(module: NetModule, run) -> tuple[dict, set]:
    """Run `run()`; return {layer: bottom positions that carried autograd} and the
    names of params that received a gradient."""
    grads_of = {}
    for step in module.steps:
        layer = module.layers[step.layer]
        for i, p in enumerate(layer.blobs):
            if p.requires_grad:
                p.register_hook(lambda g, key=f"{module.layer_names[step.layer]}/{i}":
                                grads_of.update({key: True}))
    inputs_grad = {}

    def hook(layer, args, out):
        inputs_grad[layer.layer_name] = [j for j, a in enumerate(args)
                                         if isinstance(a, torch.Tensor) and a.requires_grad]
    handles = [layer.register_forward_hook(hook) for layer in module.layers]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return inputs_grad, set(grads_of)


@pytest.mark.parametrize("text", [DEPLOY, TRAIN, "force_backward: true\n" + DEPLOY],
                         ids=["deploy", "train", "forced"])
def test_whole_net_step_computes_caffes_gradients(text):
    net = build(text)
    inputs = {name: torch.rand(net.blob_shapes[net.blob_index[name]])
              for name in net.input_names}
    bottoms, params = observe(net, training_step(net, inputs))
    expected = expected_targets(net)
    for layer, (want_bottoms, _) in expected.items():
        if layer in bottoms:      # (a layer fused into its neighbour is not called)
            assert bottoms[layer] == want_bottoms, layer
    assert params == {f"{layer}/{i}" for layer, (_, ids) in expected.items() for i in ids}


def test_layer_by_layer_backward_takes_the_same_gradients():
    net = build(DEPLOY)
    params_seen = observe(net, lambda: time_net(net, 1, torch.device("cpu"),
                                                options=TimingOptions()))[1]
    assert params_seen == {"conv1/0", "conv1/1", "fc/0", "fc/1"}


def test_time_command_does_not_force_backward(tmp_path, caplog):
    from protonet.cli import main
    path = tmp_path / "deploy.prototxt"
    path.write_text(DEPLOY)
    assert main(["time", "--model", str(path), "--iterations", "1"]) == 0
    text = parse_text(path.read_text(), caffe_pb2.NetParameter())
    assert not text.force_backward
