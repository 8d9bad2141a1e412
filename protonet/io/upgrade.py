"""Upgrade old Caffe net and solver definitions to the current schema.

Published models are often written in formats Caffe has since retired: V0 nets
(`layers { layer { type: "conv" } }`, with separate padding layers), V1 nets
(`layers { type: CONVOLUTION blobs_lr: 1 }`), transformation fields inside data
params, net-level `input`/`input_dim` fields, three-param BatchNorm layers, and
solvers with the `solver_type` enum. Caffe rewrites all of these on load
(util/upgrade_proto.cpp); this module makes the same rewrites, step by step and
in the same order, so the rest of protonet only ever sees current definitions.
Old .caffemodel files go through the same path, with their weight blobs.

Where Caffe logs an error and carries on with a partly upgraded net, or aborts,
we raise a NetError (or SolverError) naming the file and layer instead.
"""
from __future__ import annotations

import os
import logging
import warnings

from google.protobuf.message import Message

from ..errors import NetError, SolverError
from ..proto import caffe_pb2
from .binary import read_binary
from .text import read_text

V1 = caffe_pb2.V1LayerParameter

# V0 `type` strings and the V1 enum each became.
V0_LAYER_TYPES = {
    "accuracy": V1.ACCURACY,
    "bnll": V1.BNLL,
    "concat": V1.CONCAT,
    "conv": V1.CONVOLUTION,
    "data": V1.DATA,
    "dropout": V1.DROPOUT,
    "euclidean_loss": V1.EUCLIDEAN_LOSS,
    "flatten": V1.FLATTEN,
    "hdf5_data": V1.HDF5_DATA,
    "hdf5_output": V1.HDF5_OUTPUT,
    "im2col": V1.IM2COL,
    "images": V1.IMAGE_DATA,
    "infogain_loss": V1.INFOGAIN_LOSS,
    "innerproduct": V1.INNER_PRODUCT,
    "lrn": V1.LRN,
    "multinomial_logistic_loss": V1.MULTINOMIAL_LOGISTIC_LOSS,
    "pool": V1.POOLING,
    "relu": V1.RELU,
    "sigmoid": V1.SIGMOID,
    "softmax": V1.SOFTMAX,
    "softmax_loss": V1.SOFTMAX_LOSS,
    "split": V1.SPLIT,
    "tanh": V1.TANH,
    "window_data": V1.WINDOW_DATA,
}

# V1 enum -> current type string.
V1_LAYER_TYPES = {
    V1.NONE: "",
    V1.ABSVAL: "AbsVal",
    V1.ACCURACY: "Accuracy",
    V1.ARGMAX: "ArgMax",
    V1.BNLL: "BNLL",
    V1.CONCAT: "Concat",
    V1.CONTRASTIVE_LOSS: "ContrastiveLoss",
    V1.CONVOLUTION: "Convolution",
    V1.DECONVOLUTION: "Deconvolution",
    V1.DATA: "Data",
    V1.DROPOUT: "Dropout",
    V1.DUMMY_DATA: "DummyData",
    V1.EUCLIDEAN_LOSS: "EuclideanLoss",
    V1.ELTWISE: "Eltwise",
    V1.EXP: "Exp",
    V1.FLATTEN: "Flatten",
    V1.HDF5_DATA: "HDF5Data",
    V1.HDF5_OUTPUT: "HDF5Output",
    V1.HINGE_LOSS: "HingeLoss",
    V1.IM2COL: "Im2col",
    V1.IMAGE_DATA: "ImageData",
    V1.INFOGAIN_LOSS: "InfogainLoss",
    V1.INNER_PRODUCT: "InnerProduct",
    V1.LRN: "LRN",
    V1.MEMORY_DATA: "MemoryData",
    V1.MULTINOMIAL_LOGISTIC_LOSS: "MultinomialLogisticLoss",
    V1.MVN: "MVN",
    V1.POOLING: "Pooling",
    V1.POWER: "Power",
    V1.RELU: "ReLU",
    V1.SIGMOID: "Sigmoid",
    V1.SIGMOID_CROSS_ENTROPY_LOSS: "SigmoidCrossEntropyLoss",
    V1.SILENCE: "Silence",
    V1.SOFTMAX: "Softmax",
    V1.SOFTMAX_LOSS: "SoftmaxWithLoss",
    V1.SPLIT: "Split",
    V1.SLICE: "Slice",
    V1.TANH: "TanH",
    V1.WINDOW_DATA: "WindowData",
    V1.THRESHOLD: "Threshold",
}

