"""The net builder: NetState filtering, split insertion, wiring, params, backward rules.

The filtering and split cases follow Caffe's test_net.cpp (FilterNetTest) and
test_split_layer.cpp (SplitLayerInsertionTest), with nets of our own.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import protonet
from protonet.io.text import parse_text
from protonet.layers import registered_types
from protonet.net.module import NetModule
from protonet.net.splits import insert_splits
from protonet.net.state import filter_net, layer_included, state_meets_rule
from protonet.proto import caffe_pb2

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def net_param(text: str) -> caffe_pb2.NetParameter:
    return parse_text(text, caffe_pb2.NetParameter())


def build(text: str, phase: int | None = TEST, **kwargs) -> NetModule:
    return NetModule(net_param(text), phase, **kwargs)


def layer(module: NetModule, name: str):
    return module.layers[module.layer_names.index(name)]


def step(module: NetModule, name: str):
    return module.steps[module.layer_names.index(name)]


def bottom_need_backward(module: NetModule) -> list[list[bool]]:
    return [[not d for d in s.detach] for s in module.steps]


def needs_loss_layers():
    if "EuclideanLoss" not in registered_types():
        pytest.skip("EuclideanLoss is not registered yet")


# --- NetState filtering (Caffe's FilterNetTest) ------------------------------------

FILTER_BASE = """
name: "filtered"
layer { name: "data" type: "Data" top: "data" top: "label" %s }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" %s }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" %s }
"""


def filtered(state: str, data: str = "", ip: str = "", loss: str = "") -> list[str]:
    """Names of the layers FilterNet keeps, checking idempotence as Caffe's test does."""
    param = net_param(state + FILTER_BASE % (data, ip, loss))
    once = filter_net(param)
    twice = filter_net(once)
    assert once == twice
    assert once.state == param.state and once.name == param.name
    kept = [l.name for l in once.layer]
    for l in once.layer:   # kept layers are copied whole, rules included
        assert l == next(o for o in param.layer if o.name == l.name)
    return kept


ALL = ["data", "ip", "loss"]


def test_filter_no_rules_keeps_everything():
    assert filtered("") == ALL
    assert filtered("state { phase: TRAIN level: 7 stage: 'x' }") == ALL


def test_filter_by_phase_like_lenet_train_test():
    text = """
    layer { name: "train_data" type: "Data" top: "data" top: "label" include { phase: TRAIN } }
    layer { name: "test_data" type: "Data" top: "data" top: "label" include { phase: TEST } }
    layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" }
    layer { name: "accuracy" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy"
            include { phase: TEST } }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
    """
    train = filter_net(net_param("state { phase: TRAIN } " + text))
    test = filter_net(net_param("state { phase: TEST } " + text))
    default = filter_net(net_param(text))    # NetState's phase defaults to TEST
    assert [l.name for l in train.layer] == ["train_data", "ip", "loss"]
    assert [l.name for l in test.layer] == ["test_data", "ip", "accuracy", "loss"]
    assert list(default.layer) == list(test.layer)


def test_filter_out_by_stage():
    assert filtered("", data="include { stage: 'mystage' }") == ["ip", "loss"]
    assert filtered("", ip="include { stage: 'mystage' }") == ["data", "loss"]


def test_filter_in_by_stage():
    state = "state { stage: 'mystage' }"
    assert filtered(state, data="include { stage: 'mystage' }") == ALL
    assert filtered(state, ip="include { stage: 'mystage' }") == ALL


def test_filter_by_multiple_stages_in_one_rule_needs_all():
    rule = "include { stage: 'mystage' stage: 'myotherstage' }"
    assert filtered("state { stage: 'mystage' }", data=rule) == ["ip", "loss"]
    assert filtered("state { stage: 'mystage' stage: 'myotherstage' }", data=rule) == ALL
    # An extra stage in the state does not matter.
    assert filtered("state { stage: 'mystage' stage: 'myotherstage' stage: 'x' }",
                    data=rule) == ALL


def test_filter_by_one_of_several_include_rules():
    rules = "include { stage: 'mystage' } include { stage: 'myotherstage' }"
    assert filtered("state { stage: 'myotherstage' }", ip=rules) == ALL
    assert filtered("state { stage: 'third' }", ip=rules) == ["data", "loss"]


def test_filter_by_not_stage():
    rule = "include { not_stage: 'mystage' }"
    assert filtered("", ip=rule) == ALL
    assert filtered("state { stage: 'other' }", ip=rule) == ALL
    assert filtered("state { stage: 'mystage' }", ip=rule) == ["data", "loss"]


def test_filter_out_by_level():
    assert filtered("", data="include { min_level: 3 }") == ["ip", "loss"]
    assert filtered("state { level: 2 }", data="include { min_level: 3 }") == ["ip", "loss"]
    assert filtered("state { level: 4 }", loss="include { max_level: 3 }") == ["data", "ip"]
    assert filtered("state { level: -1 }", ip="include { min_level: 0 }") == ["data", "loss"]


def test_filter_in_by_level():
    assert filtered("", data="include { min_level: 0 }") == ALL
    assert filtered("state { level: 3 }", data="include { min_level: 3 }") == ALL
    assert filtered("", loss="include { max_level: 0 }") == ALL
    assert filtered("state { level: -2 }", loss="include { max_level: -2 }") == ALL
    assert filtered("state { level: 2 }",
                    ip="include { min_level: 1 max_level: 3 }") == ALL


def test_filter_in_and_out_by_include_multi_rule():
    ip = "include { min_level: 2 phase: TRAIN }"
    loss = "include { min_level: 2 phase: TEST }"
    assert filtered("state { level: 4 phase: TRAIN }", ip=ip, loss=loss) == ["data", "ip"]
    assert filtered("state { level: 4 phase: TEST }", ip=ip, loss=loss) == ["data", "loss"]
    assert filtered("state { level: 1 phase: TEST }", ip=ip, loss=loss) == ["data"]


