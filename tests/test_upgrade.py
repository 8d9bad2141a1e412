"""Old Caffe net and solver formats upgrade exactly as Caffe upgrades them."""
from __future__ import annotations

import difflib
import warnings
from pathlib import Path

import pytest

from protonet.errors import NetError, SolverError
from protonet.io.binary import write_binary
from protonet.io.text import parse_text, read_text, to_text
from protonet.io.upgrade import (V1_LAYER_TYPES, net_needs_upgrade, read_net,
                                 read_net_binary, read_solver, solver_needs_upgrade,
                                 upgrade_net, upgrade_solver)
from protonet.proto import caffe_pb2

CONFORMANCE = Path(__file__).resolve().parents[2] / "shared" / "conformance"
NET_DIRS = sorted(p for p in (CONFORMANCE / "nets").glob("*") if p.is_dir())


def net(text: str) -> caffe_pb2.NetParameter:
    return parse_text(text, caffe_pb2.NetParameter())


def upgraded(text: str, source: str = "old.prototxt") -> caffe_pb2.NetParameter:
    """upgrade_net of `text`, checking that it warned about `source`."""
    with pytest.warns(UserWarning, match=source):
        return upgrade_net(net(text), source)


def upgraded_quietly(text: str, caplog, source: str = "old.prototxt"):
    """upgrade_net of `text` that only needs the input upgrade: an INFO log line
    naming `source`, no Python warning (most published deploy files use input:)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level("INFO", logger="protonet"):
            result = upgrade_net(net(text), source)
    if net(text).input:
        assert any(source in r.getMessage() and "Input layer" in r.getMessage()
                   and r.levelname == "INFO" for r in caplog.records)
    return result


def assert_same(actual, expected) -> None:
    if actual != expected:
        diff = difflib.unified_diff(to_text(expected).splitlines(),
                                    to_text(actual).splitlines(),
                                    "expected", "actual", lineterm="")
        pytest.fail("\n".join(diff))


# --- the published nets, against Caffe's own upgrade_net_proto_text ---------

@pytest.mark.skipif(not NET_DIRS, reason="no ../shared/conformance fixtures")
@pytest.mark.parametrize("folder", NET_DIRS, ids=lambda p: p.name)
def test_published_net_upgrades_like_caffe(folder):
    original = read_text(str(folder / "net.prototxt"), caffe_pb2.NetParameter())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = upgrade_net(original, str(folder / "net.prototxt"))
    caffe = read_text(str(folder / "caffe_upgraded.prototxt"), caffe_pb2.NetParameter())
    assert_same(ours, caffe)
    assert not net_needs_upgrade(ours)


# --- V0 -----------------------------------------------------------------------

V0_PADDED = """
name: "tiny"
input: "data"
input_dim: 2 input_dim: 3 input_dim: 8 input_dim: 8
layers { layer { name: "pad1" type: "padding" pad: 2 } bottom: "data" top: "pad1" }
layers {
  layer { name: "conv1" type: "conv" num_output: 4 kernelsize: 3 stride: 2
          biasterm: false weight_filler { type: "xavier" } blobs_lr: 1 weight_decay: 0 }
  bottom: "pad1" top: "conv1"
}
layers { layer { name: "pad2" type: "padding" pad: 1 } bottom: "conv1" top: "pad2" }
layers { layer { name: "pool1" type: "pool" pool: AVE kernelsize: 3 }
         bottom: "pad2" top: "pool1" }
layers { layer { name: "drop" type: "dropout" dropout_ratio: 0.25 }
         bottom: "pool1" top: "pool1" }
"""

V0_PADDED_UPGRADED = """
name: "tiny"
layer { name: "input" type: "Input" top: "data"
        input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        param { lr_mult: 1 decay_mult: 0 }
        convolution_param { num_output: 4 bias_term: false pad: 2 kernel_size: 3
                            stride: 2 weight_filler { type: "xavier" } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: AVE kernel_size: 3 pad: 1 } }
layer { name: "drop" type: "Dropout" bottom: "pool1" top: "pool1"
        dropout_param { dropout_ratio: 0.25 } }
