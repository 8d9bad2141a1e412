"""Write protonet/model_zoo/ssd300_vgg16_voc0712/deploy.prototxt: Wei Liu's SSD300 on
PASCAL VOC (VGG16 with the reduced, dilated fc6/fc7 as convolutions, four extra feature
layers, heads on six maps), described layer by layer with the layer names the SSD fork's
examples/ssd/ssd_pascal.py gives them (the names its caffemodels' blobs carry).

    python3 tools/write_ssd300_deploy.py
"""
from __future__ import annotations

from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "protonet" / "model_zoo" \
    / "ssd300_vgg16_voc0712" / "deploy.prototxt"
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


def conv(name, bottom, out, kernel, stride=1, pad=0, dilation=1, relu=None):
    extra = f" dilation: {dilation}" if dilation > 1 else ""
    layer(name, "Convolution", bottom, name,
          f"convolution_param {{ num_output: {out} kernel_size: {kernel} stride: {stride} "
          f"pad: {pad}{extra} }}")
    if relu:
        layer(relu, "ReLU", name, name)
    return name


def pool(name, bottom, kernel, stride, pad=0):
    layer(name, "Pooling", bottom, name,
          f"pooling_param {{ pool: MAX kernel_size: {kernel} stride: {stride} pad: {pad} }}")
    return name


def build() -> str:
    x = "data"
    for stage, (count, width) in enumerate([(2, 64), (2, 128), (3, 256), (3, 512),
                                            (3, 512)], 1):
        for i in range(1, count + 1):
            x = conv(f"conv{stage}_{i}", x, width, 3, 1, 1, relu=f"relu{stage}_{i}")
        x = pool(f"pool{stage}", x, 2, 2) if stage < 5 else pool("pool5", x, 3, 1, 1)
    x = conv("fc6", x, 1024, 3, 1, 6, dilation=6, relu="relu6")
    x = conv("fc7", x, 1024, 1, relu="relu7")
    for n, (mid, out, stride, pad) in zip(range(6, 10), [(256, 512, 2, 1), (128, 256, 2, 1),
                                                          (128, 256, 1, 0), (128, 256, 1, 0)]):
        x = conv(f"conv{n}_1", x, mid, 1, relu=f"conv{n}_1_relu")
        x = conv(f"conv{n}_2", x, out, 3, stride, pad, relu=f"conv{n}_2_relu")
    layer("conv4_3_norm", "Normalize", "conv4_3", "conv4_3_norm",
          "norm_param { across_spatial: false scale_filler { type: \"constant\" value: 20 } "
          "channel_shared: false }")
    # source, min size, max size, aspect ratios, step (examples/ssd/ssd_pascal.py)
    heads = [("conv4_3_norm", 30, 60, [2], 8), ("fc7", 60, 111, [2, 3], 16),
             ("conv6_2", 111, 162, [2, 3], 32), ("conv7_2", 162, 213, [2, 3], 64),
             ("conv8_2", 213, 264, [2], 100), ("conv9_2", 264, 315, [2], 300)]
    for source, low, high, ratios, step in heads:
        priors = 2 + 2 * len(ratios)
        for kind, per_prior in (("loc", 4), ("conf", CLASSES)):
            name = f"{source}_mbox_{kind}"
            conv(name, source, priors * per_prior, 3, 1, 1)
            layer(name + "_perm", "Permute", name, name + "_perm",
                  "permute_param { order: 0 order: 2 order: 3 order: 1 }")
            layer(name + "_flat", "Flatten", name + "_perm", name + "_flat",
                  "flatten_param { axis: 1 }")
        ar = " ".join(f"aspect_ratio: {r}" for r in ratios)
        layer(f"{source}_mbox_priorbox", "PriorBox", [source, "data"],
              f"{source}_mbox_priorbox",
              f"prior_box_param {{ min_size: {low} max_size: {high} {ar} flip: true "
              f"clip: false {VARIANCE} step: {step} offset: 0.5 }}")
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
          "background_label_id: 0 nms_param { nms_threshold: 0.45 top_k: 400 } "
          "code_type: CENTER_SIZE keep_top_k: 200 confidence_threshold: 0.01 }")
    head = ('name: "VGG_VOC0712_SSD_300x300_deploy"\n'
            "# Wei Liu's SSD300 (VOC0712): written by protonet's tools/write_ssd300_deploy.py\n"
            'layer {\n  name: "data"\n  type: "Input"\n  top: "data"\n'
            "  input_param { shape { dim: 1 dim: 3 dim: 300 dim: 300 } }\n}")
    return "\n".join([head] + layers) + "\n"


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(build())
    print(f"wrote {OUT} ({len(layers)} layers)")
