"""Regenerate the fork-layer golden fixtures in tests/data/forks/ with OpenCV 4's dnn.

OpenCV 4.x (`pip install "opencv-python-headless<5"` in a separate venv; never a
protonet dependency) runs the fork layers ROIPooling, PSROIPooling, ShuffleChannel
and ConvolutionDepthwise, and writes fp16 caffemodels (shrinkCaffeModel). Axpy's
reference is computed here from SENet's axpy_layer.cpp formula (top = a * X + Y),
because OpenCV 4's importer computes a * Y + X and fails for batches over 1. For
each case this writes <case>.prototxt, <case>.caffemodel (when it has weights) and
<case>.npz holding the inputs (by blob name) and OpenCV's outputs ("top:<blob>").
The tests read these files only; they never need cv2.

    python tools/make_fork_fixtures.py --cv-python /work/venv-cv4/bin/python
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from protonet.io.text import parse_text  # noqa: E402
from protonet.proto import caffe_pb2  # noqa: E402

OUT = ROOT / "tests" / "data" / "forks"


def _inputs(shapes: dict[str, tuple[int, ...]]) -> str:
    return "".join(f'input: "{name}"\ninput_shape {{ {" ".join(f"dim: {d}" for d in s)} }}\n'
                   for name, s in shapes.items())


def _rois(rng, n: int, batch: int, height: int, width: int, scale: float) -> np.ndarray:
    """n boxes (batch index, x1, y1, x2, y2) in image coordinates, some fractional,
    some reaching past the feature map."""
    rows = []
    for i in range(n):
        x1 = rng.uniform(-2, width / scale * 0.6)
        y1 = rng.uniform(-2, height / scale * 0.6)
        x2 = x1 + rng.uniform(1, width / scale * 0.8)
        y2 = y1 + rng.uniform(1, height / scale * 0.8)
        rows.append([i % batch, x1, y1, x2, y2])
    rows.append([0, 3.0, 2.0, 3.0, 2.0])     # a one-pixel box
    rows.append([batch - 1, 5.0, 3.0, 21.0, 9.0])   # * 0.5 lands on halves: C rounds up
    rows.append([0, 4.5, 2.5, 14.5, 10.5])          # halves before scaling (R-FCN rounds first)
    return np.round(np.array(rows, dtype=np.float32), 2)


def cases(rng) -> dict[str, tuple[str, dict[str, np.ndarray], dict[str, list[np.ndarray]]]]:
    """case -> (prototxt, inputs, {layer: [param arrays]})."""
    out = {}
    # ReLU-like data: many exact zeros, so bins hold ties.
    data = np.maximum(rng.standard_normal((2, 3, 12, 16)), 0).astype(np.float32)
    rois = _rois(rng, 5, 2, 12, 16, 0.5)
    out["roi_pooling"] = (_inputs({"data": data.shape, "rois": rois.shape}) + textwrap.dedent("""
        layer { name: "pool" type: "ROIPooling" bottom: "data" bottom: "rois" top: "pool"
                roi_pooling_param { pooled_h: 3 pooled_w: 4 spatial_scale: 0.5 } }
        """), {"data": data, "rois": rois}, {})

    group, dim = 3, 2
    ps = rng.standard_normal((2, dim * group * group, 10, 12)).astype(np.float32)
    psrois = _rois(rng, 5, 2, 10, 12, 0.5)
    out["psroi_pooling"] = (_inputs({"data": ps.shape, "rois": psrois.shape}) + textwrap.dedent(f"""
        layer {{ name: "pool" type: "PSROIPooling" bottom: "data" bottom: "rois" top: "pool"
                psroi_pooling_param {{ spatial_scale: 0.5 output_dim: {dim} group_size: {group} }} }}
        """), {"data": ps, "rois": psrois}, {})

    x = rng.standard_normal((2, 12, 3, 4)).astype(np.float32)
    out["shuffle_channel"] = (_inputs({"data": x.shape}) + textwrap.dedent("""
        layer { name: "s3" type: "ShuffleChannel" bottom: "data" top: "s3"
                shuffle_channel_param { group: 3 } }
        layer { name: "s4" type: "ShuffleChannel" bottom: "s3" top: "s4"
                shuffle_channel_param { group: 4 } }
        """), {"data": x}, {})

    a = rng.standard_normal((2, 5, 1, 1)).astype(np.float32)
    xa = rng.standard_normal((2, 5, 3, 4)).astype(np.float32)
    ya = rng.standard_normal((2, 5, 3, 4)).astype(np.float32)
    out["axpy"] = (_inputs({"scale": a.shape, "x": xa.shape, "y": ya.shape}) + textwrap.dedent("""
        layer { name: "out" type: "Axpy" bottom: "scale" bottom: "x" bottom: "y" top: "out" }
        """), {"scale": a, "x": xa, "y": ya}, {})

    d = rng.standard_normal((2, 4, 9, 8)).astype(np.float32)
    out["conv_depthwise"] = (_inputs({"data": d.shape}) + textwrap.dedent("""
        layer { name: "dw" type: "ConvolutionDepthwise" bottom: "data" top: "dw"
                convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 } }
        layer { name: "dw2" type: "ConvolutionDepthwise" bottom: "dw" top: "dw2"
                convolution_param { num_output: 4 kernel_h: 3 kernel_w: 2 pad_h: 1 pad_w: 0
                                    bias_term: false dilation: 2 } }
        """), {"data": d}, {"dw": [rng.standard_normal((4, 1, 3, 3)),
                                   rng.standard_normal((4,))],
                            "dw2": [rng.standard_normal((4, 1, 3, 2))]})

    t = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    out["tiny_fp16"] = (_inputs({"data": t.shape}) + textwrap.dedent("""
        layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
                convolution_param { num_output: 4 kernel_size: 3 } }
        layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
        layer { name: "scale" type: "Scale" bottom: "conv" top: "conv"
                scale_param { bias_term: true } }
        layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc"
                inner_product_param { num_output: 5 } }
        """), {"data": t}, {"conv": [rng.standard_normal((4, 3, 3, 3)) * 0.3,
                                     rng.standard_normal((4,))],
                            "scale": [rng.uniform(0.5, 1.5, (4,)), rng.standard_normal((4,))],
                            "fc": [rng.standard_normal((5, 64)) * 0.1,
                                   rng.standard_normal((5,))]})
    return out


def write_caffemodel(path: Path, prototxt: str, params: dict[str, list[np.ndarray]]) -> None:
    net = parse_text(prototxt, caffe_pb2.NetParameter())
    model = caffe_pb2.NetParameter(name=net.name)
    for layer in net.layer:
        copy = model.layer.add()
        copy.CopyFrom(layer)
        for array in params.get(layer.name, []):
            blob = copy.blobs.add()
            blob.shape.dim.extend(array.shape)
            blob.data.extend(np.asarray(array, np.float32).ravel().tolist())
    path.write_bytes(model.SerializeToString())


CV_SCRIPT = """
import sys, numpy as np, cv2
proto, model, npz, shrink_to = sys.argv[1:5]
if shrink_to != "-":
    cv2.dnn.shrinkCaffeModel(model, shrink_to)
    model = shrink_to
