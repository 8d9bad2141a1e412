"""The fast paths keep Caffe's results: layer fast paths against their slow references,
the inference plan (folding, fusing, packing, channels-last) against NetModule.forward
and the Caffe fixtures, bf16/fp16 against fp32 within a stated tolerance, and
torch.compile working or falling back. No timing asserts."""
from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conformance import cases, folder
from protonet.io.text import parse_text
from protonet.io.upgrade import read_net
from protonet.layers import lrn, pooling
from protonet.net.module import NetModule
from protonet.proto import caffe_pb2
from protonet import speed
from protonet.speed import InferenceNet, autocast, keep_freed_memory
from protonet.timing import TimingOptions, random_inputs, time_net

CL = torch.channels_last
# bf16 keeps 8 mantissa bits: after a few layers outputs drift by ~1% of their range.
BF16_TOLERANCE = 0.05          # max |bf16 - fp32| / max |fp32| on a net's outputs


def module(text: str, phase=caffe_pb2.TEST, seed: int = 0) -> NetModule:
    net = NetModule(parse_text(text, caffe_pb2.NetParameter()), phase=phase)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in net.layers:
            for i, blob in enumerate(layer.blobs):
                if layer.type == "BatchNorm":
                    blob.copy_(torch.rand(blob.shape, generator=gen) + 0.5 if i else
                               torch.randn(blob.shape, generator=gen) * 0.1)
                    if i == 2:
                        blob.fill_(2.0)      # a scale factor other than 1
                elif blob.dim() > 1:
                    blob.copy_(torch.randn(blob.shape, generator=gen) *
                               math.sqrt(2.0 / blob[0].numel()))
                else:
                    blob.copy_(torch.rand(blob.shape, generator=gen) + 0.5)
    return net


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    ours, reference = ours.double(), reference.double()
    return float((ours - reference).abs().max() / reference.abs().max().clamp(min=1e-30))


def input_layer(shape, name="data") -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return (f'layer {{ name: "{name}" type: "Input" top: "{name}" '
            f'input_param {{ shape {{ {dims} }} }} }}\n')


CONV_BN_NET = input_layer((2, 3, 17, 15)) + """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 3 stride: 2 pad: 1 bias_term: false } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "sc1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param { num_output: 8 kernel_size: 1 group: 2 } }
layer { name: "bn2" type: "BatchNorm" bottom: "conv2" top: "bn2" }
layer { name: "sum" type: "Eltwise" bottom: "conv1" bottom: "bn2" top: "sum" }
layer { name: "relu2" type: "ReLU" bottom: "sum" top: "sum" }
layer { name: "bn3" type: "BatchNorm" bottom: "sum" top: "bn3" }
layer { name: "sc3" type: "Scale" bottom: "bn3" top: "bn3" scale_param { bias_term: false } }
layer { name: "pool" type: "Pooling" bottom: "bn3" top: "pool"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc"
  inner_product_param { num_output: 5 } }
layer { name: "fcrelu" type: "ReLU" bottom: "fc" top: "fc" }
layer { name: "fcT" type: "InnerProduct" bottom: "fc" top: "fcT"
  inner_product_param { num_output: 4 transpose: true } }
layer { name: "prob" type: "Softmax" bottom: "fcT" top: "prob" }
"""