_ANY = "*"  # a V0 field that moves to the same place whatever the layer type

# V0 field -> {V0 layer type: "param.field" it moves to in the V1 layer}.
V0_FIELDS = {
    "num_output": {"conv": "convolution_param.num_output",
                   "innerproduct": "inner_product_param.num_output"},
    "biasterm": {"conv": "convolution_param.bias_term",
                 "innerproduct": "inner_product_param.bias_term"},
    "weight_filler": {"conv": "convolution_param.weight_filler",
                      "innerproduct": "inner_product_param.weight_filler"},
    "bias_filler": {"conv": "convolution_param.bias_filler",
                    "innerproduct": "inner_product_param.bias_filler"},
    "pad": {"conv": "convolution_param.pad", "pool": "pooling_param.pad"},
    "kernelsize": {"conv": "convolution_param.kernel_size",
                   "pool": "pooling_param.kernel_size"},
    "group": {"conv": "convolution_param.group"},
    "stride": {"conv": "convolution_param.stride", "pool": "pooling_param.stride"},
    "pool": {"pool": "pooling_param.pool"},
    "dropout_ratio": {"dropout": "dropout_param.dropout_ratio"},
    "local_size": {"lrn": "lrn_param.local_size"},
    "alpha": {"lrn": "lrn_param.alpha"},
    "beta": {"lrn": "lrn_param.beta"},
    "k": {"lrn": "lrn_param.k"},
    "source": {"data": "data_param.source",
               "hdf5_data": "hdf5_data_param.source",
               "images": "image_data_param.source",
               "window_data": "window_data_param.source",
               "infogain_loss": "infogain_loss_param.source"},
    "scale": {_ANY: "transform_param.scale"},
    "meanfile": {_ANY: "transform_param.mean_file"},
    "batchsize": {"data": "data_param.batch_size",
                  "hdf5_data": "hdf5_data_param.batch_size",
                  "images": "image_data_param.batch_size",
                  "window_data": "window_data_param.batch_size"},
    "cropsize": {_ANY: "transform_param.crop_size"},
    "mirror": {_ANY: "transform_param.mirror"},
    "rand_skip": {"data": "data_param.rand_skip",
                  "images": "image_data_param.rand_skip"},
    "shuffle_images": {"images": "image_data_param.shuffle"},
    "new_height": {"images": "image_data_param.new_height"},
    "new_width": {"images": "image_data_param.new_width"},
    "concat_dim": {"concat": "concat_param.concat_dim"},
    "det_fg_threshold": {"window_data": "window_data_param.fg_threshold"},
    "det_bg_threshold": {"window_data": "window_data_param.bg_threshold"},
    "det_fg_fraction": {"window_data": "window_data_param.fg_fraction"},
    "det_context_pad": {"window_data": "window_data_param.context_pad"},
    "det_crop_mode": {"window_data": "window_data_param.crop_mode"},
    "hdf5_output_param": {"hdf5_output": "hdf5_output_param"},
}


# V1 layer type -> its param message that held transformation fields.
DATA_TRANSFORM_PARAMS = {
    V1.DATA: "data_param",
    V1.IMAGE_DATA: "image_data_param",
    V1.WINDOW_DATA: "window_data_param",
}
TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")

# Legacy solver_type enum name -> current type string.
SOLVER_TYPES = {
    "SGD": "SGD",
    "NESTEROV": "Nesterov",
    "ADAGRAD": "AdaGrad",
    "RMSPROP": "RMSProp",
    "ADADELTA": "AdaDelta",
    "ADAM": "Adam",
}


