"""NetModule.forward_for_inference: the inference plan's speed with every blob a
script reads, each holding what NetModule.forward (Caffe's forward) leaves in it."""
from __future__ import annotations

import pytest
import torch

from protonet.proto import caffe_pb2
from protonet.timing import random_inputs
from test_speed_paths import ALEX_LIKE_NET, CONV_BN_NET, module, relative_error

LOSS_NET = CONV_BN_NET.replace(
    'layer { name: "prob" type: "Softmax" bottom: "fcT" top: "prob" }',
    'layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 2 } } }\n'
    'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fcT" bottom: "label" '
    'top: "loss" loss_weight: 0.5 }')


def exact(net, inputs):
    with torch.no_grad():
        return net(inputs)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("text", [CONV_BN_NET, ALEX_LIKE_NET, LOSS_NET],
                         ids=["conv_bn", "alex_like", "loss"])
def test_every_blob_matches_the_exact_forward(text, channels_last):
    net = module(text).use_channels_last(channels_last)
    inputs = random_inputs(net, "cpu")
    if "label" in net.blob_index:
        inputs["label"] = torch.tensor([1.0, 3.0])
    want, want_loss = exact(net, inputs)
    got, loss = net.forward_for_inference(inputs)
    for i, name in enumerate(net.blob_names):
        assert (got[i] is None) == (want[i] is None), name
        if want[i] is not None:
            assert got[i].shape == want[i].shape, name
            assert relative_error(got[i], want[i]) < 1e-5, name
    if want_loss is None:
        assert loss is None
    else:
        assert abs(float(loss) - float(want_loss)) < 1e-5 * max(1.0, abs(float(want_loss)))
    plan = net._blob_plan
    assert len(plan.ops) < sum(1 for s in net.steps if not s.is_input)   # it fused


def test_out_of_place_batchnorm_keeps_the_convolution_blob():
    net = module(CONV_BN_NET)
    inputs = random_inputs(net, "cpu")
    got, _ = net.forward_for_inference(inputs)
    want, _ = exact(net, inputs)
    conv2, bn2 = net.blob_index["conv2"], net.blob_index["bn2"]
    assert relative_error(got[conv2], want[conv2]) < 1e-5
    assert relative_error(got[bn2], want[bn2]) < 1e-5


def test_the_plan_follows_changed_weights_and_shapes():
    net = module(CONV_BN_NET)
    inputs = random_inputs(net, "cpu")
    net.forward_for_inference(inputs)
    first = net._blob_plan
    net.forward_for_inference(inputs)
    assert net._blob_plan is first                    # cached
    with torch.no_grad():
        net.layers[net.layer_names.index("conv1")].blobs[0].mul_(2)
    got, _ = net.forward_for_inference(inputs)
    assert net._blob_plan is not first
    prob = net.blob_index["prob"]
    assert relative_error(got[prob], exact(net, inputs)[0][prob]) < 1e-5
    second = net._blob_plan                           # a param replaced, as weight
    conv2 = net.layers[net.layer_names.index("conv2")]    # sharing and pycaffe do
    conv2.blobs[0] = torch.nn.Parameter(conv2.blobs[0].detach() * -1)
    got, _ = net.forward_for_inference(inputs)
    assert net._blob_plan is not second
    assert relative_error(got[prob], exact(net, inputs)[0][prob]) < 1e-5
    net.infer_shapes({"data": (4, 3, 17, 15)})
    bigger = random_inputs(net, "cpu")
    got, _ = net.forward_for_inference(bigger)
    assert got[prob].shape[0] == 4
    assert relative_error(got[prob], exact(net, bigger)[0][prob]) < 1e-5


def test_train_phase_batch_statistics_still_match():
    net = module(CONV_BN_NET, phase=caffe_pb2.TRAIN)
    inputs = random_inputs(net, "cpu")
    want, _ = exact(net, inputs)
    got, _ = net.forward_for_inference(inputs)
    prob = net.blob_index["prob"]
    assert relative_error(got[prob], want[prob]) < 1e-5
