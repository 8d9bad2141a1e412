"""Draw a net's graph, as Caffe's draw_net.py does, without pydot.

We write Graphviz DOT text ourselves (layers as coloured records, blobs as grey
octagons, edges labelled with output counts) and hand it to the `dot` binary only
to render an image, so .dot output needs nothing installed and images need only
Graphviz. Unlike Caffe's drawing, phase selection applies Caffe's full NetState
rules (phase, level, stages), so the picture shows the layers the net really has.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import Iterable

from .errors import ProtonetError
from .io.atomic import atomic_write
from .net.state import layer_included
from .proto import caffe_pb2

TEXT_FORMATS = ("dot", "gv", "raw")
IMAGE_FORMATS = ("svg", "png", "pdf", "jpg", "jpeg", "gif", "ps", "eps")

_BLOB_STYLE = 'shape=octagon, style=filled, fillcolor="#E0E0E0"'
_NEURON_COLOR = "#90EE90"
_COLORS = {"Convolution": "#FF5050", "Deconvolution": "#FF5050", "Pooling": "#FF9900",
           "InnerProduct": "#CC33FF"}
_DEFAULT_COLOR = "#6495ED"
_LEARNING = ("Convolution", "Deconvolution", "InnerProduct")


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _record_text(text: str) -> str:
    """Escape the characters a record label treats as structure."""
    for ch in "\\{}|<>\"":
        text = text.replace(ch, "\\" + ch)
    return text


def _first(values, default: int) -> int:
    return values[0] if len(values) else default


def _spatial(layer: caffe_pb2.LayerParameter) -> list[str]:
    """Kernel, stride and pad of a convolution or pooling layer, as label lines."""
    if layer.type == "Pooling":
        p = layer.pooling_param
        if p.global_pooling:
            return ["global pooling"]
        kernel = f"{p.kernel_h}x{p.kernel_w}" if p.HasField("kernel_h") else str(p.kernel_size)
        return [f"kernel size: {kernel}", f"stride: {p.stride}", f"pad: {p.pad}"]
    c = layer.convolution_param
    kernel = f"{c.kernel_h}x{c.kernel_w}" if c.HasField("kernel_h") else \
        str(_first(c.kernel_size, 1))
    return [f"kernel size: {kernel}", f"stride: {_first(c.stride, 1)}",
            f"pad: {_first(c.pad, 0)}"]


def _lr_mults(layer: caffe_pb2.LayerParameter) -> tuple[float, float]:
    mults = [p.lr_mult for p in layer.param[:2]]
    return tuple(mults + [1.0] * (2 - len(mults)))


def layer_label(layer: caffe_pb2.LayerParameter, rankdir: str = "LR",
                display_lrm: bool = False) -> str:
    """The node text: name, (type), spatial parameters and optionally lr multipliers.
    Vertical layouts have room to the side, so lines are joined with spaces there."""
    kind = layer.type
    if kind == "Pooling":
        kind += " " + caffe_pb2.PoolingParameter.PoolMethod.Name(layer.pooling_param.pool)
    lines = [layer.name, f"({kind})"]
    if layer.type in ("Convolution", "Deconvolution", "Pooling"):
        lines += _spatial(layer)
    if display_lrm and layer.type in _LEARNING and any(_lr_mults(layer)):
        lines.append("lr mult: %.1f, %.1f" % _lr_mults(layer))
    separator = " " if rankdir in ("TB", "BT") else "\\n"
    return separator.join(_record_text(line) for line in lines)


def edge_label(layer: caffe_pb2.LayerParameter) -> str:
    """What flows out of a layer: batch size, output count or input shape."""
    if layer.type == "Data":
        return f"Batch {layer.data_param.batch_size}"
    if layer.type in ("Convolution", "Deconvolution"):
        return str(layer.convolution_param.num_output)
    if layer.type == "InnerProduct":
        return str(layer.inner_product_param.num_output)
    if layer.type == "Input" and len(layer.input_param.shape) == 1:
        return "x".join(str(d) for d in layer.input_param.shape[0].dim)
    return ""


def _layers(net: caffe_pb2.NetParameter, phase: int | None, level: int,
            stages: Iterable[str]) -> list[caffe_pb2.LayerParameter]:
    if phase is None:
        return list(net.layer)
    state = caffe_pb2.NetState(phase=phase, level=level, stage=list(stages))
    return [layer for layer in net.layer if layer_included(layer, state)]


def _layer_node(node: str, layer: caffe_pb2.LayerParameter, rankdir: str,
                display_lrm: bool) -> str:
    in_place = len(layer.bottom) == 1 and list(layer.bottom) == list(layer.top)
    color = _NEURON_COLOR if in_place else _COLORS.get(layer.type, _DEFAULT_COLOR)
    label = layer_label(layer, rankdir, display_lrm)
    return f'  {node} [label="{label}", shape=record, style=filled, fillcolor="{color}"];'


def to_dot(net: caffe_pb2.NetParameter, rankdir: str = "LR", phase: int | None = None,
           level: int = 0, stages: Iterable[str] = (), label_edges: bool = True,
           display_lrm: bool = False) -> str:
    """DOT text for `net`; `phase` None draws every layer whatever its rules."""
    nodes, blobs, edges = {}, {}, []
    for i, layer in enumerate(_layers(net, phase, level, stages)):
        node = _quote(f"{layer.name}_{layer.type}")
        if node in nodes:     # e.g. a TRAIN and a TEST data layer of the same name
            node = _quote(f"{layer.name}_{layer.type}_{i}")
        nodes[node] = _layer_node(node, layer, rankdir, display_lrm)
        for bottom in layer.bottom:
            blobs.setdefault(bottom, _quote(bottom + "_blob"))
            edges.append(f"  {blobs[bottom]} -> {node};")
        label = edge_label(layer) if label_edges else ""
        for top in layer.top:
            blobs.setdefault(top, _quote(top + "_blob"))
            attrs = f" [label={_quote(label)}]" if label else ""
            edges.append(f"  {node} -> {blobs[top]}{attrs};")
    blob_nodes = [f"  {node_id} [label={_quote(name)}, {_BLOB_STYLE}];"
                  for name, node_id in blobs.items()]
    header = [f"digraph {_quote(net.name or 'Net')} {{", f"  rankdir={rankdir};"]
    return "\n".join(header + list(nodes.values()) + blob_nodes + edges + ["}"]) + "\n"


def render(dot_text: str, fmt: str) -> bytes:
    """Run Graphviz's `dot` to turn DOT text into an image of format `fmt`."""
    exe = shutil.which("dot")
    if exe is None:
        raise ProtonetError(f"drawing .{fmt} needs Graphviz's 'dot' program, which is not "
                            "on PATH; install graphviz (apt-get install graphviz, brew "
                            "install graphviz, conda install graphviz) or write .dot")
    done = subprocess.run([exe, f"-T{fmt}"], input=dot_text.encode("utf-8"),
                          capture_output=True, check=False)
    if done.returncode != 0:
        raise ProtonetError(f"dot -T{fmt} failed: "
                            f"{done.stderr.decode('utf-8', 'replace').strip()}")
    return done.stdout


def draw_net_to_file(net: caffe_pb2.NetParameter, path: str, rankdir: str = "LR",
                     phase: int | None = None, level: int = 0,
                     stages: Iterable[str] = (), display_lrm: bool = False) -> None:
    """Write `net`'s graph to `path`, as DOT text or an image chosen by extension."""
    fmt = os.path.splitext(path)[1][1:].lower()
    if fmt not in TEXT_FORMATS + IMAGE_FORMATS:
        raise ProtonetError(f"{path}: cannot tell the format from the extension; use one "
                            f"of ." + ", .".join(TEXT_FORMATS + IMAGE_FORMATS))
    text = to_dot(net, rankdir, phase, level, stages, display_lrm=display_lrm)
    atomic_write(path, text if fmt in TEXT_FORMATS else render(text, fmt))
