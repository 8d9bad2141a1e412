"""pycaffe's `caffe.net_spec`: `layers` (L), `params` (P), NetSpec and to_proto.

These are protonet.netspec's, which writes the same layers (names by assignment,
generated names `<Type><n>` otherwise, in_place, ntop, `*_param` routing) and checks
fields against the schema when a layer is described. Two pycaffe details are added
here: a Function keeps its keyword arguments as `fn.params` (coord_map reads
them), and a bottom that is not a Top raises pycaffe's TypeError message.
"""
from __future__ import annotations

from .. import netspec as _netspec
from ..netspec import NetSpec, Top, assign, to_proto  # noqa: F401
from .proto import caffe_pb2


def param_name_dict() -> dict[str, str]:
    """Layer type -> the prefix of its `<prefix>_param` field (Pooling -> pooling),
    from the LayerParameter schema."""
    return {type_name: field[:-len("_param")]
            for type_name, field in _netspec._PARAM_FIELDS.items()}


def assign_proto(proto, name, val) -> None:
    """Set field `name` of message `proto` from a Python value: dicts fill messages,
    lists fill repeated fields (a single value becomes a one-element list)."""
    assign(proto, name, val)


class Function(_netspec.Function):
    """A layer description; `params` holds the keyword arguments it was given."""

    def __init__(self, type_name, inputs, params):
        for index, bottom in enumerate(inputs):
            if not isinstance(bottom, Top):
                raise TypeError(f"{type_name} input {index} is not a Top "
                                f"(type is {type(bottom)})")
        params = dict(params)
        super().__init__(type_name, tuple(inputs), dict(params))
        params.pop("ntop", None)
        params.pop("in_place", None)
        self.params = params


class Layers:
    """`L.<Type>(*bottoms, **fields)`: a Top (ntop=1), a tuple of Tops (ntop>1) or
    the layer itself (ntop=0)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def layer_fn(*args, **kwargs):
            fn = Function(name, args, kwargs)
            if fn.ntop == 0:
                return fn
            return fn.tops[0] if fn.ntop == 1 else fn.tops
        return layer_fn


Parameters = _netspec.Params     # P.Pooling.MAX, P.Eltwise.SUM, P.TRAIN, ...

_param_names = param_name_dict()
layers = Layers()
params = Parameters()

__all__ = ["Function", "Layers", "NetSpec", "Parameters", "Top", "assign_proto",
           "caffe_pb2", "layers", "param_name_dict", "params", "to_proto"]
