"""draw-net: DOT text like Caffe's draw.py, rendered by Graphviz when asked."""
from __future__ import annotations

import shutil

import pytest

from protonet import cli
from protonet.draw import draw_net_to_file, layer_label, render, to_dot
from protonet.errors import ProtonetError
from protonet.io.text import parse_text
from protonet.proto import caffe_pb2

needs_dot = pytest.mark.skipif(shutil.which("dot") is None,
                               reason="Graphviz 'dot' is not installed")

TRAIN_TEST = """
name: "LeNet"
layer { name: "mnist" type: "Data" top: "data" top: "label"
        include { phase: TRAIN } data_param { source: "train_lmdb" batch_size: 64 } }
layer { name: "mnist" type: "Data" top: "data" top: "label"
        include { phase: TEST } data_param { source: "test_lmdb" batch_size: 100 } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        param { lr_mult: 1 } param { lr_mult: 2 }
        convolution_param { num_output: 20 kernel_size: 5 } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
        inner_product_param { num_output: 10 } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "accuracy" type: "Accuracy" bottom: "ip1" bottom: "label" top: "accuracy"
        include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" }
"""


def net(text: str = TRAIN_TEST) -> caffe_pb2.NetParameter:
    return parse_text(text, caffe_pb2.NetParameter())


def run_cli(monkeypatch, *argv: str) -> int:
    if "draw_net" not in cli.COMMANDS:
        monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + ["draw_net"])
    return cli.main(["-q", "draw-net", *argv])


def test_dot_text_has_caffe_styles_and_edge_labels():
    dot = to_dot(net())
    assert dot.startswith('digraph "LeNet" {\n  rankdir=LR;\n')
    assert ('"conv1_Convolution" [label="conv1\\n(Convolution)\\nkernel size: 5\\n'
            'stride: 1\\npad: 0", shape=record, style=filled, fillcolor="#FF5050"];') in dot
    assert '"pool1_Pooling" [label="pool1\\n(Pooling MAX)\\nkernel size: 2\\nstride: 2' in dot
    assert 'fillcolor="#CC33FF"' in dot and 'fillcolor="#6495ED"' in dot
    assert '"relu1_ReLU" [label="relu1\\n(ReLU)", shape=record, style=filled, ' \
           'fillcolor="#90EE90"];' in dot
    assert '"data_blob" [label="data", shape=octagon, style=filled, fillcolor="#E0E0E0"];' in dot
    assert '"conv1_Convolution" -> "conv1_blob" [label="20"];' in dot
    assert '"mnist_Data" -> "data_blob" [label="Batch 64"];' in dot
    assert '"mnist_Data_1" -> "label_blob" [label="Batch 100"];' in dot
    assert '"ip1_blob" -> "relu1_ReLU";\n  "relu1_ReLU" -> "ip1_blob";' in dot


def test_phase_keeps_the_layers_of_that_phase():
    train = to_dot(net(), phase=caffe_pb2.TRAIN)
    test = to_dot(net(), phase=caffe_pb2.TEST)
    assert "Batch 64" in train and "Batch 100" not in train and "accuracy" not in train
    assert "Batch 100" in test and "Batch 64" not in test and '"accuracy_Accuracy"' in test
    staged = net('layer { name: "x" type: "Input" top: "x" include { stage: "deploy" } }')
    assert '"x_Input"' not in to_dot(staged, phase=caffe_pb2.TEST)
    assert '"x_Input"' in to_dot(staged, phase=caffe_pb2.TEST, stages=["deploy"])
    assert '"x_Input"' in to_dot(staged)


def test_labels_follow_rankdir_and_show_lr_mults_on_request():
    conv = net().layer[2]
    assert layer_label(conv, "TB") == "conv1 (Convolution) kernel size: 5 stride: 1 pad: 0"
    assert layer_label(conv, "LR", display_lrm=True).endswith("\\nlr mult: 1.0, 2.0")
    assert "lr mult" not in layer_label(net().layer[4], "LR", display_lrm=False)


def test_odd_names_are_escaped():
    odd = net('name: "say \\"hi\\"" layer { name: "a{b}|<c>" type: "Input" top: "t\\"q" '
              'input_param { shape { dim: 1 dim: 3 } } }')
    dot = to_dot(odd)
    assert dot.startswith('digraph "say \\"hi\\"" {')
    assert 'label="a\\{b\\}\\|\\<c\\>\\n(Input)"' in dot
    assert '"t\\"q_blob" [label="t\\"q"' in dot and '[label="1x3"]' in dot
    if shutil.which("dot"):
        assert b"<svg" in render(dot, "svg")


def test_cli_writes_dot_without_graphviz(tmp_path, monkeypatch):
    src = tmp_path / "net.prototxt"
    src.write_text(TRAIN_TEST)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert run_cli(monkeypatch, str(src), str(tmp_path / "net.dot"), "--phase", "TEST",
                   "--rankdir", "TB") == 0
    text = (tmp_path / "net.dot").read_text()
    assert "rankdir=TB;" in text and "Batch 64" not in text
    with pytest.raises(ProtonetError, match=r"apt-get install graphviz.*or write \.dot"):
        draw_net_to_file(net(), str(tmp_path / "net.svg"))
    with pytest.raises(ProtonetError, match=r"extension.*\.dot, \.gv"):
        draw_net_to_file(net(), str(tmp_path / "net.txt"))


def test_cli_reports_errors_on_one_line(tmp_path, monkeypatch, capsys):
    assert run_cli(monkeypatch, str(tmp_path / "missing.prototxt"), "x.dot") == 1
    assert "protonet draw-net: error:" in capsys.readouterr().err


@needs_dot
@pytest.mark.parametrize("ext,magic", [("svg", b"<svg"), ("png", b"\x89PNG")])
def test_cli_renders_images_with_graphviz(tmp_path, monkeypatch, ext, magic):
    src = tmp_path / "net.prototxt"
    src.write_text(TRAIN_TEST)
    out = tmp_path / f"net.{ext}"
    assert run_cli(monkeypatch, str(src), str(out), "--display-lrm") == 0
    assert magic in out.read_bytes()[:400]