ALEX_LIKE_NET = input_layer((3, 3, 31, 31)) + """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 12 kernel_size: 5 stride: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "norm1" type: "LRN" bottom: "conv1" top: "norm1"
  lrn_param { local_size: 5 alpha: 0.01 beta: 0.75 k: 2 } }
layer { name: "pool1" type: "Pooling" bottom: "norm1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "a" type: "Convolution" bottom: "pool1" top: "a"
  convolution_param { num_output: 12 kernel_size: 1 group: 12 } }
layer { name: "b" type: "Convolution" bottom: "pool1" top: "b"
  convolution_param { num_output: 6 kernel_size: 3 pad: 1 group: 2 } }
layer { name: "c" type: "Pooling" bottom: "pool1" top: "c"
  pooling_param { pool: MAX kernel_size: 3 stride: 1 pad: 1 } }
layer { name: "cat" type: "Concat" bottom: "a" bottom: "b" bottom: "c" top: "cat" }
layer { name: "fc6" type: "InnerProduct" bottom: "cat" top: "fc6"
  inner_product_param { num_output: 32 } }
layer { name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }
layer { name: "drop6" type: "Dropout" bottom: "fc6" top: "fc6" }
layer { name: "fc7" type: "InnerProduct" bottom: "fc6" top: "fc7"
  inner_product_param { num_output: 10 } }
layer { name: "prob" type: "Softmax" bottom: "fc7" top: "prob" }
"""


def run_plain(net: NetModule, inputs) -> dict:
    with torch.inference_mode():
        values, _ = net(inputs)
    return {name: values[i] for name, i in zip(net.output_names, net.output_ids)}


# -- layer fast paths ---------------------------------------------------------------
POOL_CASES = [((3, 2), (0, 0), True), ((3, 2), (1, 1), True), ((2, 2), (1, 1), False),
              ((3, 1), (1, 1), True), ((2, 2), (0, 0), True), ((5, 3), (2, 1), True)]


def explicit_max_pool(x, kernel, pad, stride, out):
    padded = pooling._pad_to_windows(x, (kernel,) * 2, (pad,) * 2, (stride,) * 2, out,
                                     -math.inf)
    return F.max_pool2d(padded, kernel, stride)