def test_filter_in_by_include_multi_rule():
    ip = "include { min_level: 2 phase: TRAIN } include { phase: TEST }"
    loss = "include { min_level: 2 phase: TEST } include { phase: TRAIN }"
    assert filtered("state { level: 2 phase: TRAIN }", ip=ip, loss=loss) == ALL
    assert filtered("state { level: 2 phase: TEST }", ip=ip, loss=loss) == ALL


def test_filter_in_and_out_by_exclude_multi_rule():
    ip = "exclude { min_level: 2 phase: TRAIN }"
    loss = "exclude { min_level: 2 phase: TEST }"
    assert filtered("state { level: 4 phase: TRAIN }", ip=ip, loss=loss) == ["data", "loss"]
    assert filtered("state { level: 4 phase: TEST }", ip=ip, loss=loss) == ["data", "ip"]
    assert filtered("state { level: 1 phase: TRAIN }", ip=ip, loss=loss) == ALL


def test_filter_exclude_by_stage_and_one_of_several_exclude_rules():
    rules = "exclude { stage: 'deploy' } exclude { phase: TRAIN }"
    assert filtered("state { stage: 'deploy' }", data=rules) == ["ip", "loss"]
    assert filtered("state { phase: TRAIN }", data=rules) == ["ip", "loss"]
    assert filtered("state { phase: TEST stage: 'val' }", data=rules) == ALL


def test_empty_rule_matches_every_state():
    state = caffe_pb2.NetState(phase=TRAIN, level=5, stage=["a"])
    assert state_meets_rule(state, caffe_pb2.NetStateRule())
    assert filtered("", ip="include { }") == ALL
    assert filtered("", ip="exclude { }") == ["data", "loss"]


def test_include_and_exclude_together_is_an_error():
    with pytest.raises(protonet.NetError) as info:
        filtered("", ip="include { phase: TEST } exclude { phase: TRAIN }")
    assert info.value.layer == "ip"
    assert "include" in str(info.value) and "exclude" in str(info.value)
    lp = net_param(FILTER_BASE % ("", "", "")).layer[0]
    lp.include.add()
    lp.exclude.add()
    with pytest.raises(protonet.NetError):
        layer_included(lp, caffe_pb2.NetState())


STAGED = """
state { phase: TRAIN stage: "from_file" }
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "train_only" type: "ReLU" bottom: "data" top: "a" include { phase: TRAIN } }
layer { name: "test_only" type: "ReLU" bottom: "data" top: "b" include { phase: TEST } }
layer { name: "deep" type: "ReLU" bottom: "data" top: "c" include { min_level: 2 } }
layer { name: "staged" type: "ReLU" bottom: "data" top: "d" include { stage: "extra" } }
layer { name: "not_deploy" type: "ReLU" bottom: "data" top: "e" exclude { stage: "deploy" } }
"""


def _kept(module: NetModule) -> list[str]:
    return [n for n in module.layer_names if not n.endswith("_split")]


def test_netmodule_takes_phase_level_and_stages():
    assert _kept(build(STAGED, TRAIN)) == ["data", "train_only", "not_deploy"]
    assert _kept(build(STAGED, TEST)) == ["data", "test_only", "not_deploy"]
    assert _kept(build(STAGED, None)) == ["data", "train_only", "not_deploy"]  # file's phase
    assert _kept(build(STAGED, TEST, level=2)) == ["data", "test_only", "deep", "not_deploy"]
    assert _kept(build(STAGED, TEST, stages=["extra", "deploy"])) == \
        ["data", "test_only", "staged"]
    assert build(STAGED, TEST).phase == TEST


def test_layers_get_the_net_phase_unless_they_set_one():
    module = build(STAGED + 'layer { name: "p" type: "ReLU" bottom: "e" top: "p" '
                            'phase: TRAIN }', TEST)
    phases = {lp.name: lp.phase for lp in module.net_param.layer}
    assert phases["data"] == TEST and phases["not_deploy"] == TEST
    assert phases["p"] == TRAIN


# --- InsertSplits (Caffe's SplitLayerInsertionTest) ------------------------------------

def layers_of(param: caffe_pb2.NetParameter) -> list[tuple]:
    return [(l.name, l.type, list(l.bottom), list(l.top), list(l.loss_weight))
            for l in param.layer]


def test_no_split_for_blobs_read_once():
    text = """
    layer { name: "data" type: "Data" top: "data" top: "label" }
    layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" }
    layer { name: "relu" type: "ReLU" bottom: "ip" top: "ip" }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" }
    """
    param = net_param(text)
    assert insert_splits(param) == param


def test_blob_read_by_three_layers_gets_a_split():
    param = net_param("""
    layer { name: "input" type: "Input" top: "x" }
    layer { name: "a" type: "ReLU" bottom: "x" top: "a" }
    layer { name: "b" type: "TanH" bottom: "x" top: "b" }
    layer { name: "c" type: "Sigmoid" bottom: "x" top: "c" }
    """)
    assert layers_of(insert_splits(param)) == [
        ("input", "Input", [], ["x"], []),
        ("x_input_0_split", "Split", ["x"],
         ["x_input_0_split_0", "x_input_0_split_1", "x_input_0_split_2"], []),
        ("a", "ReLU", ["x_input_0_split_0"], ["a"], []),
        ("b", "TanH", ["x_input_0_split_1"], ["b"], []),
        ("c", "Sigmoid", ["x_input_0_split_2"], ["c"], []),
    ]


