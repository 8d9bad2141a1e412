"""Write nets in Python, pycaffe's NetSpec style, and get plain prototxt out.

Scripts that generate Caffe nets (`from caffe import layers as L, params as P`)
port with an import change: `L.<Type>(bottoms..., **fields)` describes a layer,
assigning it to a NetSpec attribute names its top, and `NetSpec.to_proto()` returns
a caffe_pb2.NetParameter that Caffe and protonet both read. Keyword fields go to the
layer's own `<type>_param` message (found from the LayerParameter schema, as pycaffe
does), then to LayerParameter itself. Unlike pycaffe we check them against the schema
when the layer is described, so a typo fails at the line that made it, naming the
closest valid fields.

The block helpers at the end (conv_bn_scale_relu, residual_block, inception_module)
write the repeated patterns of ResNet and GoogLeNet into a NetSpec.
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any

from google.protobuf import message as pb_message

from .errors import NetError, closest
from .proto import caffe_pb2

_LAYER = caffe_pb2.LayerParameter.DESCRIPTOR

# Types whose parameters live in a message not named after them.
_SHARED_PARAMS = {
    "Deconvolution": "convolution_param",
    "Im2col": "convolution_param",
    "SoftmaxWithLoss": "softmax_param",
    "RNN": "recurrent_param",
    "LSTM": "recurrent_param",
}


def _own_param_fields() -> dict[str, str]:
    """Layer type -> its `*_param` field, from message names (FooParameter -> Foo)."""
    fields = {}
    for f in _LAYER.fields:
        if f.name.endswith("_param") and f.message_type is not None:
            fields[f.message_type.name[:-len("Parameter")]] = f.name
    return fields


_PARAM_FIELDS = _own_param_fields()


def param_fields(type_name: str) -> list[str]:
    """The `*_param` fields whose members a layer of `type_name` takes as keywords."""
    found = [_SHARED_PARAMS.get(type_name) or _PARAM_FIELDS.get(type_name)]
    if type_name.endswith("Loss"):
        found.append("loss_param")
    return [f for f in found if f]


# -- assigning Python values to messages ----------------------------------------------
def assign(msg: pb_message.Message, name: str, value: Any) -> None:
    """Set field `name` of `msg` from a Python value: dicts fill messages, lists fill
    repeated fields (a single value is a one-element list), enum names are accepted."""
    field = msg.DESCRIPTOR.fields_by_name.get(name)
    if field is None:
        raise AttributeError(f"{msg.DESCRIPTOR.name} has no field '{name}'")
    if field.is_repeated:
        container = getattr(msg, name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if field.message_type is not None:
                _fill(container.add(), item)
            else:
                container.append(_scalar(field, item))
    elif field.message_type is not None:
        _fill(getattr(msg, name), value)
    else:
        setattr(msg, name, _scalar(field, value))


def _fill(msg: pb_message.Message, value: Any) -> None:
    if isinstance(value, pb_message.Message):
        msg.CopyFrom(value)
        return
    if not isinstance(value, dict):
        raise TypeError(f"{msg.DESCRIPTOR.name} is a message: give a dict, not "
                        f"{type(value).__name__}")
    for key, item in value.items():
        assign(msg, key, item)


def _scalar(field, value: Any) -> Any:
    if field.enum_type is not None and isinstance(value, str):
        number = field.enum_type.values_by_name.get(value)
        if number is None:
            names = [v.name for v in field.enum_type.values]
            raise ValueError(f"'{value}' is not a {field.enum_type.name}; one of "
                             + ", ".join(names))
        return number.number
    return value


# -- the graph -------------------------------------------------------------------------
class Top:
    """One output blob of a layer description (the `n`-th top of `fn`)."""

    def __init__(self, fn: "Function", n: int):
        self.fn, self.n = fn, n

    def to_proto(self) -> caffe_pb2.NetParameter:
        """A net holding every layer this top depends on (names generated)."""
        return to_proto(self)


class Function:
    """A layer description: its type, bottom Tops and a LayerParameter of its fields."""

    def __init__(self, type_name: str, inputs: tuple, kwargs: dict[str, Any]):
        for i, bottom in enumerate(inputs):
            if not isinstance(bottom, Top):
                raise TypeError(f"{type_name} bottom {i} is a {type(bottom).__name__}, "
                                "not a Top (the result of an L.<Type>(...) call)")
        self.type_name, self.inputs = type_name, inputs
        self.ntop = kwargs.pop("ntop", 1)
        self.in_place = kwargs.pop("in_place", False)
        self.param = caffe_pb2.LayerParameter(type=type_name)
        for key, value in kwargs.items():
            self._set(key, value)
        self.tops = tuple(Top(self, n) for n in range(self.ntop))

    def _set(self, key: str, value: Any) -> None:
        targets = [] if key.endswith("param") else \
            [getattr(self.param, f) for f in param_fields(self.type_name)]
        for msg in targets + [self.param]:
            if key in msg.DESCRIPTOR.fields_by_name:
                try:
                    assign(msg, key, value)
                except (AttributeError, TypeError, ValueError) as e:
                    raise NetError(f"L.{self.type_name}: {key}: {e}") from None
                return
        names = [f.name for msg in targets + [self.param] for f in msg.DESCRIPTOR.fields]
        where = ", ".join(param_fields(self.type_name) + ["LayerParameter"])
        raise NetError(f"L.{self.type_name}: no field '{key}' in {where}"
                       f"{closest(key, names)}")

    def _to_proto(self, layers: "OrderedDict[Function, caffe_pb2.LayerParameter]",
                  names: dict, autonames: Counter) -> None:
        if self in layers:
            return
        bottoms = []
        for bottom in self.inputs:
            bottom.fn._to_proto(layers, names, autonames)
            bottoms.append(layers[bottom.fn].top[bottom.n])
        layer = caffe_pb2.LayerParameter()
        layer.CopyFrom(self.param)
        layer.bottom[:] = bottoms
        layer.top[:] = bottoms if self.in_place else \
            [_top_name(t, names, autonames) for t in self.tops]
        if not layer.name:
            layer.name = self._layer_name(names, autonames)
        layers[self] = layer

    def _layer_name(self, names: dict, autonames: Counter) -> str:
        if self in names:
            return names[self]
        if self.tops:
            return _top_name(self.tops[0], names, autonames)
        autonames[self.type_name] += 1
        return f"{self.type_name}{autonames[self.type_name]}"


def _top_name(top: Top, names: dict, autonames: Counter) -> str:
    if top not in names:
        autonames[top.fn.type_name] += 1
        names[top] = f"{top.fn.type_name}{autonames[top.fn.type_name]}"
    return names[top]


def _build(values, names: dict) -> caffe_pb2.NetParameter:
    layers: OrderedDict = OrderedDict()
    autonames: Counter = Counter()
    for value in values:
        (value.fn if isinstance(value, Top) else value)._to_proto(layers, names, autonames)
    net = caffe_pb2.NetParameter()
    net.layer.extend(layers.values())
    return net


def to_proto(*tops: Top) -> caffe_pb2.NetParameter:
    """A net of every layer the given tops need; blob and layer names generated."""
    return _build(tops, {})


class NetSpec:
    """Tops assigned as attributes (or items) name their blobs and layers;
    `to_proto()` writes every layer they need, in dependency order."""

    def __init__(self):
        object.__setattr__(self, "tops", OrderedDict())

    def __setattr__(self, name: str, value: "Top | Function") -> None:
        if not isinstance(value, (Top, Function)):
            raise TypeError(f"NetSpec.{name} must be a Top (or an ntop=0 layer), not "
                            f"{type(value).__name__}")
        self.tops[name] = value

    def __getattr__(self, name: str) -> "Top | Function":
        try:
            return self.tops[name]
        except KeyError:
            raise AttributeError(f"no top named '{name}' in this NetSpec"
                                 f"{closest(name, self.tops)}") from None

    __setitem__ = __setattr__
    __getitem__ = __getattr__

    def to_proto(self) -> caffe_pb2.NetParameter:
        return _build(self.tops.values(), {v: k for k, v in self.tops.items()})


class Layers:
    """`L.<Type>(*bottoms, **fields)`: a layer description of Caffe type <Type>.
    Returns its Top (ntop=1), a tuple of Tops (ntop>1) or the layer itself (ntop=0)."""

    def __getattr__(self, type_name: str):
        if type_name.startswith("__"):
            raise AttributeError(type_name)

        def layer(*bottoms: Top, **fields):
            fn = Function(type_name, bottoms, fields)
            if fn.ntop == 0:
                return fn
            return fn.tops[0] if fn.ntop == 1 else fn.tops
        return layer


class Params:
    """Enum constants: `P.Pooling.MAX` (PoolingParameter), `P.Phase.TRAIN` or
    `P.TRAIN` (top-level enums), `P.Loss.VALID`, `P.Eltwise.SUM`, ..."""

    def __getattr__(self, name: str):
        for candidate in (name + "Parameter", name):
            found = getattr(caffe_pb2, candidate, None)
            if found is not None:
                return found
        known = [m[:-len("Parameter")] for m in caffe_pb2.DESCRIPTOR.message_types_by_name
                 if m.endswith("Parameter")] + list(caffe_pb2.DESCRIPTOR.enum_types_by_name)
        raise AttributeError(f"P.{name}: caffe_pb2 has no {name}Parameter message or "
                             f"{name} enum{closest(name, known)}")


layers = Layers()
params = Params()
L, P = layers, params


# -- repeated blocks ---------------------------------------------------------------------
_FROZEN = [dict(lr_mult=0, decay_mult=0)] * 3    # BatchNorm's mean, variance, factor


def conv_relu(n: NetSpec, name: str, bottom: Top, num_output: int, kernel_size: int,
              stride: int = 1, pad: int = 0, **conv) -> Top:
    """Convolution `name` (xavier weights unless given) and an in-place ReLU."""
    conv.setdefault("weight_filler", dict(type="xavier"))
    n[name] = L.Convolution(bottom, num_output=num_output, kernel_size=kernel_size,
                            stride=stride, pad=pad, **conv)
    n[name + "_relu"] = L.ReLU(n[name], in_place=True)
    return n[name + "_relu"]


def conv_bn_scale_relu(n: NetSpec, name: str, bottom: Top, num_output: int,
                       kernel_size: int, stride: int = 1, pad: int = 0,
                       relu: bool = True, **conv) -> Top:
    """Convolution without bias, BatchNorm and Scale (with bias) in place, then
    ReLU when `relu`: layers `name`, `name`_bn, `name`_scale, `name`_relu."""
    conv.setdefault("weight_filler", dict(type="msra"))
    conv.setdefault("bias_term", False)
    n[name] = L.Convolution(bottom, num_output=num_output, kernel_size=kernel_size,
                            stride=stride, pad=pad, **conv)
    n[name + "_bn"] = L.BatchNorm(n[name], in_place=True, param=_FROZEN)
    n[name + "_scale"] = L.Scale(n[name + "_bn"], in_place=True, bias_term=True)
    if not relu:
        return n[name + "_scale"]
    n[name + "_relu"] = L.ReLU(n[name + "_scale"], in_place=True)
    return n[name + "_relu"]


def residual_block(n: NetSpec, name: str, bottom: Top, num_output: int, stride: int = 1,
                   projection: bool = False, bottleneck: bool = False) -> Top:
    """A ResNet block: branch2 (3x3, 3x3; or 1x1, 3x3, 1x1 x4 when `bottleneck`) plus
    the shortcut (identity, or a strided 1x1 projection), summed, then ReLU.

    `num_output` is the block's width (the bottleneck's inner width); use
    `projection=True` whenever stride or channel count change.
    """
    if bottleneck:     # (width, kernel, stride, pad) of each branch2 convolution
        layout = [(num_output, 1, stride, 0), (num_output, 3, 1, 1),
                  (4 * num_output, 1, 1, 0)]
    else:
        layout = [(num_output, 3, stride, 1), (num_output, 3, 1, 1)]
    branch = bottom
    for i, (width, kernel, step, pad) in enumerate(layout):
        branch = conv_bn_scale_relu(n, f"{name}_branch2{'abc'[i]}", branch, width, kernel,
                                    step, pad, relu=i < len(layout) - 1)
    shortcut = bottom
    if projection:
        shortcut = conv_bn_scale_relu(n, f"{name}_branch1", bottom, layout[-1][0], 1,
                                      stride, relu=False)
    n[name] = L.Eltwise(shortcut, branch, operation=P.Eltwise.SUM)
    n[name + "_relu"] = L.ReLU(n[name], in_place=True)
    return n[name + "_relu"]


def inception_module(n: NetSpec, name: str, bottom: Top, n1x1: int, n3x3_reduce: int,
                     n3x3: int, n5x5_reduce: int, n5x5: int, pool_proj: int) -> Top:
    """GoogLeNet's inception module: 1x1, 1x1->3x3, 1x1->5x5 and 3x3 max pool->1x1
    branches (each conv with ReLU), concatenated into `name`/output."""
    one = conv_relu(n, f"{name}/1x1", bottom, n1x1, 1)
    three = conv_relu(n, f"{name}/3x3", conv_relu(n, f"{name}/3x3_reduce", bottom,
                                                  n3x3_reduce, 1), n3x3, 3, pad=1)
    five = conv_relu(n, f"{name}/5x5", conv_relu(n, f"{name}/5x5_reduce", bottom,
                                                 n5x5_reduce, 1), n5x5, 5, pad=2)
    n[f"{name}/pool"] = L.Pooling(bottom, pool=P.Pooling.MAX, kernel_size=3, stride=1,
                                  pad=1)
    proj = conv_relu(n, f"{name}/pool_proj", n[f"{name}/pool"], pool_proj, 1)
    n[f"{name}/output"] = L.Concat(one, three, five, proj)
    return n[f"{name}/output"]