# --- what needs upgrading --------------------------------------------------

def net_needs_v0_upgrade(net: caffe_pb2.NetParameter) -> bool:
    """True if any `layers` entry still wraps a V0 `layer`."""
    return any(layer.HasField("layer") for layer in net.layers)


def net_needs_v1_upgrade(net: caffe_pb2.NetParameter) -> bool:
    return len(net.layers) > 0


def net_needs_data_upgrade(net: caffe_pb2.NetParameter) -> bool:
    """True if a V1 data layer keeps transformation fields in its own param."""
    return any(_has_old_transform_fields(layer) for layer in net.layers)


def net_needs_input_upgrade(net: caffe_pb2.NetParameter) -> bool:
    return len(net.input) > 0


def net_needs_batch_norm_upgrade(net: caffe_pb2.NetParameter) -> bool:
    """True if a BatchNorm layer declares the three param specs of old."""
    return any(_is_old_batch_norm(layer) for layer in net.layer)


def net_needs_upgrade(net: caffe_pb2.NetParameter) -> bool:
    return (net_needs_v0_upgrade(net) or net_needs_v1_upgrade(net)
            or net_needs_data_upgrade(net) or net_needs_input_upgrade(net)
            or net_needs_batch_norm_upgrade(net))


def solver_needs_upgrade(solver: caffe_pb2.SolverParameter) -> bool:
    return solver.HasField("solver_type")


# --- whole-net upgrade -----------------------------------------------------

def upgrade_net(net: caffe_pb2.NetParameter,
                source: str = "<net>") -> caffe_pb2.NetParameter:
    """An upgraded copy of `net`, made by Caffe's steps in Caffe's order."""
    return _upgrade_owned(_copy(net), source)


def read_net(path: str) -> caffe_pb2.NetParameter:
    """Read a net prototxt and upgrade it if it is in an old format."""
    return _upgrade_owned(read_text(path, caffe_pb2.NetParameter()), path)


def read_net_binary(path: str) -> caffe_pb2.NetParameter:
    """Read a binary net (.caffemodel), upgrading old layers with their blobs."""
    return _upgrade_owned(read_binary(path, caffe_pb2.NetParameter()), path)


def _upgrade_owned(net: caffe_pb2.NetParameter,
                   source: str) -> caffe_pb2.NetParameter:
    """Upgrade `net`, which no caller still holds, changing it where it can."""
    if net_needs_v0_upgrade(net):
        net = upgrade_v0_net(net, source)
        _warn(source, "upgraded V0 layer definitions (layers { layer { ... } })")
    if net_needs_data_upgrade(net):
        upgrade_data_transformation(net)
        _warn(source, "moved transformation fields of data layers into "
                      "transform_param")
    if net_needs_v1_upgrade(net):
        upgrade_v1_net(net, source)
        _warn(source, "upgraded V1 layer definitions (layers { type: ENUM }) "
                      "to layer { type: \"Name\" }")
    if net_needs_input_upgrade(net):
        upgrade_net_input(net, source)
        # Most published deploy files still use these fields (31 of a sample of 50),
        # and the rewrite is exact: news for the log, not a warning on every load.
        logging.getLogger("protonet").info(
            "%s: replaced net-level input fields by an Input layer", source)
    if net_needs_batch_norm_upgrade(net):
        upgrade_batch_norm(net)
        # Caffe itself saves BatchNorm layers this way, so this is news, not a warning.
        logging.getLogger("protonet").info(
            "%s: set lr_mult and decay_mult to 0 on BatchNorm param specs", source)
    return net


# --- V0 -> V1 --------------------------------------------------------------