def test_split_names_use_top_index_and_repeated_bottoms():
    param = net_param("""
    layer { name: "data" type: "Data" top: "data" top: "label" }
    layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1" }
    layer { name: "ip2" type: "InnerProduct" bottom: "label" top: "ip2" }
    layer { name: "ip3" type: "InnerProduct" bottom: "data" top: "ip3" }
    layer { name: "ip4" type: "InnerProduct" bottom: "label" top: "ip4" }
    layer { name: "sum" type: "Eltwise" bottom: "ip4" bottom: "ip4" top: "sum" }
    """)
    assert layers_of(insert_splits(param)) == [
        ("data", "Data", [], ["data", "label"], []),
        ("data_data_0_split", "Split", ["data"], ["data_data_0_split_0",
                                                 "data_data_0_split_1"], []),
        ("label_data_1_split", "Split", ["label"], ["label_data_1_split_0",
                                                   "label_data_1_split_1"], []),
        ("ip1", "InnerProduct", ["data_data_0_split_0"], ["ip1"], []),
        ("ip2", "InnerProduct", ["label_data_1_split_0"], ["ip2"], []),
        ("ip3", "InnerProduct", ["data_data_0_split_1"], ["ip3"], []),
        ("ip4", "InnerProduct", ["label_data_1_split_1"], ["ip4"], []),
        ("ip4_ip4_0_split", "Split", ["ip4"], ["ip4_ip4_0_split_0", "ip4_ip4_0_split_1"], []),
        ("sum", "Eltwise", ["ip4_ip4_0_split_0", "ip4_ip4_0_split_1"], ["sum"], []),
    ]


def test_split_after_in_place_layer_is_named_after_that_layer():
    param = net_param("""
    layer { name: "data" type: "Data" top: "data" top: "label" }
    layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1" }
    layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
    layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" }
    layer { name: "loss1" type: "EuclideanLoss" bottom: "ip1" bottom: "label" }
    layer { name: "loss2" type: "EuclideanLoss" bottom: "ip2" bottom: "data" }
    """)
    assert layers_of(insert_splits(param)) == [
        ("data", "Data", [], ["data", "label"], []),
        ("data_data_0_split", "Split", ["data"], ["data_data_0_split_0",
                                                 "data_data_0_split_1"], []),
        ("ip1", "InnerProduct", ["data_data_0_split_0"], ["ip1"], []),
        ("relu1", "ReLU", ["ip1"], ["ip1"], []),
        ("ip1_relu1_0_split", "Split", ["ip1"], ["ip1_relu1_0_split_0",
                                                "ip1_relu1_0_split_1"], []),
        ("ip2", "InnerProduct", ["ip1_relu1_0_split_0"], ["ip2"], []),
        ("loss1", "EuclideanLoss", ["ip1_relu1_0_split_1", "label"], [], []),
        ("loss2", "EuclideanLoss", ["ip2", "data_data_0_split_1"], [], []),
    ]


def test_loss_weight_on_a_split_blob_moves_to_the_split():
    param = net_param("""
    force_backward: true
    layer { name: "data" type: "DummyData" top: "data" }
    layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1" loss_weight: 2.5 }
    layer { name: "ip2" type: "InnerProduct" bottom: "data" top: "ip2" }
    layer { name: "loss" type: "EuclideanLoss" bottom: "ip1" bottom: "ip2" }
    """)
    out = insert_splits(param)
    assert out.force_backward
    assert layers_of(out) == [
        ("data", "DummyData", [], ["data"], []),
        ("data_data_0_split", "Split", ["data"], ["data_data_0_split_0",
                                                 "data_data_0_split_1"], []),
        ("ip1", "InnerProduct", ["data_data_0_split_0"], ["ip1"], []),
        ("ip1_ip1_0_split", "Split", ["ip1"], ["ip1_ip1_0_split_0", "ip1_ip1_0_split_1"],
         [2.5, 0.0]),
        ("ip2", "InnerProduct", ["data_data_0_split_1"], ["ip2"], []),
        ("loss", "EuclideanLoss", ["ip1_ip1_0_split_1", "ip2"], [], []),
    ]


def test_loss_weighted_top_read_once_gets_a_split_but_zero_weight_does_not():
    param = net_param("""
    layer { name: "in" type: "Input" top: "x" }
    layer { name: "a" type: "ReLU" bottom: "x" top: "a" loss_weight: 1 }
    layer { name: "b" type: "ReLU" bottom: "a" top: "b" }
    layer { name: "c" type: "ReLU" bottom: "b" top: "c" loss_weight: 0 }
    layer { name: "d" type: "ReLU" bottom: "c" top: "d" }
    """)
    assert layers_of(insert_splits(param)) == [
        ("in", "Input", [], ["x"], []),
        ("a", "ReLU", ["x"], ["a"], []),
        ("a_a_0_split", "Split", ["a"], ["a_a_0_split_0", "a_a_0_split_1"], [1.0, 0.0]),
        ("b", "ReLU", ["a_a_0_split_1"], ["b"], []),
        ("c", "ReLU", ["b"], ["c"], [0.0]),
        ("d", "ReLU", ["c"], ["d"], []),
    ]


def test_loss_weight_on_a_split_blob_counts_once_in_the_built_net():
    needs_loss_layers()
    module = build("""
    layer { name: "data" type: "Input" top: "data" top: "target"
            input_param { shape { dim: 3 dim: 4 } shape { dim: 3 dim: 2 } } }
    layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1" loss_weight: 2.5
            inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }
    layer { name: "loss" type: "EuclideanLoss" bottom: "ip1" bottom: "target" top: "loss" }
    """)
    assert step(module, "ip1").losses == ()
    assert step(module, "ip1_ip1_0_split").losses == ((0, 2.5),)
    x, t = torch.randn(3, 4), torch.randn(3, 2)
    values, loss = module({"data": x, "target": t})
    ip1 = values[module.blob_index["ip1"]].detach()
    expected = 2.5 * ip1.sum() + ((ip1 - t) ** 2).sum() / 6
    assert torch.allclose(loss, expected, atol=1e-5)


def test_split_blobs_and_layers_appear_in_the_built_net():
    module = build("""
    layer { name: "input" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "a" type: "ReLU" bottom: "x" top: "a" }
    layer { name: "b" type: "TanH" bottom: "x" top: "b" }
    layer { name: "c" type: "Sigmoid" bottom: "x" top: "c" }
    """)
    assert module.layer_names == ["input", "x_input_0_split", "a", "b", "c"]
    assert module.blob_names == ["x", "x_input_0_split_0", "x_input_0_split_1",
                                 "x_input_0_split_2", "a", "b", "c"]
    assert layer(module, "x_input_0_split").type == "Split"
    x = torch.randn(2, 3)
    values, _ = module({"x": x})
    for name, fn in (("a", torch.relu), ("b", torch.tanh), ("c", torch.sigmoid)):
        assert torch.allclose(values[module.blob_index[name]], fn(x))


