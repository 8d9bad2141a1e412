"""Write protonet/model_zoo/mobilenet_ssd/deploy.prototxt: chuanqi305's MobileNet-SSD
(MobileNet v1 at 300x300 with SSD heads on six feature maps, 20 VOC classes plus
background), described layer by layer with the layer names its caffemodel's blobs carry
(BatchNorm + Scale after every convolution, as in the published training weights).

    python3 tools/write_mobilenet_ssd_deploy.py
"""
from __future__ import annotations

from pathlib import Path

from ssd_prototxt import document, layer, layers, multibox_heads

OUT = Path(__file__).resolve().parents[1] / "protonet" / "model_zoo" / "mobilenet_ssd" \
    / "deploy.prototxt"
CLASSES = 21


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
    # source, name prefix, min size, max size, aspect ratios, step
    heads = [("conv11", "conv11", 60, None, [2], None),
             ("conv13", "conv13", 105, 150, [2, 3], None),
             ("conv14_2", "conv14_2", 150, 195, [2, 3], None),
             ("conv15_2", "conv15_2", 195, 240, [2, 3], None),
             ("conv16_2", "conv16_2", 240, 285, [2, 3], None),
             ("conv17_2", "conv17_2", 285, 300, [2, 3], None)]
    multibox_heads(heads, CLASSES, lambda name, bottom, out: layer(
        name, "Convolution", bottom, name,
        f"convolution_param {{ num_output: {out} kernel_size: 1 }}"),
        top_k=100, keep_top_k=100, confidence_threshold=0.25)
    return document("MobileNet-SSD", "chuanqi305's MobileNet-SSD: written by protonet's "
                    "tools/write_mobilenet_ssd_deploy.py")


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(build())
    print(f"wrote {OUT} ({len(layers)} layers)")
