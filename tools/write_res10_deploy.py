"""Write protonet/model_zoo/res10_ssd_face/deploy.prototxt: OpenCV's res10 SSD face
detector (a ResNet-10-like trunk at 300x300 with SSD heads on six feature maps)
described layer by layer, with the layer names its caffemodel's blobs carry.

    python3 tools/write_res10_deploy.py
"""
from __future__ import annotations

from pathlib import Path

from ssd_prototxt import document, layer, layers, multibox_heads

OUT = Path(__file__).resolve().parents[1] / "protonet" / "model_zoo" / "res10_ssd_face" \
    / "deploy.prototxt"


def conv(name, bottom, top, out, kernel, stride=1, pad=0, bias=True, dilation=1):
    extra = "" if bias else " bias_term: false"
    extra += f" dilation: {dilation}" if dilation != 1 else ""
    layer(name, "Convolution", bottom, top,
          f"convolution_param {{ num_output: {out} kernel_size: {kernel} stride: {stride} "
          f"pad: {pad}{extra} }}")


def bn_scale_relu(bn, scale, relu, bottom, top, relu_top=None):
    layer(bn, "BatchNorm", bottom, top)
    layer(scale, "Scale", top, top, "scale_param { bias_term: true }")
    if relu:
        layer(relu, "ReLU", top, relu_top or top)


def residual(stage, bottom, out, stride, names, pre_bn, dilation=1):
    """A pre-activation block: BN-Scale-ReLU, two 3x3 convolutions, a 1x1 shortcut
    (or the identity when the first block keeps its input)."""
    p = f"layer_{stage}_1_"
    if pre_bn:
        bn1 = p + "bn1" + names.get("bn1", "")
        bn_scale_relu(bn1, p + "scale1" + names.get("bn1", ""), p + "relu1", bottom, bn1)
        trunk = bn1
    else:
        trunk = bottom
    c1 = p + "conv1" + names.get("conv1", "")
    conv(c1, trunk, c1, names.get("mid", out), 3, stride, 1, bias=False)
    bn_scale_relu(p + "bn2" + names.get("bn2", ""), p + "scale2" + names.get("bn2", ""),
                  p + "relu2", c1, c1)
    c2 = p + "conv2" + names.get("conv2", "")
    conv(c2, c1, c2, out, 3, 1, dilation, bias=False, dilation=dilation)
    if pre_bn:
        shortcut = p + "conv_expand" + names.get("expand", "")
        conv(shortcut, trunk, shortcut, out, 1, names.get("expand_stride", stride), 0,
             bias=False)
    else:
        shortcut = bottom
    layer(p + "sum", "Eltwise", [c2, shortcut], p + "sum")
    return p + "sum"


def build() -> str:
    layer("data_bn", "BatchNorm", "data", "data_bn")
    layer("data_scale", "Scale", "data_bn", "data_bn", "scale_param { bias_term: true }")
    conv("conv1_h", "data_bn", "conv1_h", 32, 7, 2, 3)
    bn_scale_relu("conv1_bn_h", "conv1_scale_h", "conv1_relu", "conv1_h", "conv1_h")
    layer("conv1_pool", "Pooling", "conv1_h", "conv1_pool",
          "pooling_param { pool: MAX kernel_size: 3 stride: 2 }")
    x = residual(64, "conv1_pool", 32, 1, {"conv1": "_h", "bn2": "_h", "conv2": "_h"},
                 pre_bn=False)
    x = residual(128, x, 128, 2, {"bn1": "_h", "conv1": "_h", "expand": "_h"}, pre_bn=True)
    x = residual(256, x, 256, 2, {}, pre_bn=True)
    x = residual(512, x, 256, 1, {"conv1": "_h", "bn2": "_h", "conv2": "_h", "expand": "_h",
                                  "mid": 128}, pre_bn=True, dilation=2)
    bn_scale_relu("last_bn_h", "last_scale_h", "last_relu", x, x, relu_top="fc7")
    trunk = "fc7"
    for n, (mid, out, stride) in zip(range(6, 10), [(128, 256, 2), (64, 128, 2),
                                                     (64, 128, 1), (64, 128, 1)]):
        conv(f"conv{n}_1_h", trunk, f"conv{n}_1_h", mid, 1)
        layer(f"conv{n}_1_relu", "ReLU", f"conv{n}_1_h", f"conv{n}_1_h")
        conv(f"conv{n}_2_h", f"conv{n}_1_h", f"conv{n}_2_h", out, 3, stride, 1)
        layer(f"conv{n}_2_relu", "ReLU", f"conv{n}_2_h", f"conv{n}_2_h")
        trunk = f"conv{n}_2_h"
    layer("conv4_3_norm", "Normalize", "layer_256_1_bn1", "conv4_3_norm",
          "norm_param { across_spatial: false channel_shared: false }")
    # source, name prefix, min size, max size, aspect ratios, step
    heads = [("conv4_3_norm", "conv4_3_norm", 30, 60, [2], 8),
             ("fc7", "fc7", 60, 111, [2, 3], 16),
             ("conv6_2_h", "conv6_2", 111, 162, [2, 3], 32),
             ("conv7_2_h", "conv7_2", 162, 213, [2, 3], 64),
             ("conv8_2_h", "conv8_2", 213, 264, [2], 100),
             ("conv9_2_h", "conv9_2", 264, 315, [2], 300)]
    multibox_heads(heads, 2, lambda name, bottom, out: conv(name, bottom, name, out, 3, 1, 1),
                   top_k=400, keep_top_k=200, confidence_threshold=0.01)
    return document("res10_300x300_ssd", "OpenCV's face detector: written by protonet's "
                    "tools/write_res10_deploy.py")


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(build())
    print(f"wrote {OUT} ({len(layers)} layers)")