def upgrade_v0_net(net: caffe_pb2.NetParameter,
                   source: str) -> caffe_pb2.NetParameter:
    """A V1 net from a V0 one; keeps only name, inputs and force_backward."""
    folded = fold_v0_padding_layers(net, source)
    upgraded = caffe_pb2.NetParameter()
    if folded.HasField("name"):
        upgraded.name = folded.name
    for layer in folded.layers:
        upgraded.layers.append(upgrade_v0_layer(layer, source))
    upgraded.input.extend(folded.input)
    upgraded.input_dim.extend(folded.input_dim)
    if folded.HasField("force_backward"):
        upgraded.force_backward = folded.force_backward
    return upgraded


def fold_v0_padding_layers(net: caffe_pb2.NetParameter,
                           source: str) -> caffe_pb2.NetParameter:
    """Drop V0 padding layers, giving their pad to the conv/pool they feed."""
    folded = _copy(net)
    del folded.layers[:]
    producer: dict[str, int | None] = {name: None for name in net.input}
    for index, layer in enumerate(net.layers):
        kept = None
        if layer.layer.type != "padding":
            kept = folded.layers.add()
            kept.CopyFrom(layer)
        for slot, blob in enumerate(layer.bottom):
            if blob not in producer:
                raise _v0_error(layer, f"bottom '{blob}' is neither a net input "
                                f"nor the top of an earlier layer", source)
            origin = producer[blob]
            if origin is not None and net.layers[origin].layer.type == "padding":
                padding = net.layers[origin]
                _check_padding_use(layer, padding, source)
                kept.layer.pad = padding.layer.pad
                kept.bottom[slot] = padding.bottom[0]
        for blob in layer.top:
            producer[blob] = index
    return folded


def _check_padding_use(layer: caffe_pb2.V1LayerParameter,
                       padding: caffe_pb2.V1LayerParameter, source: str) -> None:
    """Only a single-bottom conv or pool layer can absorb a 1-in 1-out padding."""
    pad_name = padding.layer.name
    if layer.layer.type not in ("conv", "pool"):
        raise _v0_error(layer, f"takes padding layer '{pad_name}' as input; only "
                        "conv and pool layers can", source)
    if len(layer.bottom) != 1:
        raise _v0_error(layer, f"takes padding layer '{pad_name}' as input, so "
                        f"expected 1 bottom, got {len(layer.bottom)}", source)
    if len(padding.bottom) != 1 or len(padding.top) != 1:
        raise _v0_error(padding, "expected a padding layer with 1 bottom and "
                        f"1 top, got {len(padding.bottom)} and {len(padding.top)}",
                        source)


def upgrade_v0_layer(v0: caffe_pb2.V1LayerParameter,
                     source: str) -> caffe_pb2.V1LayerParameter:
    """The V1 layer for one V0 layer connection."""
    layer = V1(bottom=v0.bottom, top=v0.top)
    if not v0.HasField("layer"):
        return layer
    old = v0.layer
    if old.HasField("name"):
        layer.name = old.name
    if old.HasField("type"):
        layer.type = upgrade_v0_layer_type(v0, source)
    layer.blobs.extend(old.blobs)
    layer.blobs_lr.extend(old.blobs_lr)
    layer.weight_decay.extend(old.weight_decay)
    for field, value in old.ListFields():
        if field.name in V0_FIELDS:  # new_num and new_channels are dropped
            target = _v0_target(v0, field.name, source)
            _assign(layer, target, _v0_value(field.name, value))
    return layer


def upgrade_v0_layer_type(v0: caffe_pb2.V1LayerParameter, source: str) -> int:
    """The V1 type enum for a V0 type string."""
    try:
        return V0_LAYER_TYPES[v0.layer.type]
    except KeyError:
        raise _v0_error(v0, f"unknown V0 layer type '{v0.layer.type}'; expected "
                        f"one of {', '.join(sorted(V0_LAYER_TYPES))}",
                        source) from None


def _v0_target(v0: caffe_pb2.V1LayerParameter, name: str, source: str) -> str:
    places = V0_FIELDS[name]
    target = places.get(_ANY) or places.get(v0.layer.type)
    if target is None:
        raise _v0_error(v0, f"V0 parameter '{name}' does not apply to this layer "
                        f"type; it is known only for {', '.join(places)}", source)
    return target