# --- wiring ----------------------------------------------------------------------------

IN_PLACE = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 5 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 6 weight_filler { type: "gaussian" } } }
layer { name: "relu" type: "ReLU" bottom: "ip" top: "ip" }
layer { name: "scale" type: "Power" bottom: "ip" top: "ip" power_param { scale: 3 } }
"""


def test_in_place_layers_reuse_their_bottom_blob():
    module = build(IN_PLACE)
    assert module.blob_names == ["data", "ip"]
    ip = module.blob_index["ip"]
    assert step(module, "relu").bottoms == step(module, "relu").tops == (ip,)
    assert step(module, "scale").tops == (ip,)
    assert module.output_names == ["ip"]
    x = torch.randn(4, 5)
    values, _ = module({"data": x})
    w, b = layer(module, "ip").blobs
    expected = 3 * torch.relu(x @ w.detach().t() + b.detach())
    assert torch.allclose(values[ip], expected, atol=1e-6)


def test_outputs_are_unconsumed_tops_sorted_like_std_set():
    module = build("""
    layer { name: "data" type: "Input" top: "data" top: "label"
            input_param { shape { dim: 2 dim: 3 } } }
    layer { name: "l1" type: "ReLU" bottom: "data" top: "zeta" }
    layer { name: "l2" type: "ReLU" bottom: "zeta" top: "Mid" }
    layer { name: "l3" type: "TanH" bottom: "zeta" top: "alpha" }
    layer { name: "l4" type: "Sigmoid" bottom: "data" top: "_b" }
    layer { name: "l5" type: "Sigmoid" bottom: "alpha" top: "alpha" }
    """)
    # 'label' is never read; 'zeta' and 'data' are read (through splits); byte order.
    assert module.output_names == ["Mid", "_b", "alpha", "label"]
    assert module.input_names == ["data", "label"]


def test_duplicate_top_name_is_an_error_naming_the_layer():
    with pytest.raises(protonet.NetError) as info:
        build("""
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 } } }
        layer { name: "a" type: "ReLU" bottom: "data" top: "x" }
        layer { name: "b" type: "TanH" bottom: "data" top: "x" }
        """)
    assert info.value.layer == "b" and info.value.layer_type == "TanH"
    assert "'x'" in str(info.value) and "more than one" in str(info.value)


def test_top_matching_a_bottom_at_another_index_is_not_in_place():
    # Caffe only treats top j as in place when it equals bottom j.
    with pytest.raises(protonet.NetError) as info:
        build("""
        layer { name: "data" type: "Input" top: "a" top: "b"
                input_param { shape { dim: 2 } } }
        layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "b" }
        """)
    assert info.value.layer == "sum"


def test_unknown_bottom_is_an_error_naming_the_layer():
    with pytest.raises(protonet.NetError) as info:
        build("""
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 } } }
        layer { name: "act" type: "ReLU" bottom: "dta" top: "act" }
        """)
    assert info.value.layer == "act"
    assert "'dta'" in str(info.value) and "bottom index 0" in str(info.value)


def test_bottom_produced_later_is_unknown():
    with pytest.raises(protonet.NetError) as info:
        build("""
        layer { name: "a" type: "ReLU" bottom: "late" top: "a" }
        layer { name: "data" type: "Input" top: "late" input_param { shape { dim: 2 } } }
        """)
    assert info.value.layer == "a"


def test_duplicate_layer_name_builds_with_a_warning(caplog):
    # As Caffe builds it; copying weights by an ambiguous name is what is refused
    # (tests/test_duplicate_names.py).
    with caplog.at_level("WARNING", logger="protonet"):
        net = build("""
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 } } }
        layer { name: "act" type: "ReLU" bottom: "data" top: "a" }
        layer { name: "act" type: "TanH" bottom: "a" top: "b" }
        """)
    assert net.layer_names == ["data", "act", "act"]
    assert any("'act' (TanH)" in r.getMessage() for r in caplog.records)


def test_propagate_down_count_mismatch():
    with pytest.raises(protonet.NetError) as info:
        build("""
        layer { name: "data" type: "Input" top: "a" top: "b"
                input_param { shape { dim: 2 } } }
        layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "s"
                propagate_down: true }
        """)
    assert info.value.layer == "sum"
    assert "propagate_down" in str(info.value) and "(2)" in str(info.value)


UNKNOWN_TYPE = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 } } }
layer { name: "act" type: "%s" bottom: "data" top: "a" }
"""


@pytest.mark.parametrize("typo, meant", [("ReLu", "ReLU"), ("Convolutoin", "Convolution"),
                                         ("InnerProdcut", "InnerProduct")])
def test_unknown_layer_type_names_closest_types(typo, meant):
    with pytest.raises(protonet.NetError) as info:
        build(UNKNOWN_TYPE % typo)
    assert info.value.layer == "act"
    assert f"unknown layer type '{typo}'" in str(info.value)
    assert f"did you mean '{meant}'" in str(info.value)


def test_unknown_layer_type_with_wrong_case_names_the_type():
    with pytest.raises(protonet.NetError) as info:
        build(UNKNOWN_TYPE % "Relu")
    assert "did you mean 'ReLU'" in str(info.value)


def test_wrong_number_of_bottoms_names_the_layer():
    with pytest.raises(protonet.NetError) as info:
        build("""
        layer { name: "data" type: "Input" top: "a" top: "b"
                input_param { shape { dim: 2 } } }
        layer { name: "ip" type: "InnerProduct" bottom: "a" bottom: "b" top: "c"
                inner_product_param { num_output: 2 } }
        """)
    assert info.value.layer == "ip" and "bottom" in str(info.value)


def test_shape_inference_error_names_layer_type_and_shapes():
    with pytest.raises(protonet.ShapeError) as info:
        build("""
        layer { name: "data" type: "Input" top: "a" top: "b"
                input_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 4 } } }
        layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "s" }
        """)
    message = str(info.value)
    assert info.value.layer == "sum" and info.value.layer_type == "Eltwise"
    assert message.startswith("layer 'sum' (Eltwise): ")
    assert "[2, 3]" in message and "[2, 4]" in message


