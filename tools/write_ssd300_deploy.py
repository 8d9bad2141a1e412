"""Write protonet/model_zoo/ssd300_vgg16_voc0712/deploy.prototxt: Wei Liu's SSD300 on
PASCAL VOC (VGG16 with the reduced, dilated fc6/fc7 as convolutions, four extra feature
layers, heads on six maps), described layer by layer with the layer names the SSD fork's
examples/ssd/ssd_pascal.py gives them (the names its caffemodels' blobs carry).

    python3 tools/write_ssd300_deploy.py
"""
from __future__ import annotations

from pathlib import Path

from ssd_prototxt import document, layer, layers, multibox_heads

OUT = Path(__file__).resolve().parents[1] / "protonet" / "model_zoo" \
    / "ssd300_vgg16_voc0712" / "deploy.prototxt"
CLASSES = 21


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
    # source, name prefix, min size, max size, aspect ratios, step
    # (examples/ssd/ssd_pascal.py)
    heads = [("conv4_3_norm", "conv4_3_norm", 30, 60, [2], 8),
             ("fc7", "fc7", 60, 111, [2, 3], 16),
             ("conv6_2", "conv6_2", 111, 162, [2, 3], 32),
             ("conv7_2", "conv7_2", 162, 213, [2, 3], 64),
             ("conv8_2", "conv8_2", 213, 264, [2], 100),
             ("conv9_2", "conv9_2", 264, 315, [2], 300)]
    multibox_heads(heads, CLASSES, lambda name, bottom, out: conv(name, bottom, out, 3, 1, 1),
                   top_k=400, keep_top_k=200, confidence_threshold=0.01)
    return document("VGG_VOC0712_SSD_300x300_deploy", "Wei Liu's SSD300 (VOC0712): written "
                    "by protonet's tools/write_ssd300_deploy.py")


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(build())
    print(f"wrote {OUT} ({len(layers)} layers)")
