"""pycaffe's `caffe.draw`: draw a NetParameter as a graph.

`draw_net` and `draw_net_to_file` render through protonet.draw (DOT text we write,
Graphviz's `dot` for images), so they need no pydot. `get_pydot_graph` returns a
pydot.Dot of the same graph when pydot is installed (pip install pydot), and says
so when it is not. The label and colour helpers are pycaffe's, returning what
pycaffe's return (e.g. labels in double quotes).
"""
from __future__ import annotations

import os

from .. import draw as _draw
from ..errors import ProtonetError
from ..io.atomic import atomic_write
from .proto import caffe_pb2

LAYER_STYLE_DEFAULT = {"shape": "record", "fillcolor": "#6495ED", "style": "filled"}
NEURON_LAYER_STYLE = {"shape": "record", "fillcolor": "#90EE90", "style": "filled"}
BLOB_STYLE = {"shape": "octagon", "fillcolor": "#E0E0E0", "style": "filled"}

_LEARNING = ("Convolution", "Deconvolution", "InnerProduct")


def get_pooling_types_dict() -> dict[int, str]:
    """PoolMethod number -> name (0 -> 'MAX', ...)."""
    return {v.number: name for name, v in
            caffe_pb2.PoolingParameter.PoolMethod.DESCRIPTOR.values_by_name.items()}


def get_edge_label(layer) -> str:
    """'Batch N' for Data, num_output for Convolution/Deconvolution/InnerProduct,
    else '""' (an empty DOT label)."""
    if layer.type in ("Data", "Convolution", "Deconvolution", "InnerProduct"):
        return _draw.edge_label(layer)
    return '""'


def get_layer_lr_mult(layer) -> tuple[float, float]:
    """The (weights, bias) lr_mult of a Convolution, Deconvolution or InnerProduct."""
    if layer.type not in _LEARNING:
        raise ValueError(f"{layer.type} layers do not have a learning rate multiplier")
    if len(layer.param) > 2:
        raise ValueError("Could not parse the learning rate multiplier")
    mults = [p.lr_mult for p in layer.param]
    return tuple(mults + [1.0] * (2 - len(mults)))


def get_layer_label(layer, rankdir, display_lrm: bool = False) -> str:
    """The node label: name, (type), kernel/stride/pad of spatial layers and, with
    display_lrm, the lr multipliers; lines joined by '\\n' (LR) or spaces (TB, BT),
    in double quotes."""
    sep = " " if rankdir in ("TB", "BT") else r"\n"
    kind = layer.type
    if kind == "Pooling":
        kind += " " + get_pooling_types_dict()[layer.pooling_param.pool]
    parts = [layer.name, f"({kind})"]
    if layer.type == "Pooling":
        p = layer.pooling_param
        parts.append(sep.join([f"kernel size: {p.kernel_size}", f"stride: {p.stride}",
                               f"pad: {p.pad}"]))
    elif layer.type in ("Convolution", "Deconvolution"):
        c = layer.convolution_param
        first = (lambda values, default: values[0] if len(values) else default)
        parts.append(sep.join([f"kernel size: {first(c.kernel_size, 1)}",
                               f"stride: {first(c.stride, 1)}", f"pad: {first(c.pad, 0)}"]))
    if display_lrm and layer.type in _LEARNING:
        lrm = get_layer_lr_mult(layer)
        if any(lrm):
            parts.append("lr mult: %.1f, %.1f" % lrm)
    return '"%s"' % sep.join(parts)


def choose_color_by_layertype(layertype: str) -> str:
    """The fill colour of a layer node."""
    return _draw._COLORS.get(layertype, _draw._DEFAULT_COLOR)


def _dot(caffe_net, rankdir, label_edges=True, phase=None, display_lrm=False) -> str:
    return _draw.to_dot(caffe_net, rankdir, phase=phase, label_edges=label_edges,
                        display_lrm=display_lrm)


def get_pydot_graph(caffe_net, rankdir, label_edges: bool = True, phase=None,
                    display_lrm: bool = False):
    """The net as a pydot.Dot (needs the pydot package)."""
    try:
        import pydot
    except ImportError:
        raise ProtonetError("caffe.draw.get_pydot_graph needs the pydot package (pip "
                            "install pydot); draw_net and draw_net_to_file work "
                            "without it") from None
    graphs = pydot.graph_from_dot_data(_dot(caffe_net, rankdir, label_edges, phase,
                                            display_lrm))
    return graphs[0]


def draw_net(caffe_net, rankdir, ext: str = "png", phase=None,
             display_lrm: bool = False) -> bytes:
    """The net drawn as an image of format `ext` (bytes); 'dot', 'gv' and 'raw' give
    the DOT text itself (as bytes)."""
    text = _dot(caffe_net, rankdir, phase=phase, display_lrm=display_lrm)
    if ext.lower() in _draw.TEXT_FORMATS:
        return text.encode("utf-8")
    return _draw.render(text, ext)


def draw_net_to_file(caffe_net, filename, rankdir: str = "LR", phase=None,
                     display_lrm: bool = False) -> None:
    """Write the drawing to `filename`, the format named by its extension
    ('.raw' or '.dot': DOT text to feed Graphviz by hand)."""
    ext = os.fspath(filename).rsplit(".", 1)[-1]
    atomic_write(os.fspath(filename), draw_net(caffe_net, rankdir, ext, phase, display_lrm))