@pytest.mark.parametrize("geometry", POOL_CASES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_native_max_pooling_equals_explicit_padding(geometry, layout):
    (kernel, stride), (pad, _), ceil = geometry
    x = torch.randn(2, 5, 13, 11)
    x = torch.where(x > 0.5, x, torch.zeros(()))              # many ties, as after ReLU
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    out = tuple(pooling.pooled_size(s, kernel, pad, stride, ceil) for s in x.shape[2:])
    mine = x.clone().requires_grad_()
    reference = x.clone().requires_grad_()
    top, mask = pooling.max_pool(mine, (kernel,) * 2, (pad,) * 2, (stride,) * 2, out, True)
    expected = explicit_max_pool(reference, kernel, pad, stride, out)
    assert torch.equal(top, expected)
    grad = torch.randn(top.shape)
    top.backward(grad)
    expected.backward(grad)
    assert torch.equal(mine.grad, reference.grad)         # the first max gets the diff
    flat = x.flatten(2)
    picked = flat.gather(2, mask.long().flatten(2)).reshape(top.shape)
    assert torch.equal(picked, top)                       # Caffe's mask: h * width + w


@pytest.mark.parametrize("geometry", POOL_CASES)
def test_native_ave_pooling_equals_caffe_divisors(geometry):
    (kernel, stride), (pad, _), ceil = geometry
    x = torch.randn(2, 3, 12, 9, dtype=torch.float64)
    out = tuple(pooling.pooled_size(s, kernel, pad, stride, ceil) for s in x.shape[2:])
    top = pooling.ave_pool(x, (kernel,) * 2, (pad,) * 2, (stride,) * 2, out)
    expected = torch.zeros((2, 3) + out, dtype=torch.float64)
    for ph in range(out[0]):
        for pw in range(out[1]):
            h0, w0 = ph * stride - pad, pw * stride - pad
            h1, w1 = min(h0 + kernel, 12 + pad), min(w0 + kernel, 9 + pad)
            area = (h1 - h0) * (w1 - w0)
            window = x[:, :, max(h0, 0):min(h1, 12), max(w0, 0):min(w1, 9)]
            expected[:, :, ph, pw] = window.sum((2, 3)) / area
    assert torch.allclose(top, expected, rtol=1e-12, atol=1e-12)


def test_pooling_falls_back_where_torch_cannot_pad():
    assert pooling.torch_ceil_mode((1, 1, 9, 9), (3, 3), (2, 2), (1, 1), (11, 11)) is None
    x = torch.randn(1, 2, 9, 9)
    out = tuple(pooling.pooled_size(9, 3, 2, 1, True) for _ in range(2))
    top = pooling.max_pool(x, (3, 3), (2, 2), (1, 1), out)
    assert torch.equal(top, explicit_max_pool(x, 3, 2, 1, out))


def lrn_reference(x: np.ndarray, size: int, alpha: float, beta: float, k: float) -> np.ndarray:
    half = (size - 1) // 2
    padded = np.pad(x * x, ((0, 0), (half, half), (0, 0), (0, 0)))
    window = sum(padded[:, i:i + x.shape[1]] for i in range(size))
    return x * (k + alpha / size * window) ** -beta


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_lrn_across_channels_matches_formula_and_gradcheck(layout):
    x = torch.randn(2, 7, 3, 2, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    top = lrn._AcrossChannels.apply(x, 5, 0.3, 0.75, 2.0)
    assert np.allclose(top.numpy(), lrn_reference(x.numpy(), 5, 0.3, 0.75, 2.0), rtol=1e-12)
    assert torch.autograd.gradcheck(lambda t: lrn._AcrossChannels.apply(t, 5, 0.3, 0.75, 2.0),
                                    (x.clone().requires_grad_(),))


def test_lrn_in_bf16_normalizes_in_float32():
    layer = module(input_layer((2, 6, 5, 5)) + """layer { name: "n" type: "LRN"
        bottom: "data" top: "n" lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 } }""").layers[1]
    x = torch.randn(2, 6, 5, 5) * 3
    top = layer(x.bfloat16())
    assert top.dtype == torch.bfloat16
    assert relative_error(top.float(), layer(x)) < 0.02


def test_onednn_inner_product_matches_linear():
    net = module(input_layer((6, 3, 2, 2)) + """layer { name: "ip" type: "InnerProduct"
        bottom: "data" top: "ip" inner_product_param { num_output: 7 } }""")
    layer = net.layers[1]
    x = torch.randn(6, 3, 2, 2, requires_grad=True)
    top = layer(x)
    grad = torch.randn(top.shape)
    top.backward(grad)
    weight, bias = (b.detach().clone().requires_grad_() for b in layer.blobs)
    x2 = x.detach().clone().requires_grad_()
    expected = F.linear(x2.reshape(6, 12), weight, bias)
    expected.backward(grad)
    assert torch.allclose(top, expected, rtol=1e-5, atol=1e-6)
    for ours, theirs in ((x.grad, x2.grad), (layer.blobs[0].grad, weight.grad),
                         (layer.blobs[1].grad, bias.grad)):
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_dropout_in_test_phase_copies_only_for_a_separate_top():
    net = module(input_layer((2, 3)) + """
        layer { name: "d1" type: "Dropout" bottom: "data" top: "data" }
        layer { name: "d2" type: "Dropout" bottom: "data" top: "out" }""")
    x = torch.randn(2, 3)
    assert net.layers[1](x) is x
    copy = net.layers[2](x)
    assert copy is not x and torch.equal(copy, x)


# -- the inference plan -------------------------------------------------------------------
@pytest.mark.parametrize("text", [CONV_BN_NET, ALEX_LIKE_NET], ids=["conv_bn", "alex_like"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fp32_plan_matches_forward(text, channels_last):
    net = module(text)
    inputs = random_inputs(net, "cpu")
    expected = run_plain(net, inputs)
    plan = net.optimize_for_inference("fp32", channels_last=channels_last)
    outputs = plan(inputs)
    assert set(outputs) == set(expected)
    for name in expected:
        assert outputs[name].dtype == torch.float32
        assert relative_error(outputs[name], expected[name]) < 1e-5, name
    assert plan.folded > 0


def test_plan_folds_batchnorm_and_scale_into_convolution():
    net = module(CONV_BN_NET)
    plan = InferenceNet(net)
    names = [op.name for op in plan.ops]
    # conv1+bn1+sc1+relu1 -> conv1, the split -> aliases, conv2+bn2 -> conv2, and with
    # oneDNN's packed kernels sum+relu2 join it (else -> sum), bn3+sc3 -> an affine
    # map, fc+fcrelu -> fc
    joined = speed._mkldnn_ops_available()
    assert names == ["conv1", "conv2"] + ["sum"] * (not joined) + \
        ["bn3", "pool", "fc", "fcT", "prob"]
    assert "sum" in [op.name for op in InferenceNet(net, keep_blobs=True).ops]
    unfolded = InferenceNet(net, fold=False)
    assert len(unfolded.ops) > len(plan.ops)


@pytest.mark.skipif(not speed._mkldnn_ops_available(), reason="needs oneDNN's kernels")
def test_plan_joins_a_sum_into_the_convolution_only_when_nothing_else_reads_its_top():
    shortcut = input_layer((2, 4, 9, 9)) + """
layer { name: "c" type: "Convolution" bottom: "data" top: "c"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "sum" type: "Eltwise" bottom: "data" bottom: "c" top: "sum" }
layer { name: "relu" type: "ReLU" bottom: "sum" top: "sum" }
"""
    net = module(shortcut)
    inputs = random_inputs(net, "cpu")
    plan = InferenceNet(net)
    assert [(op.name, len(op.bottoms)) for op in plan.ops] == [("c", 2)]
    got, = plan(inputs).values()
    assert relative_error(got, run_plain(net, inputs)["sum"]) < 1e-6
    assert torch.equal(inputs["data"], random_inputs(net, "cpu")["data"])  # not summed into
    # a second reader of "c" needs its value, so the sum stays its own op
    read_twice = module(shortcut + 'layer { name: "p" type: "Pooling" bottom: "c" top: "p" '
                        'pooling_param { pool: MAX kernel_size: 1 } }\n')
    assert [op.name for op in InferenceNet(read_twice).ops] == ["c", "sum", "p"]


@pytest.mark.skipif(not speed._mkldnn_ops_available(), reason="needs oneDNN's kernels")
def test_a_joined_sum_never_writes_into_what_its_convolution_reads():
    text = input_layer((2, 4, 9, 9)) + """
layer { name: "y" type: "Convolution" bottom: "data" top: "y"
  convolution_param { num_output: 8 kernel_size: 1 } }
layer { name: "c" type: "Convolution" bottom: "y" top: "c"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "sum" type: "Eltwise" bottom: "y" bottom: "c" top: "sum" }
"""
    net = module(text)
    inputs = random_inputs(net, "cpu")
    expected = run_plain(net, inputs)["sum"]
    plan = InferenceNet(net)
    assert [op.name for op in plan.ops] == ["y", "c"]
    assert relative_error(plan(inputs)["sum"], expected) < 1e-6


@pytest.mark.skipif(not speed._mkldnn_ops_available(), reason="needs oneDNN's kernels")
@pytest.mark.parametrize("later_reader", [False, True])
def test_a_joined_sum_overwrites_its_shortcut_only_when_nothing_reads_it_later(later_reader):
    text = input_layer((2, 4, 9, 9)) + """
layer { name: "s" type: "Convolution" bottom: "data" top: "s"
  convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "c" type: "Convolution" bottom: "data" top: "c"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "sum" type: "Eltwise" bottom: "s" bottom: "c" top: "sum" }
layer { name: "relu" type: "ReLU" bottom: "sum" top: "sum" }
""" + ('layer { name: "late" type: "Convolution" bottom: "s" top: "late" '
       'convolution_param { num_output: 3 kernel_size: 1 } }\n' if later_reader else "")
    net = module(text)
    inputs = random_inputs(net, "cpu")
    expected = run_plain(net, inputs)
    plan = InferenceNet(net)
    assert [op.name for op in plan.ops][:2] == ["s", "c"]
    for _ in range(2):              # a second call sees no leftovers of the first
        outputs = plan(inputs)
        assert set(outputs) == set(expected)
        for name in expected:
            assert relative_error(outputs[name], expected[name]) < 1e-6, name


def test_plan_leaves_the_module_and_its_weights_alone():
    net = module(CONV_BN_NET)
    before = [p.detach().clone() for p in net.parameters()]
    net.optimize_for_inference("bf16")
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_train_phase_batchnorm_is_not_folded():
    net = module(CONV_BN_NET, phase=caffe_pb2.TRAIN)
    plan = InferenceNet(net)
    names = [op.name for op in plan.ops]    # batch statistics: nothing to fold
    assert all(name in names for name in ("bn1", "sc1", "bn2", "bn3", "sc3"))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("text", [CONV_BN_NET, ALEX_LIKE_NET], ids=["conv_bn", "alex_like"])
def test_low_precision_plan_is_close_to_fp32(text, precision):
    net = module(text)
    inputs = random_inputs(net, "cpu")
    expected = net.optimize_for_inference("fp32")(inputs)
    outputs = net.optimize_for_inference(precision)(inputs)
    for name in expected:
        assert outputs[name].dtype == torch.float32
        assert relative_error(outputs[name], expected[name]) < BF16_TOLERANCE, name


def test_autocast_training_pass_is_close_to_fp32():
    net = module(ALEX_LIKE_NET, phase=caffe_pb2.TEST)
    inputs = random_inputs(net, "cpu")
    expected = run_plain(net, inputs)["prob"]
    with torch.no_grad(), autocast("bf16", "cpu"):
        values, _ = net(inputs)
    assert relative_error(values[net.blob_index["prob"]].float(), expected) < BF16_TOLERANCE


def test_channels_last_module_keeps_values_and_gradients():
    net = module("force_backward: true\n" + ALEX_LIKE_NET, phase=caffe_pb2.TRAIN)
    inputs = random_inputs(net, "cpu")
    torch.manual_seed(3)
    values, _ = net(inputs)
    values[net.blob_index["prob"]].sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    net.use_channels_last()
    torch.manual_seed(3)
    values, _ = net({k: v.contiguous(memory_format=CL) for k, v in inputs.items()})
    for name in ("conv1", "pool1", "a", "b", "c"):     # "a": 1 input channel per group
        assert values[net.blob_index[name]].is_contiguous(memory_format=CL), name
    values[net.blob_index["prob"]].sum().backward()
    for before, param in zip(grads, net.parameters()):
        assert torch.allclose(param.grad, before, rtol=1e-4, atol=1e-6)


# -- the Caffe fixtures through the plan ------------------------------------------------
def _rule():
    import importlib.util
    spec = importlib.util.spec_from_file_location("conformance_rule", folder("rule.py"))
    rule = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rule)
    return rule


FIXTURE_NETS = ["alexnet_deploy", "googlenet_deploy", "lenet", "cifar10_full", "caffenet_full_conv"]


@pytest.mark.parametrize("name", [n for n in cases("nets") if n in FIXTURE_NETS])
def test_fp32_channels_last_plan_meets_the_net_fixtures(name):
    case = folder("nets", name)
    golden = json.loads((case / "golden.json").read_text())
    expected = np.load(case / "golden.npz")
    net = NetModule(read_net(str(case / "net.prototxt")), phase=caffe_pb2.TEST)
    net.infer_shapes({b: (golden["batch"],) + net.blob_shapes[net.blob_index[b]][1:]
                      for b in golden["inputs"]})
    rule = _rule()
    with torch.no_grad():
        for layer, layer_name in zip(net.layers, net.layer_names):
            arrays = rule.param_arrays(layer_name, layer.type, [b.shape for b in layer.blobs])
            for blob, array in zip(layer.blobs, arrays):
                blob.copy_(torch.from_numpy(array))
    inputs = {b: torch.from_numpy(rule.rule_input(b, net.blob_shapes[net.blob_index[b]]))
              for b in golden["inputs"]}
    outputs = net.optimize_for_inference("fp32", channels_last=True)(inputs)
    for name_out, tensor in outputs.items():
        theirs = expected[f"output/{name_out}"]
        scale = max(float(expected[f"stats/{name_out}"][2]), 1e-30)
        err = np.abs(tensor.numpy().astype(np.float64) - theirs).max() / scale
        assert err <= 1e-3, f"{name} {name_out}: max error {err:.2e}"


# -- compile -------------------------------------------------------------------------------
def test_compile_failure_falls_back_to_the_eager_plan(monkeypatch, caplog):
    def broken(*args, **kwargs):
        def run(*a, **k):
            raise RuntimeError("no compiler here")
        return run
    monkeypatch.setattr(torch, "compile", broken)
    net = module(ALEX_LIKE_NET)
    inputs = random_inputs(net, "cpu")
    plan = net.optimize_for_inference(compile=True)
    assert plan.compiled
    with caplog.at_level(logging.WARNING, logger="protonet"):
        outputs = plan(inputs)
    assert not plan.compiled and "no compiler here" in caplog.text
    assert relative_error(outputs["prob"], run_plain(net, inputs)["prob"]) < 1e-5


def test_compile_unavailable_runs_eagerly(monkeypatch):
    def missing(*args, **kwargs):
        raise RuntimeError("torch.compile is not supported")
    monkeypatch.setattr(torch, "compile", missing)
    plan = module(CONV_BN_NET).optimize_for_inference(compile=True)
    assert not plan.compiled
    assert plan(random_inputs(plan.module, "cpu"))["prob"].shape == (2, 4)


def test_compile_path_traces_the_plan(monkeypatch):
    calls = []

    def tracing(fn, **kwargs):
        calls.append(kwargs)
        return fn
    monkeypatch.setattr(torch, "compile", tracing)
    net = module(CONV_BN_NET)
    inputs = random_inputs(net, "cpu")
    plan = net.optimize_for_inference(compile=True)
    assert plan.compiled and calls[0]["options"] == {"freezing": True}
    assert relative_error(plan(inputs)["prob"], run_plain(net, inputs)["prob"]) < 1e-5


# -- timing with the fast paths ------------------------------------------------------------
@pytest.mark.parametrize("options", [TimingOptions(), TimingOptions("bf16", True)],
                         ids=["fp32", "bf16_channels_last"])
@pytest.mark.parametrize("forced", ["force_backward: true\n", ""], ids=["forced", "deploy"])
def test_time_net_runs_with_options(options, forced):
    net = module(forced + CONV_BN_NET, phase=caffe_pb2.TRAIN)
    timings = time_net(net, 2, torch.device("cpu"), options=options)
    assert len(timings.forward_ms) == len(net.steps) - 1
    assert timings.net_forward_ms > 0 and timings.net_forward_backward_ms > 0


def test_keep_freed_memory_answers():
    assert keep_freed_memory() in (True, False)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_time_command_low_precision_runs_on_this_cpu(tmp_path, capsys, precision):
    """fp16 needs AVX-512 FP16/AVX-NE-CONVERT in oneDNN's packed kernels; where the CPU
    lacks them the plan keeps plain weights, and `protonet time` still completes."""
    from protonet.cli import main
    path = tmp_path / "net.prototxt"
    path.write_text(ALEX_LIKE_NET)
    assert main(["time", "--model", str(path), "--iterations", "1", "--phase", "TEST",
                 "--precision", precision]) == 0


def test_mkldnn_supports_matches_the_cpu():
    from protonet.speed import mkldnn_supports
    assert mkldnn_supports(torch.float32)
    assert mkldnn_supports(torch.float16) == torch.ops.mkldnn._is_mkldnn_fp16_supported()