net = cv2.dnn.readNetFromCaffe(proto, model) if model != "-" else cv2.dnn.readNetFromCaffe(proto)
net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
inputs = dict(np.load(npz))
for name, value in inputs.items():
    net.setInput(value, name)
names = [n for n in net.getUnconnectedOutLayersNames()]
outs = net.forward(names)
np.savez(npz, **inputs, **{"top:" + n: o for n, o in zip(names, outs)})
print(proto, [(n, o.shape) for n, o in zip(names, outs)])
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cv-python", default="/work/venv-cv4/bin/python",
                        help="a Python with opencv-python-headless<5")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(14)
    for name, (prototxt, inputs, params) in cases(rng).items():
        proto = OUT / f"{name}.prototxt"
        proto.write_text(f'name: "{name}"\n' + prototxt)
        npz = OUT / f"{name}.npz"
        np.savez(npz, **inputs)
        if name == "axpy":      # SENet's formula; see the docstring
            scale = inputs["scale"].reshape(inputs["scale"].shape[:2] + (1, 1))
            np.savez(npz, **inputs, **{"top:out": scale * inputs["x"] + inputs["y"]})
            continue
        model, shrink = "-", "-"
        if params:
            stem = "tiny_fp32" if name == "tiny_fp16" else name
            model = str(OUT / f"{stem}.caffemodel")
            write_caffemodel(Path(model), prototxt, params)
            if name == "tiny_fp16":
                shrink = str(OUT / "tiny_fp16.caffemodel")
        subprocess.run([args.cv_python, "-c", CV_SCRIPT, str(proto), model, str(npz), shrink],
                       check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