def test_negative_top_shape_names_layer_and_shapes():
    with pytest.raises(protonet.ShapeError) as info:
        build("""
        layer { name: "data" type: "Input" top: "data"
                input_param { shape { dim: 1 dim: 1 dim: 3 dim: 3 } } }
        layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
                convolution_param { num_output: 2 kernel_size: 5 } }
        """)
    assert info.value.layer == "conv" and info.value.layer_type == "Convolution"
    assert "[1, 1, 3, 3]" in str(info.value)


def test_too_many_param_specs():
    with pytest.raises(protonet.NetError) as info:
        build("""
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
        layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
                param { } param { } param { } inner_product_param { num_output: 2 } }
        """)
    assert info.value.layer == "ip" and "param" in str(info.value)


# --- weight sharing and multipliers ------------------------------------------------------

SHARED = """
layer { name: "data" type: "Input" top: "data" top: "data2"
        input_param { shape { dim: 3 dim: 4 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        param { name: "w" %s } param { lr_mult: 2 decay_mult: 0 }
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" } } }
layer { name: "ip2" type: "InnerProduct" bottom: "data2" top: "ip2"
        param { name: "w" %s }
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" } } }
"""


def test_shared_param_is_the_same_tensor():
    module = build(SHARED % ("", ""))
    w1, b1 = layer(module, "ip1").blobs
    w2, b2 = layer(module, "ip2").blobs
    assert w2 is w1 and b2 is not b1
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    values, _ = module({"data": x, "data2": y})
    assert torch.allclose(values[module.blob_index["ip2"]], y @ w1.detach().t() + b2.detach())
    # Learnable params: the shared weight once, plus two biases.
    assert [(e.layer, e.index, e.name) for e in module.learnable] == [
        ("ip1", 0, "w"), ("ip1", 1, ""), ("ip2", 1, "")]
    assert module.learnable[0].users == [("ip1", 0), ("ip2", 0)]
    assert len(list(module.parameters())) == 3


def test_multipliers_are_recorded():
    module = build(SHARED % ("lr_mult: 0.5 decay_mult: 3", ""))
    entries = {(e.layer, e.index): e for e in module.learnable}
    assert (entries["ip1", 0].lr_mult, entries["ip1", 0].decay_mult) == (0.5, 3.0)
    assert (entries["ip1", 1].lr_mult, entries["ip1", 1].decay_mult) == (2.0, 0.0)
    assert (entries["ip2", 1].lr_mult, entries["ip2", 1].decay_mult) == (1.0, 1.0)
    assert not entries["ip2", 1].has_lr


def test_sharer_sets_multipliers_the_owner_left_unset():
    module = build(SHARED % ("", "lr_mult: 4 decay_mult: 0.25"))
    owner = module.learnable[0]
    assert (owner.lr_mult, owner.decay_mult) == (4.0, 0.25)
    assert owner.has_lr and owner.has_decay


def test_equal_multipliers_on_both_sides_are_fine():
    module = build(SHARED % ("lr_mult: 3", "lr_mult: 3"))
    assert module.learnable[0].lr_mult == 3.0


def test_lr_mult_mismatch_on_a_shared_param_is_an_error():
    with pytest.raises(protonet.NetError) as info:
        build(SHARED % ("lr_mult: 1", "lr_mult: 2"))
    assert info.value.layer == "ip2" and "lr_mult" in str(info.value)
    assert "'w'" in str(info.value)


def test_decay_mult_mismatch_on_a_shared_param_is_an_error():
    with pytest.raises(protonet.NetError) as info:
        build(SHARED % ("decay_mult: 1", "decay_mult: 0"))
    assert info.value.layer == "ip2" and "decay_mult" in str(info.value)


def test_strict_sharing_needs_equal_shapes():
    text = SHARED.replace("top: \"ip2\"\n", "top: \"ip2\"\n").replace(
        'param { name: "w" %s }\n        inner_product_param { num_output: 5',
        'param { name: "w" %s }\n        inner_product_param { num_output: 10')
    with pytest.raises(protonet.NetError) as info:
        build(text % ("", ""))
    message = str(info.value)
    assert info.value.layer == "ip2"
    assert "'w'" in message and "'ip1'" in message
    assert "[5, 4]" in message and "[10, 4]" in message and "PERMISSIVE" in message


PERMISSIVE = """
force_backward: true
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 6 } } }
layer { name: "a" type: "InnerProduct" bottom: "data" top: "a"
        param { name: "w" }
        inner_product_param { num_output: 4 bias_term: false weight_filler { type: "gaussian" } }
}
layer { name: "r" type: "Reshape" bottom: "data" top: "r"
        reshape_param { shape { dim: 2 dim: 3 dim: 2 } } }
layer { name: "b" type: "InnerProduct" bottom: "r" top: "b"
        param { name: "w" share_mode: %s }
        inner_product_param { num_output: %d axis: 2 bias_term: false
                              weight_filler { type: "gaussian" } } }
"""


def test_strict_sharing_rejects_equal_count_with_different_shape():
    with pytest.raises(protonet.NetError) as info:
        build(PERMISSIVE % ("STRICT", 12))
    assert info.value.layer == "b" and "[4, 6]" in str(info.value)


def test_permissive_sharing_needs_equal_counts():
    with pytest.raises(protonet.NetError) as info:
        build(PERMISSIVE % ("PERMISSIVE", 8))
    assert info.value.layer == "b" and "count" in str(info.value)
    assert "[4, 6]" in str(info.value) and "[8, 2]" in str(info.value)