def _v0_value(name: str, value):
    if name == "pool":
        old = caffe_pb2.V0LayerParameter.PoolMethod.Name(value)
        return caffe_pb2.PoolingParameter.PoolMethod.Value(old)
    return value


def _v0_error(v0: caffe_pb2.V1LayerParameter, message: str,
              source: str) -> NetError:
    name = v0.layer.name or "/".join(v0.top) or "<unnamed>"
    return NetError(f"{message} (upgrading {source})", name,
                    v0.layer.type or None)


# --- data transformation ---------------------------------------------------

def upgrade_data_transformation(net: caffe_pb2.NetParameter) -> None:
    """Move scale/mean_file/crop_size/mirror of V1 data layers to transform_param."""
    for layer in net.layers:
        param_name = DATA_TRANSFORM_PARAMS.get(layer.type)
        if param_name is None:
            continue
        param = getattr(layer, param_name)
        param.SetInParent()  # Caffe touches both messages, so both end up set
        layer.transform_param.SetInParent()
        for field in TRANSFORM_FIELDS:
            if param.HasField(field):
                setattr(layer.transform_param, field, getattr(param, field))
                param.ClearField(field)


def _has_old_transform_fields(layer: caffe_pb2.V1LayerParameter) -> bool:
    param_name = DATA_TRANSFORM_PARAMS.get(layer.type)
    if param_name is None:
        return False
    param = getattr(layer, param_name)
    return any(param.HasField(field) for field in TRANSFORM_FIELDS)


# --- V1 -> current ---------------------------------------------------------

def upgrade_v1_net(net: caffe_pb2.NetParameter, source: str) -> None:
    """Rewrite the V1 `layers` of `net` as current `layer` entries."""
    if len(net.layer) > 0:
        raise NetError(f"{source} has both V1 'layers' and current 'layer' "
                       "entries; Caffe refuses to upgrade such a mix. Rewrite "
                       "the 'layers { type: ENUM }' entries as "
                       "'layer { type: \"Name\" }'")
    for old in net.layers:
        net.layer.append(upgrade_v1_layer(old))
        old.ClearField("blobs")  # moved, not copied: caffemodels can be large
    net.ClearField("layers")


def upgrade_v1_layer(old: caffe_pb2.V1LayerParameter) -> caffe_pb2.LayerParameter:
    """One current LayerParameter from a V1 layer (weight blobs included)."""
    layer = caffe_pb2.LayerParameter(
        bottom=old.bottom, top=old.top, include=old.include,
        exclude=old.exclude, blobs=old.blobs, loss_weight=old.loss_weight)
    if old.HasField("name"):
        layer.name = old.name
    if old.HasField("type"):
        layer.type = V1_LAYER_TYPES[old.type]
    _set_param_specs(layer, "name", old.param)
    _set_param_specs(layer, "share_mode", map(_share_mode, old.blob_share_mode))
    _set_param_specs(layer, "lr_mult", old.blobs_lr)
    _set_param_specs(layer, "decay_mult", old.weight_decay)
    for field, value in old.ListFields():
        if field.name.endswith("_param"):
            getattr(layer, field.name).CopyFrom(value)
    return layer


def _set_param_specs(layer: caffe_pb2.LayerParameter, field: str, values) -> None:
    """Set `field` of the i-th ParamSpec to values[i], adding specs as needed."""
    for index, value in enumerate(values):
        while len(layer.param) <= index:
            layer.param.add()
        setattr(layer.param[index], field, value)


def _share_mode(mode: int) -> int:
    name = V1.DimCheckMode.Name(mode)
    return caffe_pb2.ParamSpec.DimCheckMode.Value(name)


# --- net inputs and BatchNorm ----------------------------------------------

def upgrade_net_input(net: caffe_pb2.NetParameter, source: str) -> None:
    """Turn input/input_shape/input_dim into a leading Input layer.

    An input with neither shape nor dims (old caffemodels) is just dropped.
    """
    if net.input_shape or net.input_dim:
        layer = caffe_pb2.LayerParameter(name="input", type="Input", top=net.input)
        layer.input_param.shape.extend(_input_shapes(net, source))
        net.layer.insert(0, layer)
    for field in ("input", "input_shape", "input_dim"):
        net.ClearField(field)


