"""Hand a net over to the PyTorch world: a plain nn.Module, TorchScript or ONNX.

NetModule's forward speaks in blob ids (a dict of inputs in, every blob out) because
that is what pycaffe and the solver need. People who continue in PyTorch, and the
exporters, want a function from input tensors to output tensors; `to_torch` gives
that view, sharing the net's parameters. Exports trace it at the Input layers'
shapes, so the exported graph has those fixed shapes, Caffe's numerics included.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import warnings

import torch
from torch import nn

from .errors import NetError, ProtonetError
from .io.atomic import atomic_call
from .net.module import NetModule


class TorchNet(nn.Module):
    """`forward(*inputs) -> tuple of outputs`, in the order of `input_names` and
    `output_names` (the net's Input tops and its unconsumed blobs).

    It runs the net's layers in Caffe's order with Caffe's forward numerics, but with
    plain autograd: gradients reach every param that requires one, even where Caffe's
    Backward would stop (a deploy net has no loss, so Caffe prunes all of it).
    """

    def __init__(self, module: NetModule):
        super().__init__()
        self.net = module
        self.input_names = list(module.input_names)
        self.output_names = list(module.output_names)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise NetError(f"expected {len(self.input_names)} input(s) "
                           f"({', '.join(self.input_names)}), got {len(inputs)}")
        values: list = [None] * len(self.net.blob_names)
        for blob, tensor in zip(self.net.input_ids, inputs):
            values[blob] = tensor
        for step in self.net.steps:
            if step.is_input:
                continue
            out = self.net.layers[step.layer](*(values[b] for b in step.bottoms))
            for top, value in zip(step.tops, (out,) if torch.is_tensor(out) else out):
                values[top] = value
        return tuple(values[i] for i in self.net.output_ids)


def to_torch(net) -> TorchNet:
    """A torch.nn.Module view of a protonet.Net (or NetModule); parameters shared."""
    return TorchNet(net if isinstance(net, NetModule) else net.module)


def example_inputs(model: TorchNet, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Uniform [0, 1) tensors of the Input layers' shapes, to trace with."""
    if not model.input_names:
        raise ProtonetError("the net has no Input layer to export from; export a deploy "
                            "net (Input layers instead of data layers)")
    device = next(model.net.buffers(), torch.empty(0)).device   # each layer has one
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(model.net.blob_shapes[i], generator=generator).to(device)
                 for i in model.net.input_ids)


# Loggers of the ONNX toolchain, which narrate every graph pass at INFO.
_CHATTY = ("torch.onnx", "onnxscript", "onnx_ir")


@contextlib.contextmanager
def _tracing():
    """No autograd, and none of the exporters' notes meant for their developers:
    shapes becoming constants (they are meant to: the export is for the Input
    layers' shapes), deprecations inside torch, graph-pass narration."""
    loggers = [logging.getLogger(name) for name in _CHATTY]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", module=r"torch\.onnx")
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX",
                                DeprecationWarning)
        warnings.filterwarnings("ignore", r"`torch\.jit\.trace", DeprecationWarning)
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def export_torchscript(model: TorchNet, path: str) -> None:
    """Trace `model` and save it; load with torch.jit.load(path)."""
    model.eval()
    inputs = example_inputs(model)
    with _tracing():
        traced = torch.jit.trace(model, inputs)
    atomic_call(path, traced.save)


def export_onnx(model: TorchNet, path: str, opset: int | None = None,
                dynamo: bool | None = None) -> None:
    """Export `model` to ONNX. `dynamo` picks torch's torch.export-based exporter
    (needs onnxscript) over the TorchScript-based one; by default it is used when
    onnxscript is installed."""
    if dynamo is None:
        dynamo = importlib.util.find_spec("onnxscript") is not None
    needed = ["onnx", "onnxscript"] if dynamo else ["onnx"]
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ProtonetError(f"ONNX export needs {' and '.join(missing)}: "
                            "pip install 'protonet[onnx]'")
    model.eval()
    inputs = example_inputs(model)
    options = dict(input_names=model.input_names, output_names=model.output_names,
                   opset_version=opset, dynamo=dynamo)
    if dynamo:
        options.update(external_data=False, verbose=False)
    with _tracing():
        atomic_call(path, lambda tmp: torch.onnx.export(model, inputs, tmp, **options))