def test_permissive_sharing_uses_the_owners_memory_in_the_sharers_shape():
    module = build(PERMISSIVE % ("PERMISSIVE", 12))
    owner = layer(module, "a").blobs[0]
    seen = layer(module, "b").blobs[0]
    assert tuple(owner.shape) == (4, 6) and tuple(seen.shape) == (12, 2)
    assert seen.data_ptr() == owner.data_ptr()
    assert len(module.learnable) == 1 and module.learnable[0].users == [("a", 0), ("b", 0)]
    x = torch.randn(2, 6)
    values, _ = module({"data": x})
    w = owner.detach().clone()
    assert torch.allclose(values[module.blob_index["b"]],
                          x.reshape(2, 3, 2) @ w.reshape(12, 2).t(), atol=1e-6)
    with torch.no_grad():
        owner.mul_(2)
    values, _ = module({"data": x})
    assert torch.allclose(values[module.blob_index["b"]],
                          x.reshape(2, 3, 2) @ (2 * w).reshape(12, 2).t(), atol=1e-6)
    # Both uses add into the owner's gradient, in the owner's shape.
    ga = torch.randn(2, 4)
    gb = torch.randn(2, 3, 12)
    values, _ = module({"data": x})
    torch.autograd.backward([values[module.blob_index["a"]], values[module.blob_index["b"]]],
                            [ga, gb])
    expected = ga.t() @ x + (gb.reshape(6, 12).t() @ x.reshape(6, 2)).reshape(4, 6)
    assert torch.allclose(owner.grad, expected, atol=1e-5)


def test_shared_weights_gradient_is_the_sum_of_both_uses():
    module = build("force_backward: true" + SHARED % ("", ""))
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    g1, g2 = torch.randn(3, 5), torch.randn(3, 5)
    values, _ = module({"data": x, "data2": y})
    torch.autograd.backward([values[module.blob_index["ip1"]],
                             values[module.blob_index["ip2"]]], [g1, g2])
    w = layer(module, "ip1").blobs[0]
    assert torch.allclose(w.grad, g1.t() @ x + g2.t() @ y, atol=1e-5)


# --- loss weights and backward ------------------------------------------------------------

def test_loss_layers_get_loss_weight_one_by_default():
    needs_loss_layers()
    module = build("""
    layer { name: "data" type: "Input" top: "a" top: "b"
            input_param { shape { dim: 3 dim: 2 } } }
    layer { name: "loss" type: "EuclideanLoss" bottom: "a" bottom: "b" top: "loss" }
    """)
    assert step(module, "loss").losses == ((0, 1.0),)
    a, b = torch.randn(3, 2), torch.randn(3, 2)
    values, loss = module({"a": a, "b": b})
    expected = ((a - b) ** 2).sum() / 2 / 3
    assert torch.allclose(loss, expected) and torch.allclose(values[-1], expected)


def test_loss_layer_without_top_gets_an_automatic_one():
    needs_loss_layers()
    module = build("""
    layer { name: "data" type: "Input" top: "a" top: "b"
            input_param { shape { dim: 3 dim: 2 } } }
    layer { name: "loss" type: "EuclideanLoss" bottom: "a" bottom: "b" }
    """)
    assert len(step(module, "loss").tops) == 1
    assert step(module, "loss").losses == ((0, 1.0),)
    _, loss = module({"a": torch.ones(3, 2), "b": torch.zeros(3, 2)})
    assert float(loss) == pytest.approx(1.0)


def test_loss_weight_scales_the_loss_and_any_layer_can_be_a_loss():
    needs_loss_layers()
    module = build("""
    layer { name: "data" type: "Input" top: "a" top: "b"
            input_param { shape { dim: 3 dim: 2 } } }
    layer { name: "loss" type: "EuclideanLoss" bottom: "a" bottom: "b" top: "loss"
            loss_weight: 2.5 }
    layer { name: "mid" type: "Power" bottom: "a" top: "p" loss_weight: 0.5 }
    layer { name: "free" type: "Power" bottom: "b" top: "q" loss_weight: 0 }
    """)
    assert step(module, "loss").losses == ((0, 2.5),)
    assert step(module, "mid").losses == ((0, 0.5),)
    assert step(module, "free").losses == ()
    a, b = torch.randn(3, 2), torch.randn(3, 2)
    _, loss = module({"a": a, "b": b})
    expected = 2.5 * ((a - b) ** 2).sum() / 6 + 0.5 * a.sum()
    assert torch.allclose(loss, expected, atol=1e-6)


def test_loss_weight_count_must_match_tops():
    with pytest.raises(protonet.NetError) as info:
        build("""
        layer { name: "data" type: "Input" top: "a" input_param { shape { dim: 2 } } }
        layer { name: "two" type: "Slice" bottom: "a" top: "x" top: "y"
                slice_param { axis: 0 } loss_weight: 1 }
        """)
    assert info.value.layer == "two" and "loss_weight" in str(info.value)


# Caffe's TinyNet, with and without force_backward.
TINY = """
name: "tiny"
%s
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param {
    shape { dim: 5 dim: 2 dim: 3 dim: 4 } data_filler { type: "gaussian" std: 0.01 }
    shape { dim: 5 } data_filler { type: "constant" value: 0 } } }
layer { name: "innerproduct" type: "InnerProduct" bottom: "data" top: "innerproduct"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  inner_product_param { num_output: %d weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "loss" type: "%s" bottom: "innerproduct" bottom: "label" top: "top_loss" }
"""


def test_bottom_need_backward():
    needs_loss_layers()
    module = build(TINY % ("", 10, "SoftmaxWithLoss"))
    assert bottom_need_backward(module) == [[], [False], [True, False]]


def test_bottom_need_backward_force():
    needs_loss_layers()
    module = build(TINY % ("force_backward: true", 10, "SoftmaxWithLoss"))
    assert bottom_need_backward(module) == [[], [True], [True, False]]
    euclidean = TINY.replace("shape { dim: 5 } data_filler", "shape { dim: 5 dim: 1 } data_filler")
    module = build(euclidean % ("force_backward: true", 1, "EuclideanLoss"))
    assert bottom_need_backward(module) == [[], [True], [True, True]]


