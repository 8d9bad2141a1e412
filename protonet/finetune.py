"""Fine-tuning a zoo model on your own LMDBs, the way Caffe's Flickr Style example does.

The entry's deploy net becomes a train/val net: its Input gives way to two Data layers
(TRAIN and TEST) on the user's LMDBs with the entry's crop and mean; its last learnable
layer is renamed, so that no pretrained weights are copied into it, and gets K outputs
and 10x/20x learning rates; its final Softmax becomes SoftmaxWithLoss plus a TEST
Accuracy; layers up to --freeze-through get lr_mult 0, the others learn at the (low)
base rate. The result is two ordinary Caffe files, train_val.prototxt and
solver.prototxt (which names the pretrained weights), to read, edit and rerun with
`protonet train --solver`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from .data.lmdb_source import RecordCursor
from .errors import ProtonetError, closest
from .io.text import write_text
from .io.upgrade import read_net
from .net.module import NetModule
from .proto import caffe_pb2
from .solver import Solver, get_solver
from .zoo import Entry

CLASSIFIERS = ("InnerProduct", "Convolution")
BIASED = {"Convolution", "Deconvolution", "InnerProduct", "Scale", "Embed"}
INPUTS = {"Input", "Data", "ImageData", "HDF5Data", "MemoryData", "WindowData", "DummyData"}
NEW_LAYER_MULTS = ((10, 1), (20, 0))      # (lr_mult, decay_mult) of weights, biases
LEARN_MULTS = ((1, 1), (2, 0))
FROZEN_MULTS = (0, 0)


@dataclass
class Options:
    train_db: str
    val_db: str
    num_classes: int
    freeze_through: str | None = None
    base_lr: float = 0.001
    iterations: int = 1000
    batch_size: int = 32
    out: str = "finetune"
    gpu: int | None = None


def write(entry: Entry, options: Options, weights: str) -> Path:
    """Write train_val.prototxt and solver.prototxt into options.out; returns the solver."""
    if options.num_classes < 1 or options.iterations < 1 or options.batch_size < 1:
        raise ProtonetError("--num-classes, --iterations and --batch-size must be positive")
    out = Path(options.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    net_path, solver_path = out / "train_val.prototxt", out / "solver.prototxt"
    write_text(str(net_path), train_val(entry, options))
    write_text(str(solver_path), solver(entry, options, net_path, weights))
    return solver_path


def train(solver_path: Path, device=None) -> Solver:
    """Run the written solver to its max_iter; returns the finished solver."""
    solver_instance = get_solver(str(solver_path), device)
    solver_instance.solve()
    return solver_instance


# -- the net --------------------------------------------------------------------------------
def train_val(entry: Entry, options: Options) -> caffe_pb2.NetParameter:
    """The entry's deploy net, turned into a fine-tuning train/val net."""
    if entry.task != "classification":
        raise ProtonetError(f"zoo model '{entry.name}' is a {entry.task} model; finetune "
                            "retrains a classifier's last layer only")
    net = read_net(str(entry.deploy))
    blob_counts = _blob_counts(net)
    inputs = [l for l in net.layer if l.type in INPUTS]
    if len(inputs) != 1 or len(inputs[0].top) != 1:
        raise ProtonetError(f"{entry.deploy}: fine-tuning needs a deploy net with one "
                            "input blob")
    data_top = inputs[0].top[0]
    layers = [l for l in net.layer if l.type not in INPUTS]
    classifier = _classifier(layers, entry)
    frozen = _frozen(layers, options.freeze_through, classifier)
    logits = _drop_softmax(layers) or classifier.top[0]
    for layer in layers:
        _set_mults(layer, blob_counts.get(layer.name, 0), layer.name in frozen)
    logits = _renew(classifier, layers, options.num_classes, logits)
    result = caffe_pb2.NetParameter(name=f"{net.name or entry.name}_finetune")
    for phase, source in ((caffe_pb2.TRAIN, options.train_db), (caffe_pb2.TEST, options.val_db)):
        result.layer.append(_data_layer(entry, options, phase, source, data_top))
    result.layer.extend(layers)
    result.layer.append(_head("accuracy", "Accuracy", logits, caffe_pb2.TEST))
    result.layer.append(_head("loss", "SoftmaxWithLoss", logits))
    return result


def _blob_counts(net: caffe_pb2.NetParameter) -> dict[str, int]:
    """Param blobs per layer, as the built deploy net has them."""
    module = NetModule(net, phase=caffe_pb2.TEST)
    return {layer.layer_name: len(layer.blobs) for layer in module.layers}


def _classifier(layers: list, entry: Entry):
    for layer in reversed(layers):
        if layer.type in CLASSIFIERS:
            return layer
    raise ProtonetError(f"{entry.deploy}: no InnerProduct or Convolution layer to retrain")


