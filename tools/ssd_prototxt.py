"""What the tools/write_*_deploy.py scripts share: a layer's prototxt text, and SSD's
multibox heads (per-map loc/conf convolutions, PriorBox, the Concats, the confidence
softmax and DetectionOutput), which the SSD fork's deploy nets all end with."""
from __future__ import annotations

from typing import Callable

VARIANCE = "variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2"

layers: list[str] = []      # the net's layers after its Input, in order (one net a process)


def layer(name, kind, bottoms, tops, body=""):
    bottoms = [bottoms] if isinstance(bottoms, str) else bottoms
    tops = [tops] if isinstance(tops, str) else tops
    lines = [f'layer {{\n  name: "{name}"\n  type: "{kind}"']
    lines += [f'  bottom: "{b}"' for b in bottoms]
    lines += [f'  top: "{t}"' for t in tops]
    if body:
        lines.append("  " + body)
    layers.append("\n".join(lines) + "\n}")


def multibox_heads(heads, classes: int, head_conv: Callable[[str, str, int], object], *,
                   top_k: int, keep_top_k: int, confidence_threshold: float) -> None:
    """SSD's heads on each (source blob, name prefix, min size, max size or None, aspect
    ratios, step or None), flipped priors; `head_conv(name, bottom, num_output)` adds
    one head's loc or conf convolution."""
    for source, prefix, low, high, ratios, step in heads:
        priors = 1 + (1 if high else 0) + 2 * len(ratios)
        for kind, per_prior in (("loc", 4), ("conf", classes)):
            name = f"{prefix}_mbox_{kind}"
            head_conv(name, source, priors * per_prior)
            layer(name + "_perm", "Permute", name, name + "_perm",
                  "permute_param { order: 0 order: 2 order: 3 order: 1 }")
            layer(name + "_flat", "Flatten", name + "_perm", name + "_flat",
                  "flatten_param { axis: 1 }")
        sizes = f"min_size: {low}" + (f" max_size: {high}" if high else "")
        ar = " ".join(f"aspect_ratio: {r}" for r in ratios)
        stride = f" step: {step}" if step else ""
        layer(f"{prefix}_mbox_priorbox", "PriorBox", [source, "data"],
              f"{prefix}_mbox_priorbox",
              f"prior_box_param {{ {sizes} {ar} flip: true clip: false {VARIANCE}{stride} "
              "offset: 0.5 }")
    for kind, axis in (("loc", 1), ("conf", 1), ("priorbox", 2)):
        suffix = "" if kind == "priorbox" else "_flat"
        layer(f"mbox_{kind}", "Concat", [f"{h[1]}_mbox_{kind}{suffix}" for h in heads],
              f"mbox_{kind}", f"concat_param {{ axis: {axis} }}")
    layer("mbox_conf_reshape", "Reshape", "mbox_conf", "mbox_conf_reshape",
          f"reshape_param {{ shape {{ dim: 0 dim: -1 dim: {classes} }} }}")
    layer("mbox_conf_softmax", "Softmax", "mbox_conf_reshape", "mbox_conf_softmax",
          "softmax_param { axis: 2 }")
    layer("mbox_conf_flatten", "Flatten", "mbox_conf_softmax", "mbox_conf_flatten",
          "flatten_param { axis: 1 }")
    layer("detection_out", "DetectionOutput", ["mbox_loc", "mbox_conf_flatten", "mbox_priorbox"],
          "detection_out",
          f"detection_output_param {{ num_classes: {classes} share_location: true "
          f"background_label_id: 0 nms_param {{ nms_threshold: 0.45 top_k: {top_k} }} "
          f"code_type: CENTER_SIZE keep_top_k: {keep_top_k} "
          f"confidence_threshold: {confidence_threshold} }}")


def document(name: str, comment: str, size: int = 300) -> str:
    """The whole deploy prototxt: its name, a comment, a size x size BGR Input, layers."""
    head = (f'name: "{name}"\n# {comment}\n'
            'layer {\n  name: "data"\n  type: "Input"\n  top: "data"\n'
            f"  input_param {{ shape {{ dim: 1 dim: 3 dim: {size} dim: {size} }} }}\n}}")
    return "\n".join([head] + layers) + "\n"