def test_bottom_need_backward_tricky():
    needs_loss_layers()
    module = build("""
    layer { name: "data" type: "DummyData" top: "data" top: "label"
      dummy_data_param { num: 5 channels: 2 height: 3 width: 4
                         num: 5 channels: 1 height: 1 width: 1 } }
    layer { name: "ip_data" type: "InnerProduct" bottom: "data" top: "transformed_data"
      inner_product_param { num_output: 10 } }
    layer { name: "ip_label" type: "InnerProduct" bottom: "label" top: "transformed_label"
      inner_product_param { num_output: 1 } }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "transformed_data"
      bottom: "transformed_label" }
    """)
    # The label bottom "needs backward" because there are weights under it.
    assert bottom_need_backward(module) == [[], [False], [False], [True, True]]


SKIP_PROP = """
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 5 dim: 2 dim: 3 dim: 4 } data_filler { type: "gaussian" }
                     shape { dim: 5 } } }
layer { name: "silence" type: "Silence" bottom: "label" }
layer { name: "innerproduct" type: "InnerProduct" bottom: "data" top: "innerproduct"
  inner_product_param { num_output: 1 weight_filler { type: "gaussian" } } }
layer { name: "ip_fake_labels" type: "InnerProduct" bottom: "data" top: "fake_labels"
  inner_product_param { num_output: 1 weight_filler { type: "gaussian" } } }
layer { name: "argmax" type: "ArgMax" bottom: "fake_labels" top: "label_argmax" }
layer { name: "loss" type: "EuclideanLoss" bottom: "innerproduct"
  bottom: "label_argmax" propagate_down: true propagate_down: %s
  top: "cross_entropy_loss" loss_weight: 0.1 }
"""


def test_skip_propagate_down():
    # Caffe's test uses SigmoidCrossEntropyLoss, which Caffe builds with
    # propagate_down: true on the label and only aborts in Backward; protonet refuses
    # that at setup, so the port uses EuclideanLoss, whose both bottoms take gradients.
    needs_loss_layers()
    for skip in (False, True):
        module = build(SKIP_PROP % ("false" if skip else "true"))
        needs = dict(zip(module.layer_names, module.layer_need_backward))
        assert bottom_need_backward(module)[module.layer_names.index("loss")][1] == (not skip)
        for name, need in needs.items():
            if skip:
                expected = name in ("innerproduct", "loss")
            else:
                expected = "data" not in name and name != "silence"
            assert need == expected, (skip, name)


def test_propagate_down_false_stops_the_gradient():
    needs_loss_layers()
    text = """
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 3 dim: 4 } } }
    layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "a"
            inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }
    layer { name: "ip2" type: "InnerProduct" bottom: "data" top: "b"
            inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }
    layer { name: "loss" type: "EuclideanLoss" bottom: "a" bottom: "b" top: "loss"
            propagate_down: true propagate_down: %s }
    """
    torch.manual_seed(0)
    both = build(text % "true")
    torch.manual_seed(0)
    one = build(text % "false")
    x = torch.randn(3, 4)
    for module in (both, one):
        _, loss = module({"data": x})
        loss.backward()
    assert layer(both, "ip2").blobs[0].grad is not None
    assert layer(one, "ip2").blobs[0].grad is None or \
        not layer(one, "ip2").blobs[0].grad.any()
    assert torch.allclose(layer(one, "ip1").blobs[0].grad, layer(both, "ip1").blobs[0].grad)
    assert bottom_need_backward(one)[one.layer_names.index("loss")] == [True, False]
    assert one.layer_need_backward[one.layer_names.index("ip2")] is False
    # As in Caffe, force_backward overrides propagate_down: false where the layer
    # allows forcing (EuclideanLoss does for both bottoms).
    forced = build("force_backward: true" + text % "false")
    assert bottom_need_backward(forced)[forced.layer_names.index("loss")] == [True, True]


def test_force_propagate_down():
    needs_loss_layers()
    text = """
    layer { name: "data" type: "DummyData" top: "data" top: "label"
      dummy_data_param { shape { dim: 5 dim: 2 dim: 3 dim: 4 } shape { dim: 5 dim: 1 } } }
    layer { name: "innerproduct" type: "InnerProduct" bottom: "data" top: "innerproduct"
      inner_product_param { num_output: 1 } %s }
    layer { name: "loss" type: "SigmoidCrossEntropyLoss" bottom: "innerproduct"
      bottom: "label" top: "cross_entropy_loss" }
    """
    for force in (False, True):
        module = build(text % ("propagate_down: true" if force else ""))
        needs = bottom_need_backward(module)
        assert needs == [[], [force], [True, False]]
        assert module.layer_need_backward == [False, True, True]


FORCE = """
%s
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        param { lr_mult: 0 } param { lr_mult: 0 }
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" } } }
layer { name: "act" type: "TanH" bottom: "ip" top: "act" }
"""


def test_force_backward_computes_input_diffs():
    plain = build(FORCE % "")
    forced = build(FORCE % "force_backward: true")
    data = plain.blob_index["data"]
    assert not any(plain.layer_need_backward)
    assert not plain.blob_need_backward[data]
    assert all(forced.layer_need_backward) and forced.blob_need_backward[data]

    x = torch.randn(2, 3, requires_grad=True)
    values, _ = forced({"data": x})
    act = values[forced.blob_index["act"]]
    top = torch.randn(2, 4)
    act.backward(top)
    w = layer(forced, "ip").blobs[0].detach()
    expected = (top * (1 - act.detach() ** 2)) @ w
    assert torch.allclose(x.grad, expected, atol=1e-6)

    x2 = torch.randn(2, 3, requires_grad=True)
    values, _ = plain({"data": x2})
    assert not values[plain.blob_index["act"]].requires_grad


def test_force_backward_through_pycaffe_returns_input_diffs():
    net = protonet.Net(net_param(FORCE % "force_backward: true"), protonet.TEST)
    x = np.random.RandomState(0).randn(2, 3).astype(np.float32)
    out = net.forward(data=x)
    top = np.ones((2, 4), np.float32)
    diffs = net.backward(act=top)
    w = net.params["ip"][0].data
    expected = (top * (1 - out["act"] ** 2)) @ w
    np.testing.assert_allclose(diffs["data"], expected, rtol=1e-5, atol=1e-6)