"""


def test_v0_padding_layers_fold_into_conv_and_pool():
    assert_same(upgraded(V0_PADDED), net(V0_PADDED_UPGRADED))


def test_v0_data_fields_split_between_data_and_transform_param():
    v0 = """layers { layer { name: "d" type: "data" source: "db" batchsize: 8
                             meanfile: "m.binaryproto" cropsize: 5 mirror: true
                             scale: 0.5 rand_skip: 3 } top: "data" top: "label" }"""
    expected = """layer { name: "d" type: "Data" top: "data" top: "label"
                          transform_param { scale: 0.5 mirror: true crop_size: 5
                                            mean_file: "m.binaryproto" }
                          data_param { source: "db" batch_size: 8 rand_skip: 3 } }"""
    assert_same(upgraded(v0), net(expected))


def test_v0_unknown_layer_type_names_layer_and_source():
    v0 = 'layers { layer { name: "odd" type: "warp" } top: "x" }'
    with pytest.raises(NetError, match="unknown V0 layer type 'warp'") as info:
        upgrade_net(net(v0), "old.prototxt")
    assert info.value.layer == "odd"
    assert "old.prototxt" in str(info.value)


def test_v0_parameter_on_wrong_layer_type_is_an_error():
    v0 = 'layers { layer { name: "r" type: "relu" num_output: 3 } top: "x" }'
    with pytest.raises(NetError, match="'num_output'.*conv, innerproduct") as info:
        upgrade_net(net(v0), "old.prototxt")
    assert info.value.layer == "r" and "old.prototxt" in str(info.value)


def test_v0_padding_may_only_feed_conv_or_pool():
    v0 = """input: "data"
            layers { layer { name: "pad" type: "padding" pad: 1 } bottom: "data" top: "p" }
            layers { layer { name: "fc" type: "innerproduct" num_output: 2 }
                     bottom: "p" top: "fc" }"""
    with pytest.raises(NetError, match="padding layer 'pad'") as info:
        upgrade_net(net(v0), "old.prototxt")
    assert info.value.layer == "fc" and "old.prototxt" in str(info.value)


def test_v0_padding_with_two_tops_is_an_error():
    v0 = """input: "data"
            layers { layer { name: "pad" type: "padding" pad: 1 }
                     bottom: "data" top: "p" top: "q" }
            layers { layer { name: "c" type: "conv" num_output: 2 } bottom: "p" top: "c" }"""
    with pytest.raises(NetError, match="1 bottom and 1 top") as info:
        upgrade_net(net(v0), "old.prototxt")
    assert info.value.layer == "pad"


def test_v0_bottom_without_producer_is_an_error():
    v0 = 'layers { layer { name: "r" type: "relu" } bottom: "ghost" top: "x" }'
    with pytest.raises(NetError, match="bottom 'ghost'") as info:
        upgrade_net(net(v0), "old.prototxt")
    assert info.value.layer == "r"


# --- V1 -----------------------------------------------------------------------

def test_v1_blobs_lr_weight_decay_and_sharing_become_param_specs():
    v1 = """layers { name: "ip" type: INNER_PRODUCT bottom: "x" top: "y"
                     param: "w" param: "b" blob_share_mode: PERMISSIVE
                     blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
                     loss_weight: 0.5 include { phase: TEST }
                     inner_product_param { num_output: 10 } }"""
    expected = """layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y"
                          loss_weight: 0.5 include { phase: TEST }
                          param { name: "w" share_mode: PERMISSIVE lr_mult: 1 decay_mult: 1 }
                          param { name: "b" lr_mult: 2 decay_mult: 0 }
                          inner_product_param { num_output: 10 } }"""
    assert_same(upgraded(v1), net(expected))


def test_v1_data_layer_transformation_fields_move_to_transform_param():
    v1 = """layers { name: "d" type: DATA top: "data"
                     data_param { source: "db" scale: 0.25 mirror: true } }"""
    expected = """layer { name: "d" type: "Data" top: "data"
                          transform_param { scale: 0.25 mirror: true }
                          data_param { source: "db" } }"""
    assert_same(upgraded(v1), net(expected))


def test_every_v1_layer_type_has_a_name():
    assert set(V1_LAYER_TYPES) == set(caffe_pb2.V1LayerParameter.LayerType.values())


def test_v1_layers_mixed_with_layer_is_refused():
    mixed = """layers { name: "a" type: RELU bottom: "x" top: "x" }
               layer { name: "b" type: "ReLU" bottom: "x" top: "x" }"""
    with pytest.raises(NetError, match="old.prototxt.*both V1 'layers'"):
        upgrade_net(net(mixed), "old.prototxt")


# --- net inputs, BatchNorm ----------------------------------------------------

def test_input_dims_become_a_leading_input_layer(caplog):
    old = """input: "a" input: "b"
             input_dim: 1 input_dim: 2 input_dim: 3 input_dim: 4
             input_dim: 5 input_dim: 6 input_dim: 7 input_dim: 8
             layer { name: "add" type: "Eltwise" bottom: "a" bottom: "b" top: "c" }"""
    expected = """layer { name: "input" type: "Input" top: "a" top: "b"
                          input_param { shape { dim: 1 dim: 2 dim: 3 dim: 4 }
                                        shape { dim: 5 dim: 6 dim: 7 dim: 8 } } }
                   layer { name: "add" type: "Eltwise" bottom: "a" bottom: "b" top: "c" }"""
    assert_same(upgraded_quietly(old, caplog), net(expected))


def test_input_shape_becomes_input_layer_and_bare_input_is_dropped(caplog):
    shaped = 'input: "a" input_shape { dim: 3 }'
    assert_same(upgraded_quietly(shaped, caplog), net(
        'layer { name: "input" type: "Input" top: "a" input_param { shape { dim: 3 } } }'))
    assert_same(upgraded_quietly('input: "a"', caplog), net(""))


def test_too_few_input_dims_is_an_error():
    with pytest.raises(NetError, match="old.prototxt: 1 inputs need 4 input_dim"):
        upgrade_net(net('input: "a" input_dim: 1 input_dim: 2'), "old.prototxt")


def test_three_param_batch_norm_gets_zero_multipliers():
    old = """layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x"
                     param { lr_mult: 1 } param { lr_mult: 1 } param { name: "k" } }"""
    expected = """layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x"
                          param { lr_mult: 0 decay_mult: 0 } param { lr_mult: 0 decay_mult: 0 }
                          param { name: "k" lr_mult: 0 decay_mult: 0 } }"""
    assert net_needs_upgrade(net(old))
    assert_same(upgrade_net(net(old), "old.prototxt"), net(expected))


def test_current_net_is_left_alone_and_input_is_not_changed():
    current = net('layer { name: "r" type: "ReLU" bottom: "x" top: "x" }')
    assert not net_needs_upgrade(current)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same(upgrade_net(current), current)
    old = net(V0_PADDED)
    upgraded(V0_PADDED)
    assert_same(old, net(V0_PADDED))


# --- files --------------------------------------------------------------------

def test_read_net_upgrades_text_file(tmp_path):
    path = tmp_path / "old.prototxt"
    path.write_text(V0_PADDED)
    with pytest.warns(UserWarning, match="old.prototxt"):
        assert_same(read_net(str(path)), net(V0_PADDED_UPGRADED))


@pytest.mark.parametrize("old", [
    'layers { layer { name: "ip" type: "innerproduct" num_output: 2 '
    'blobs { num: 1 channels: 1 height: 2 width: 1 data: [1, 2] } blobs { data: [3] } } }',
    'layers { name: "ip" type: INNER_PRODUCT inner_product_param { num_output: 2 } '
    'blobs { num: 1 channels: 1 height: 2 width: 1 data: [1, 2] } blobs { data: [3] } }',
], ids=["v0", "v1"])
def test_read_net_binary_carries_weight_blobs(tmp_path, old):
    path = tmp_path / "old.caffemodel"
    write_binary(str(path), net(old))
    with pytest.warns(UserWarning, match="old.caffemodel"):
        result = read_net_binary(str(path))
    expected = """layer { name: "ip" type: "InnerProduct"
                          blobs { num: 1 channels: 1 height: 2 width: 1 data: [1, 2] }
                          blobs { data: [3] } inner_product_param { num_output: 2 } }"""
    assert_same(result, net(expected))


# --- solver -------------------------------------------------------------------

@pytest.mark.parametrize("old, new", [
    ("SGD", "SGD"), ("NESTEROV", "Nesterov"), ("ADAGRAD", "AdaGrad"),
    ("RMSPROP", "RMSProp"), ("ADADELTA", "AdaDelta"), ("ADAM", "Adam")])
def test_solver_type_enum_becomes_type_string(old, new):
    solver = parse_text(f"base_lr: 0.01 solver_type: {old}", caffe_pb2.SolverParameter())
    assert solver_needs_upgrade(solver)
    with pytest.warns(UserWarning, match="s.prototxt"):
        result = upgrade_solver(solver, "s.prototxt")
    expected = parse_text(f'base_lr: 0.01 type: "{new}"', caffe_pb2.SolverParameter())
    assert_same(result, expected)


def test_solver_with_both_type_fields_is_refused():
    solver = parse_text('solver_type: ADAM type: "Adam"', caffe_pb2.SolverParameter())
    with pytest.raises(SolverError, match="s.prototxt: both .*solver_type: ADAM"):
        upgrade_solver(solver, "s.prototxt")


def test_read_solver_upgrades_and_defaults_snapshot_prefix(tmp_path):
    path = tmp_path / "adam.solver.prototxt"
    path.write_text("solver_type: ADAM")
    with pytest.warns(UserWarning):
        solver = read_solver(str(path))
    assert solver.type == "Adam" and not solver.HasField("solver_type")
    assert solver.snapshot_prefix == str(tmp_path / "adam.solver")
    path.write_text(f'type: "SGD" snapshot_prefix: "{tmp_path}"')
    assert read_solver(str(path)).snapshot_prefix == str(tmp_path / "adam.solver")
