"""Write protonet/model_zoo/mobilenet_ssd/deploy.prototxt: chuanqi305's MobileNet-SSD
(MobileNet v1 at 300x300 with SSD heads on six feature maps, 20 VOC classes plus
background), described layer by layer with the layer names its caffemodel's blobs carry
(BatchNorm + Scale after every convolution, as in the published training weights).

    python3 tools/write_mobilenet_ssd_deploy.py
"""
from __future__ import annotations

from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "protonet" / "model_zoo" / "mobilenet_ssd" \
    / "deploy.prototxt"
CLASSES = 21
VARIANCE = "variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2"

layers: list[str] = []


def layer(name, kind, bottoms, tops, body=""):
    bottoms = [bottoms] if isinstance(bottoms, str) else bottoms
    tops = [tops] if isinstance(tops, str) else tops
    lines = [f'layer {{\n  name: "{name}"\n  type: "{kind}"']
    lines += [f'  bottom: "{b}"' for b in bottoms]
    lines += [f'  top: "{t}"' for t in tops]
    if body:
        lines.append("  " + body)
    layers.append("\n".join(lines) + "\n}")


def conv_bn(name, bottom, out, kernel, stride=1, group=1):
    """Convolution without bias, then BatchNorm, Scale and ReLU in place."""
    pad = kernel // 2
    extra = f" group: {group}" if group > 1 else ""
    layer(name, "Convolution", bottom, name,
          f"convolution_param {{ num_output: {out} bias_term: false kernel_size: {kernel} "
          f"stride: {stride} pad: {pad}{extra} }}")
    layer(f"{name}/bn", "BatchNorm", name, name)
    layer(f"{name}/scale", "Scale", name, name, "scale_param { bias_term: true }")
    layer(f"{name}/relu", "ReLU", name, name)
    return name


def build() -> str:
    x = conv_bn("conv0", "data", 32, 3, 2)
    # (output channels, depthwise stride) of MobileNet v1's 13 separable blocks
    blocks = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1),
              (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]
    channels = 32
    for n, (out, stride) in enumerate(blocks, 1):
        x = conv_bn(f"conv{n}/dw", x, channels, 3, stride, group=channels)
        x = conv_bn(f"conv{n}", x, out, 1)
        channels = out
    for n, (mid, out) in zip(range(14, 18), [(256, 512), (128, 256), (128, 256), (64, 128)]):
        x = conv_bn(f"conv{n}_1", x, mid, 1)
        x = conv_bn(f"conv{n}_2", x, out, 3, 2)
    # source, min size, max size, aspect ratios
    heads = [("conv11", 60, None, [2]), ("conv13", 105, 150, [2, 3]),
             ("conv14_2", 150, 195, [2, 3]), ("conv15_2", 195, 240, [2, 3]),
             ("conv16_2", 240, 285, [2, 3]), ("conv17_2", 285, 300, [2, 3])]
    for source, low, high, ratios in heads:
        priors = 1 + (1 if high else 0) + 2 * len(ratios)
        for kind, per_prior in (("loc", 4), ("conf", CLASSES)):
            name = f"{source}_mbox_{kind}"
            layer(name, "Convolution", source, name,
                  f"convolution_param {{ num_output: {priors * per_prior} kernel_size: 1 }}")
            layer(name + "_perm", "Permute", name, name + "_perm",
                  "permute_param { order: 0 order: 2 order: 3 order: 1 }")
            layer(name + "_flat", "Flatten", name + "_perm", name + "_flat",
                  "flatten_param { axis: 1 }")
        sizes = f"min_size: {low}" + (f" max_size: {high}" if high else "")
        ar = " ".join(f"aspect_ratio: {r}" for r in ratios)
        layer(f"{source}_mbox_priorbox", "PriorBox", [source, "data"],
              f"{source}_mbox_priorbox",
              f"prior_box_param {{ {sizes} {ar} flip: true clip: false {VARIANCE} "
              f"offset: 0.5 }}")
    for kind, axis in (("loc", 1), ("conf", 1), ("priorbox", 2)):
        suffix = "" if kind == "priorbox" else "_flat"
        layer(f"mbox_{kind}", "Concat", [f"{h[0]}_mbox_{kind}{suffix}" for h in heads],
              f"mbox_{kind}", f"concat_param {{ axis: {axis} }}")
    layer("mbox_conf_reshape", "Reshape", "mbox_conf", "mbox_conf_reshape",
          f"reshape_param {{ shape {{ dim: 0 dim: -1 dim: {CLASSES} }} }}")
    layer("mbox_conf_softmax", "Softmax", "mbox_conf_reshape", "mbox_conf_softmax",
          "softmax_param { axis: 2 }")
    layer("mbox_conf_flatten", "Flatten", "mbox_conf_softmax", "mbox_conf_flatten",
          "flatten_param { axis: 1 }")
    layer("detection_out", "DetectionOutput", ["mbox_loc", "mbox_conf_flatten", "mbox_priorbox"],
          "detection_out",
          f"detection_output_param {{ num_classes: {CLASSES} share_location: true "
          "background_label_id: 0 nms_param { nms_threshold: 0.45 top_k: 100 } "
          "code_type: CENTER_SIZE keep_top_k: 100 confidence_threshold: 0.25 }")
    head = ('name: "MobileNet-SSD"\n'
            "# chuanqi305's MobileNet-SSD: written by protonet's "
            "tools/write_mobilenet_ssd_deploy.py\n"
            'layer {\n  name: "data"\n  type: "Input"\n  top: "data"\n'
            "  input_param { shape { dim: 1 dim: 3 dim: 300 dim: 300 } }\n}")
    return "\n".join([head] + layers) + "\n"


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(build())
    print(f"wrote {OUT} ({len(layers)} layers)")
