"""Exported models (TorchScript, ONNX) and the to_torch view compute what protonet does."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import protonet
from protonet import cli
from protonet.errors import NetError, ProtonetError
from protonet.export import example_inputs, export_onnx, to_torch
from protonet.netspec import NetSpec, layers as L

LENET = str(Path(__file__).resolve().parents[1] / "examples" / "mnist" / "lenet.prototxt")


def run_cli(monkeypatch, *argv: str) -> int:
    if "export" not in cli.COMMANDS:
        monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + ["export"])
    return cli.main(["-q", "export", *argv])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[protonet.Net, str]:
    """LeNet with random weights (biases too), saved as a .caffemodel."""
    net = protonet.Net(LENET, protonet.TEST)
    rng = np.random.default_rng(0)
    for blobs in net.params.values():
        for blob in blobs:
            blob.data[...] = rng.normal(0, 0.1, blob.shape)
    path = str(tmp_path_factory.mktemp("weights") / "lenet.caffemodel")
    net.save(path)
    return net, path


def images(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((64, 1, 28, 28), dtype=np.float32)


def test_to_torch_is_a_module_view_with_gradients(trained):
    net, _ = trained
    model = to_torch(net)
    assert model.input_names == ["data"] and model.output_names == ["prob"]
    (prob,) = model(torch.from_numpy(images()))
    np.testing.assert_allclose(prob.detach().numpy(), net.forward(data=images())["prob"],
                               rtol=1e-6, atol=1e-7)
    prob[:, 3].sum().backward()
    conv1 = net.params["conv1"][0]
    assert conv1.diff.any()          # the view shares the net's parameter tensors
    assert {id(p) for p in model.parameters()} == {id(p) for p in net.module.parameters()}
    with pytest.raises(NetError, match=r"expected 1 input\(s\) \(data\), got 2"):
        model(torch.zeros(1), torch.zeros(1))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_cli_exports_torchscript_and_onnx_with_the_weights(trained, tmp_path, monkeypatch):
    net, weights = trained
    script, onnx_path = tmp_path / "lenet.pt", tmp_path / "lenet.onnx"
    assert run_cli(monkeypatch, "--model", LENET, "--weights", weights, "--torchscript",
                   str(script), "--onnx", str(onnx_path), "--onnx-exporter", "torchscript") == 0
    expected = net.forward(data=images(2))["prob"]
    loaded = torch.jit.load(str(script))
    with torch.no_grad():
        (prob,) = loaded(torch.from_numpy(images(2)))
    np.testing.assert_allclose(prob.numpy(), expected, rtol=1e-4, atol=1e-6)
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["data"]
    (prob,) = session.run(["prob"], {"data": images(2)})
    np.testing.assert_allclose(prob, expected, rtol=1e-4, atol=1e-6)


def test_onnx_through_the_torch_export_exporter(trained, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    net, _ = trained
    path = tmp_path / "lenet.onnx"
    export_onnx(to_torch(net), str(path), dynamo=True)
    (prob,) = ort.InferenceSession(str(path)).run(None, {"data": images(3)})
    np.testing.assert_allclose(prob, net.forward(data=images(3))["prob"], rtol=1e-4,
                               atol=1e-6)


def test_inputs_and_outputs_keep_their_order(tmp_path):
    n = NetSpec()
    n.b = L.Input(shape=dict(dim=[2, 3]))
    n.a = L.Input(shape=dict(dim=[2, 3]))
    n.sum = L.Eltwise(n.b, n.a)
    n.diff = L.Power(n.a, scale=-1)
    net = protonet.Net(n.to_proto(), protonet.TEST)
    model = to_torch(net)
    assert model.input_names == ["b", "a"]
    b, a = example_inputs(model)
    outputs = dict(zip(model.output_names, model(b, a)))
    torch.testing.assert_close(outputs["sum"], b + a)
    torch.testing.assert_close(outputs["diff"], -a)


def test_missing_onnx_packages_are_named(trained, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ProtonetError, match=r"needs onnxscript: pip install 'protonet\[onnx\]'"):
        export_onnx(to_torch(trained[0]), str(tmp_path / "x.onnx"), dynamo=True)
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ProtonetError, match="needs onnx: "):
        export_onnx(to_torch(trained[0]), str(tmp_path / "x.onnx"))
    assert not (tmp_path / "x.onnx").exists()


def test_nets_without_inputs_and_empty_requests_are_refused(tmp_path, monkeypatch, capsys):
    n = NetSpec()
    n.data = L.DummyData(shape=dict(dim=[1, 2]))
    with pytest.raises(ProtonetError, match="no Input layer"):
        example_inputs(to_torch(protonet.Net(n.to_proto(), protonet.TEST)))
    assert run_cli(monkeypatch, "--model", LENET) == 1
    assert "give --onnx OUT.onnx and/or --torchscript OUT.pt" in capsys.readouterr().err
