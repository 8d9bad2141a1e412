"""NetSpec writes the prototxt pycaffe's NetSpec would, and protonet runs it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import protonet
from protonet.errors import NetError
from protonet.io.text import parse_text, to_text
from protonet.io.upgrade import read_net
from protonet.netspec import (NetSpec, conv_bn_scale_relu, inception_module, layers as L,
                              params as P, param_fields, residual_block, to_proto)
from protonet.proto import caffe_pb2

LENET = Path(__file__).resolve().parents[1] / "examples" / "mnist" / "lenet.prototxt"


def lenet(batch: int = 64) -> caffe_pb2.NetParameter:
    lr = [dict(lr_mult=1), dict(lr_mult=2)]
    fill = dict(weight_filler=dict(type="xavier"), bias_filler=dict(type="constant"))
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[batch, 1, 28, 28]))
    n.conv1 = L.Convolution(n.data, param=lr, num_output=20, kernel_size=5, stride=1,
                            **fill)
    n.pool1 = L.Pooling(n.conv1, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.conv2 = L.Convolution(n.pool1, param=lr, num_output=50, kernel_size=5, stride=1,
                            **fill)
    n.pool2 = L.Pooling(n.conv2, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.ip1 = L.InnerProduct(n.pool2, param=lr, num_output=500, **fill)
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.ip2 = L.InnerProduct(n.relu1, param=lr, num_output=10, **fill)
    n.prob = L.Softmax(n.ip2)
    net = n.to_proto()
    net.name = "LeNet"
    return net


def run_from_text(net: caffe_pb2.NetParameter) -> protonet.Net:
    """Through prototxt text, as Caffe would read the file."""
    return protonet.Net(parse_text(to_text(net), caffe_pb2.NetParameter()), protonet.TEST)


def test_lenet_matches_the_bundled_prototxt():
    assert lenet() == read_net(str(LENET))


def test_lenet_round_trip_runs_with_the_same_shapes():
    built = run_from_text(lenet(2))
    shapes = {"data": (2, 1, 28, 28), "conv1": (2, 20, 24, 24), "pool1": (2, 20, 12, 12),
              "conv2": (2, 50, 8, 8), "pool2": (2, 50, 4, 4), "ip1": (2, 500),
              "ip2": (2, 10), "prob": (2, 10)}
    assert {k: b.shape for k, b in built.blobs.items()} == shapes
    out = built.forward(data=np.random.default_rng(0).random((2, 1, 28, 28)))
    np.testing.assert_allclose(out["prob"].sum(axis=1), 1, rtol=1e-5)


def test_in_place_ntop_and_generated_names():
    n = NetSpec()
    n.data, n.label = L.DummyData(shape=[dict(dim=[2, 3]), dict(dim=[2])], ntop=2)
    n.silence = L.Silence(n.label, ntop=0)
    hidden = L.TanH(n.data)
    n.out = L.ReLU(L.Sigmoid(hidden), in_place=True)
    layers = n.to_proto().layer
    assert [(l.name, l.type, list(l.bottom), list(l.top)) for l in layers] == [
        ("data", "DummyData", [], ["data", "label"]),
        ("silence", "Silence", ["label"], []),
        ("TanH1", "TanH", ["data"], ["TanH1"]),
        ("Sigmoid1", "Sigmoid", ["TanH1"], ["Sigmoid1"]),
        ("out", "ReLU", ["Sigmoid1"], ["Sigmoid1"]),
    ]
    assert [l.name for l in hidden.to_proto().layer] == ["DummyData1", "TanH1"]
    assert [l.type for l in to_proto(hidden, n.out).layer] == \
        ["DummyData", "TanH", "Sigmoid", "ReLU"]


def test_fields_go_to_the_right_message():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 4, 8, 8]))
    n.up = L.Deconvolution(n.data, num_output=4, kernel_size=2, stride=2, bias_term=False,
                           name="upsample", param=dict(lr_mult=0))
    n.label = L.Input(shape=dict(dim=[1, 16, 16]))
    n.loss = L.SoftmaxWithLoss(n.up, n.label, axis=1, ignore_label=255,
                               normalization=P.Loss.VALID, loss_weight=2,
                               include=dict(phase=P.TRAIN))
    n.acc = L.Accuracy(n.up, n.label, include=[dict(phase=P.Phase.TEST)],
                       exclude=[], top_k=1)
    up, loss, acc = (l for l in n.to_proto().layer if l.type not in ("Input",))
    assert up.name == "upsample" and up.convolution_param.num_output == 4
    assert list(up.convolution_param.stride) == [2] and up.param[0].lr_mult == 0
    assert loss.softmax_param.axis == 1 and loss.loss_param.ignore_label == 255
    assert loss.loss_param.normalization == caffe_pb2.LossParameter.VALID
    assert list(loss.loss_weight) == [2] and loss.include[0].phase == caffe_pb2.TRAIN
    assert acc.accuracy_param.top_k == 1 and acc.include[0].phase == caffe_pb2.TEST


def test_explicit_param_messages_enum_names_and_message_values():
    filler = caffe_pb2.FillerParameter(type="gaussian", std=0.01)
    top = L.Convolution(L.Input(shape=dict(dim=[1, 1, 4, 4])),
                        convolution_param=dict(num_output=2, kernel_size=[3]),
                        weight_filler=filler, engine="CAFFE")
    conv = top.to_proto().layer[1].convolution_param
    assert conv.num_output == 2 and conv.weight_filler == filler
    assert conv.engine == caffe_pb2.ConvolutionParameter.CAFFE


def test_param_field_lookup():
    assert param_fields("InnerProduct") == ["inner_product_param"]
    assert param_fields("Deconvolution") == ["convolution_param"]
    assert param_fields("LSTM") == ["recurrent_param"]
    assert param_fields("EuclideanLoss") == ["loss_param"]
    assert param_fields("ReLU") == ["relu_param"] and param_fields("Silence") == []


def test_mistakes_fail_where_they_are_written():
    data = L.Input(shape=dict(dim=[1]))
    with pytest.raises(NetError, match="kernal_size.*did you mean 'kernel_size'"):
        L.Convolution(data, kernal_size=3)
    with pytest.raises(NetError, match="'MAXX' is not a PoolMethod"):
        L.Pooling(data, pool="MAXX")
    with pytest.raises(NetError, match="weight_filler: .*give a dict"):
        L.InnerProduct(data, weight_filler="xavier")
    with pytest.raises(TypeError, match="not a Top"):
        L.ReLU("data")
    n = NetSpec()
    n.data = data
    with pytest.raises(AttributeError, match="did you mean 'data'"):
        n.dat
    with pytest.raises(TypeError, match="must be a Top"):
        n.size = 3
    with pytest.raises(AttributeError, match="no PolingParameter.*did you mean 'Pooling'"):
        P.Poling


def test_residual_blocks_build_and_run():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 8, 16, 16]))
    stem = conv_bn_scale_relu(n, "conv1", n.data, 16, 3, pad=1)
    same = residual_block(n, "res2a", stem, 16)
    down = residual_block(n, "res3a", same, 32, stride=2, projection=True)
    residual_block(n, "res4a", down, 8, stride=2, projection=True, bottleneck=True)
    proto = n.to_proto()
    by_name = {l.name: l for l in proto.layer}
    assert by_name["res2a"].bottom[:] == ["conv1", "res2a_branch2b"]
    assert by_name["res3a_branch1"].convolution_param.stride[:] == [2]
    assert by_name["conv1_bn"].top[:] == ["conv1"] and by_name["res2a_relu"].top[:] == ["res2a"]
    assert "res2a_branch2b_relu" not in by_name and "res4a_branch2c_scale" in by_name
    net = run_from_text(proto)
    assert net.blobs["res3a"].shape == (2, 32, 8, 8)
    assert net.blobs["res4a"].shape == (2, 32, 4, 4)
    assert [b.shape for b in net.params["conv1_bn"]] == [(16,), (16,), (1,)]
    out = net.forward(data=np.random.default_rng(1).random((2, 8, 16, 16)))["res4a"]
    assert np.isfinite(out).all() and (out >= 0).all()


def test_inception_module_concatenates_its_branches():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 16, 7, 7]))
    inception_module(n, "inception_3a", n.data, 8, 4, 12, 2, 4, 6)
    net = run_from_text(n.to_proto())
    assert net.blobs["inception_3a/output"].shape == (1, 8 + 12 + 4 + 6, 7, 7)
    assert "inception_3a/pool_proj_relu" in net.layer_dict