def test_gradient_through_a_blob_read_twice_is_the_sum():
    text = """
    force_backward: true
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 3 dim: 4 } } }
    layer { name: "ip" type: "InnerProduct" bottom: "data" top: "x"
            inner_product_param { num_output: 5 weight_filler { type: "gaussian" } } }
    %s
    """
    branch_a = 'layer { name: "pa" type: "Power" bottom: "x" top: "pa" ' \
               'power_param { power: 2 scale: 0.5 } loss_weight: 1 }'
    branch_b = 'layer { name: "pb" type: "TanH" bottom: "x" top: "pb" loss_weight: 3 }'
    x = torch.randn(3, 4)
    grads = {}
    for key, body in (("a", branch_a), ("b", branch_b), ("ab", branch_a + branch_b)):
        torch.manual_seed(1)
        module = build(text % body)
        data = x.clone().requires_grad_(True)
        _, loss = module({"data": data})
        loss.backward()
        ip = layer(module, "ip")
        grads[key] = (data.grad, ip.blobs[0].grad, ip.blobs[1].grad)
    assert "x_ip_0_split" in module.layer_names
    for a, b, ab in zip(grads["a"], grads["b"], grads["ab"]):
        assert torch.allclose(ab, a + b, atol=1e-5)


def test_layer_feeding_no_loss_gets_no_backward():
    needs_loss_layers()
    module = build("""
    layer { name: "data" type: "Input" top: "data" top: "target"
            input_param { shape { dim: 3 dim: 4 } shape { dim: 3 dim: 2 } } }
    layer { name: "main" type: "InnerProduct" bottom: "data" top: "main"
            inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }
    layer { name: "side" type: "InnerProduct" bottom: "data" top: "side"
            inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }
    layer { name: "side_act" type: "ReLU" bottom: "side" top: "side" }
    layer { name: "loss" type: "EuclideanLoss" bottom: "main" bottom: "target" top: "loss" }
    """)
    needs = dict(zip(module.layer_names, module.layer_need_backward))
    assert needs["main"] and needs["loss"]
    assert not needs["side"] and not needs["side_act"]
    assert step(module, "side").no_grad and step(module, "side_act").no_grad
    values, loss = module({"data": torch.randn(3, 4), "target": torch.randn(3, 2)})
    assert not values[module.blob_index["side"]].requires_grad
    loss.backward()
    assert layer(module, "main").blobs[0].grad is not None
    assert layer(module, "side").blobs[0].grad is None
    assert "side" in module.output_names


def test_lr_mult_zero_everywhere_means_no_backward():
    needs_loss_layers()
    module = build("""
    layer { name: "data" type: "Input" top: "data" top: "target"
            input_param { shape { dim: 3 dim: 4 } shape { dim: 3 dim: 2 } } }
    layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
            param { lr_mult: 0 } param { lr_mult: 0 }
            inner_product_param { num_output: 2 } }
    layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "target" top: "loss" }
    """)
    assert module.layer_need_backward == [False, False, False]
    assert not layer(module, "ip").blobs[0].requires_grad


def test_pooling_window_starting_past_the_image_is_a_shape_error():
    text = '''layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 1 dim: 5 dim: 5 } } }
layer { name: "p" type: "Pooling" bottom: "x" top: "y"
        pooling_param { pool: MAX kernel_size: 1 stride: 3 } }'''
    with pytest.raises(protonet.ShapeError, match=r"layer .p. \(Pooling\).*starts outside"):
        build(text)


# -- BatchNorm + Scale pairs ----------------------------------------------------------------
BN_SCALE_NET = """
force_backward: true
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 5 dim: 5 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 bias_term: false
                            weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv"
        batch_norm_param { use_global_stats: true } }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv"
        scale_param { bias_term: true filler { type: "uniform" min: 0.5 max: 2 }
                      bias_filler { type: "uniform" min: -1 max: 1 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "bn2" type: "BatchNorm" bottom: "conv" top: "normed" }
layer { name: "scale2" type: "Scale" bottom: "normed" top: "normed" }
layer { name: "ip" type: "InnerProduct" bottom: "normed" top: "ip"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
"""


@pytest.mark.parametrize("phase", [caffe_pb2.TRAIN, TEST])
def test_batchnorm_scale_pairs_run_as_one_pass_with_the_same_results(phase):
    """An in-place BatchNorm + per-channel Scale is one batch-norm pass, on stored
    statistics and (bn2 in TRAIN) on batch statistics alike; blobs and every gradient
    equal running the two layers one after the other."""
    net = build(BN_SCALE_NET, phase).double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in ("bn", "bn2"):
            mean, var, factor = layer(net, name).blobs
            mean.normal_(0, 1, generator=gen), var.uniform_(0.5, 2, generator=gen)
            factor.fill_(2.0)
    steps = {net.layer_names[s.layer]: i for i, s in enumerate(net.steps)}
    expected_pairs = {steps["bn"]: steps["scale"], steps["bn2"]: steps["scale2"]}
    assert net.fused_scale == expected_pairs
    data = torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64)

    def run():
        x = data.clone().requires_grad_()
        values, _ = net({"data": x})
        values[net.blob_index["ip"]].square().sum().backward()
        grads = [x.grad] + [p.grad.clone() for p in net.parameters() if p.grad is not None]
        net.zero_grad(set_to_none=True)
        return [values[net.blob_index[b]].detach() for b in ("conv", "normed", "ip")], grads

    fused = run()
    pairs, net.fused_scale = net.fused_scale, {}
    separate = run()
    net.fused_scale = pairs
    for got, want in zip(fused[0] + fused[1], separate[0] + separate[1]):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_a_partial_forward_may_split_a_batchnorm_scale_pair():
    net = protonet.Net(net_param(BN_SCALE_NET), protonet.TEST)
    net.blobs["data"].data[...] = np.random.default_rng(0).normal(size=(2, 3, 5, 5))
    full = net.forward()["ip"].copy()
    net.forward(end="bn")                    # BatchNorm alone...
    net.forward(start="scale")               # ...then the rest, from Scale on
    np.testing.assert_allclose(net.blobs["ip"].data, full, rtol=1e-5, atol=1e-6)