def _frozen(layers: list, through: str | None, classifier) -> set[str]:
    """Names of the layers from the first up to `through`, inclusive."""
    if through is None:
        return set()
    names = [l.name for l in layers]
    if through not in names:
        raise ProtonetError(f"--freeze-through: no layer named '{through}'"
                            f"{closest(through, names)}")
    if names.index(through) >= names.index(classifier.name):
        raise ProtonetError(f"--freeze-through {through}: must come before the retrained "
                            f"layer '{classifier.name}'")
    return set(names[:names.index(through) + 1])


def _drop_softmax(layers: list) -> str | None:
    """Remove a final Softmax (its top feeds nothing); returns what it normalized."""
    for layer in reversed(layers):
        consumed = any(layer.top[0] in other.bottom for other in layers if other is not layer)
        if layer.type == "Softmax" and not consumed:
            layers.remove(layer)
            return layer.bottom[0]
    return None


def _set_mults(layer, blobs: int, frozen: bool) -> None:
    """lr_mult 0 for frozen layers; Caffe's 1/2 convention for the rest."""
    if blobs == 0 or layer.type == "BatchNorm":
        return                                  # BatchNorm statistics are never learned
    if frozen:
        mults = [FROZEN_MULTS] * blobs
    elif layer.param:
        return                                  # the deploy net chose already
    else:
        mults = list(LEARN_MULTS[:blobs]) if layer.type in BIASED else [(1, 1)] * blobs
    del layer.param[:]
    for lr, decay in mults:
        layer.param.add(lr_mult=lr, decay_mult=decay)


def _renew(classifier, layers: list, num_classes: int, logits: str) -> str:
    """Rename the classifier (and its top, where consumers follow) to start afresh
    with `num_classes` outputs; returns the logits blob's new name."""
    old = classifier.top[0]
    new = f"{classifier.name}_ft"
    classifier.name = new
    field = classifier.inner_product_param if classifier.type == "InnerProduct" \
        else classifier.convolution_param
    field.num_output = num_classes
    field.weight_filler.CopyFrom(caffe_pb2.FillerParameter(type="gaussian", std=0.01))
    field.bias_filler.CopyFrom(caffe_pb2.FillerParameter(type="constant", value=0))
    del classifier.param[:]
    biased = not field.HasField("bias_term") or field.bias_term
    for lr, decay in NEW_LAYER_MULTS[:2 if biased else 1]:
        classifier.param.add(lr_mult=lr, decay_mult=decay)
    for layer in layers[layers.index(classifier):]:
        for blobs in (layer.bottom, layer.top):
            blobs[:] = [new if b == old else b for b in blobs]
    return new if logits == old else logits


def _data_layer(entry: Entry, options: Options, phase: int, source: str, top: str):
    prep = entry.preprocess
    layer = caffe_pb2.LayerParameter(name="data", type="Data", top=[top, "label"])
    layer.include.add(phase=phase)
    transform = layer.transform_param
    transform.mirror = phase == caffe_pb2.TRAIN
    if prep.crop:
        if prep.crop[0] != prep.crop[1]:
            raise ProtonetError(f"{entry.name}: Caffe's Data layer crops squares only; "
                                f"the entry's crop is {prep.crop}")
        transform.crop_size = prep.crop[0]
    transform.mean_value.extend(prep.mean)
    if prep.scale != 1:
        transform.scale = prep.scale
    layer.data_param.source = os.path.abspath(source)
    layer.data_param.batch_size = options.batch_size
    layer.data_param.backend = caffe_pb2.DataParameter.LMDB
    return layer


def _head(name: str, type_: str, logits: str, phase: int | None = None):
    layer = caffe_pb2.LayerParameter(name=name, type=type_, bottom=[logits, "label"], top=[name])
    if phase is not None:
        layer.include.add(phase=phase)
    return layer


# -- the solver -------------------------------------------------------------------------------
def solver(entry: Entry, options: Options, net_path: Path,
           weights: str) -> caffe_pb2.SolverParameter:
    """SGD with momentum at a low base rate, dropping 10x halfway, testing ten times."""
    n = options.iterations
    param = caffe_pb2.SolverParameter(
        net=str(net_path), base_lr=options.base_lr, lr_policy="step", gamma=0.1,
        stepsize=max(1, n // 2), max_iter=n, momentum=0.9, weight_decay=0.0005,
        display=max(1, min(20, n // 10)), test_interval=max(1, n // 10),
        snapshot_prefix=str(Path(options.out).resolve() / f"{entry.name}_finetune"),
        type="SGD")
    param.test_iter.append(math.ceil(_records(options.val_db) / options.batch_size))
    param.weights.append(os.path.abspath(weights))
    if options.gpu is not None:
        param.solver_mode = caffe_pb2.SolverParameter.GPU
        param.device_id = options.gpu
    else:
        param.solver_mode = caffe_pb2.SolverParameter.CPU
    return param


def _records(db: str) -> int:
    """How many records the LMDB holds (the validation pass covers each once)."""
    cursor = RecordCursor(db)
    try:
        count = cursor.size_hint()
        return count if count is not None else sum(1 for _ in cursor.scan())
    finally:
        cursor.close()