def _input_shapes(net: caffe_pb2.NetParameter,
                  source: str) -> list[caffe_pb2.BlobShape]:
    count = len(net.input)
    if net.input_shape:
        if len(net.input_shape) < count:
            raise NetError(f"{source}: {count} inputs but only "
                           f"{len(net.input_shape)} input_shape entries")
        return list(net.input_shape[:count])
    if len(net.input_dim) < 4 * count:
        raise NetError(f"{source}: {count} inputs need {4 * count} input_dim "
                       f"values (4 per input), got {len(net.input_dim)}")
    dims = net.input_dim
    return [caffe_pb2.BlobShape(dim=dims[4 * i:4 * i + 4]) for i in range(count)]


def upgrade_batch_norm(net: caffe_pb2.NetParameter) -> None:
    """Zero lr_mult and decay_mult of old three-param BatchNorm layers."""
    for layer in net.layer:
        if _is_old_batch_norm(layer):
            for spec in layer.param:
                spec.lr_mult = 0.0
                spec.decay_mult = 0.0


def _is_old_batch_norm(layer: caffe_pb2.LayerParameter) -> bool:
    return layer.type == "BatchNorm" and len(layer.param) == 3


# --- solver ----------------------------------------------------------------

def upgrade_solver(solver: caffe_pb2.SolverParameter,
                   source: str = "<solver>") -> caffe_pb2.SolverParameter:
    """A copy with the legacy solver_type enum turned into the type string."""
    solver = _copy(solver)
    if not solver_needs_upgrade(solver):
        return solver
    old = caffe_pb2.SolverParameter.SolverType.Name(solver.solver_type)
    if solver.HasField("type"):
        raise SolverError(f"{source}: both the legacy 'solver_type: {old}' and "
                          f"'type: \"{solver.type}\"' are set; Caffe refuses "
                          "this, keep only type")
    solver.type = SOLVER_TYPES[old]
    solver.ClearField("solver_type")
    _warn(source, f"replaced 'solver_type: {old}' by 'type: \"{solver.type}\"'",
          stacklevel=3)
    return solver


def read_solver(path: str) -> caffe_pb2.SolverParameter:
    """Read a solver prototxt, upgrade it and settle snapshot_prefix as Caffe does."""
    solver = upgrade_solver(read_text(path, caffe_pb2.SolverParameter()), path)
    _settle_snapshot_prefix(solver, path)
    return solver


def _settle_snapshot_prefix(solver: caffe_pb2.SolverParameter, path: str) -> None:
    """Default snapshot_prefix to the solver path less its extension; a
    directory prefix gets the solver file's stem appended."""
    stem = os.path.splitext(path)[0]
    if not solver.HasField("snapshot_prefix"):
        solver.snapshot_prefix = stem
    elif os.path.isdir(solver.snapshot_prefix):
        solver.snapshot_prefix = os.path.join(solver.snapshot_prefix,
                                              os.path.basename(stem))


# --- helpers ---------------------------------------------------------------

def _copy(message):
    duplicate = type(message)()
    duplicate.CopyFrom(message)
    return duplicate


def _assign(message, dotted: str, value) -> None:
    """Set the field at the `dotted` path (appending to a repeated one)."""
    *parents, name = dotted.split(".")
    for parent in parents:
        message = getattr(message, parent)
    current = getattr(message, name)
    if isinstance(current, Message):
        current.CopyFrom(value)
    elif hasattr(current, "append"):
        current.append(value)
    else:
        setattr(message, name, value)


def _warn(source: str, what: str, stacklevel: int = 4) -> None:
    """Tell the caller of the public function which upgrade `source` needed."""
    warnings.warn(f"{source}: {what}; the file uses a format Caffe deprecated",
                  stacklevel=stacklevel)
