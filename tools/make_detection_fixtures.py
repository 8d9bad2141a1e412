"""Regenerate tests/data/forks/detection_*: SSD layers' outputs from OpenCV 4's dnn.

OpenCV 4.x (the last with a Caffe importer) implements PriorBox, DetectionOutput,
Permute and Normalize as SSD's fork does; this script builds small nets of them with
random inputs and weights, runs them through cv2.dnn.readNetFromCaffe and saves the
prototxt, a caffemodel (Normalize's scales) and an .npz of inputs and outputs. The
tests read only those files, so cv2 4 is needed here, never at test time:

    /path/to/venv-with-opencv-python-headless<5/bin/python tools/make_detection_fixtures.py
"""
from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "forks"


@functools.lru_cache(maxsize=None)
def caffe_pb2():
    """protonet's generated caffe_pb2, without importing protonet (and torch)."""
    spec = importlib.util.spec_from_file_location(
        "caffe_pb2", ROOT / "protonet" / "proto" / "caffe_pb2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def inputs(shapes: dict) -> str:
    return "".join(f'input: "{name}"\ninput_shape {{ {" ".join(f"dim: {d}" for d in shape)} }}\n'
                   for name, shape in shapes.items())


def caffemodel(name: str, blobs: dict, opencv: bool) -> bytes:
    pb = caffe_pb2()
    net = pb.NetParameter(name=name)
    for layer_name, (layer_type, arrays) in blobs.items():
        layer = net.layer.add(name=layer_name, type=layer_type)
        for array in arrays:
            blob = layer.blobs.add()
            blob.shape.dim.extend(array.shape if array.ndim or not opencv else (1,))
            blob.data.extend(array.astype(np.float32).reshape(-1).tolist())
    return net.SerializeToString()


def run(name: str, text: str, feeds: dict, outputs: list[str], blobs: dict | None = None):
    """Write NAME.prototxt (+ NAME.caffemodel), run OpenCV, save NAME.npz."""
    OUT.mkdir(parents=True, exist_ok=True)
    prototxt = OUT / f"{name}.prototxt"
    prototxt.write_text(text)
    if blobs:
        # The fork's own shapes go in the committed caffemodel (a channel-shared scale
        # is a 0-axis blob); OpenCV cannot make 0-axis blobs, so it reads them as [1].
        (OUT / f"{name}.caffemodel").write_bytes(caffemodel(name, blobs, opencv=False))
        opencv_model = OUT / f"{name}.opencv.caffemodel"
        opencv_model.write_bytes(caffemodel(name, blobs, opencv=True))
        cv_net = cv2.dnn.readNetFromCaffe(str(prototxt), str(opencv_model))
        opencv_model.unlink()
    else:
        cv_net = cv2.dnn.readNetFromCaffe(str(prototxt))
    cv_net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    for key, value in feeds.items():
        cv_net.setInput(value, key)
    results = cv_net.forward(outputs)
    saved = {f"in_{k}": v for k, v in feeds.items()}
    saved.update({f"out_{k}": np.asarray(v) for k, v in zip(outputs, results)})
    np.savez_compressed(OUT / f"{name}.npz", **saved)
    print(name, {k: v.shape for k, v in saved.items()})


def prior_boxes(rng):
    text = inputs({"data": [1, 3, 300, 240], "feature": [1, 8, 10, 8]})
    configs = {
        "pb_flip_clip": "min_size: 30 max_size: 60 aspect_ratio: 2 aspect_ratio: 3 "
                        "flip: true clip: true variance: 0.1 variance: 0.1 variance: 0.2 "
                        "variance: 0.2",
        "pb_two_sizes": "min_size: 10 min_size: 25 max_size: 20 max_size: 50 "
                        "aspect_ratio: 2 flip: false variance: 0.1 step: 32 offset: 0.5 "
                        "clip: false",
        "pb_steps": "min_size: 40 aspect_ratio: 0.5 aspect_ratio: 2 flip: true "
                       "step_h: 30 step_w: 28 offset: 0.25 clip: false "
                       "variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2",
        "pb_single": "min_size: 64 variance: 0.2 clip: false",   # OpenCV clips by default
    }
    for name, param in configs.items():
        text += (f'layer {{ name: "{name}" type: "PriorBox" bottom: "feature" '
                 f'bottom: "data" top: "{name}" prior_box_param {{ {param} }} }}\n')
    feeds = {"data": np.zeros((1, 3, 300, 240), np.float32),   # only shapes matter
             "feature": np.zeros((1, 8, 10, 8), np.float32)}
    run("detection_priorbox", text, feeds, list(configs))


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def detection_output(rng, name: str, detection: str, classes: int = 4, share=True,
                     prior: str = "min_size: 30 max_size: 60 aspect_ratio: 2 flip: true "
                                  "variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 "
                                  "clip: false",
                     loc_scale: float = 1.0, batch: int = 2, sharpness: float = 3.0):
    h, w = 6, 5
    if "background_label_id" not in detection:
        detection += " background_label_id: 0"      # OpenCV insists on these fields
    if "keep_top_k" not in detection:
        detection += " keep_top_k: 1000"      # (-1 crashes OpenCV)
    priors = h * w * 4
    loc_classes = 1 if share else classes
    text = inputs({"data": [batch, 3, 120, 100], "feature": [batch, 8, h, w],
                   "loc": [batch, priors * loc_classes * 4], "conf": [batch, priors * classes]})
    text += (f'layer {{ name: "priors" type: "PriorBox" bottom: "feature" bottom: "data" '
             f'top: "priors" prior_box_param {{ {prior} }} }}\n')
    text += (f'layer {{ name: "detection_out" type: "DetectionOutput" bottom: "loc" '
             f'bottom: "conf" bottom: "priors" top: "detection_out" '
             f'detection_output_param {{ num_classes: {classes} '
             f'share_location: {"true" if share else "false"} {detection} }} }}\n')
    logits = rng.standard_normal((batch, priors, classes)) * sharpness
    feeds = {
        "data": np.zeros((batch, 3, 120, 100), np.float32),
        "feature": np.zeros((batch, 8, h, w), np.float32),
        "loc": (rng.standard_normal((batch, priors * loc_classes * 4)) * loc_scale
                ).astype(np.float32),
        "conf": softmax(logits).reshape(batch, -1).astype(np.float32),
    }
    run(name, text, feeds, ["detection_out"])


def permute_normalize(rng):
    shape = [2, 6, 4, 5]
    text = inputs({"data": shape})
    text += ('layer { name: "perm_nhwc" type: "Permute" bottom: "data" top: "perm_nhwc" '
             'permute_param { order: 0 order: 2 order: 3 order: 1 } }\n'
             'layer { name: "perm_partial" type: "Permute" bottom: "data" top: "perm_partial" '
             'permute_param { order: 0 order: 3 order: 2 order: 1 } }\n'
             'layer { name: "norm_channels" type: "Normalize" bottom: "data" '
             'top: "norm_channels" norm_param { across_spatial: false channel_shared: false '
             'eps: 1e-10 } }\n'
             'layer { name: "norm_spatial" type: "Normalize" bottom: "data" '
             'top: "norm_spatial" norm_param { across_spatial: true channel_shared: true } }\n'
             'layer { name: "norm_shared" type: "Normalize" bottom: "data" top: "norm_shared" '
             'norm_param { across_spatial: false channel_shared: true eps: 0.01 } }\n')
    blobs = {
        "norm_channels": ("Normalize", [rng.uniform(0.5, 20, 6).astype(np.float32)]),
        "norm_spatial": ("Normalize", [np.array(3.5, np.float32)]),   # the fork's 0-axis blob
        "norm_shared": ("Normalize", [np.array(1.5, np.float32)]),
    }
    feeds = {"data": rng.standard_normal(shape).astype(np.float32)}
    run("detection_permute_normalize", text, feeds,
        ["perm_nhwc", "perm_partial", "norm_channels", "norm_spatial",
         "norm_shared"], blobs)


def main() -> int:
    print("OpenCV", cv2.__version__)
    if int(cv2.__version__.split(".")[0]) != 4:
        print("needs OpenCV 4 (5 has no Caffe importer)", file=sys.stderr)
        return 1
    rng = np.random.default_rng(14)
    prior_boxes(rng)
    permute_normalize(rng)
    detection_output(rng, "detection_center_size",
                     "nms_param { nms_threshold: 0.45 top_k: 50 } code_type: CENTER_SIZE "
                     "keep_top_k: 30 confidence_threshold: 0.2", loc_scale=0.5)
    detection_output(rng, "detection_corner",
                     "nms_param { nms_threshold: 0.3 } code_type: CORNER "
                     "confidence_threshold: 0.5", loc_scale=0.05)
    detection_output(rng, "detection_unshared",
                     "nms_param { nms_threshold: 0.5 top_k: 20 } code_type: CENTER_SIZE "
                     "keep_top_k: 25 confidence_threshold: 0.3", share=False, loc_scale=0.2)
    # (OpenCV's DetectionOutput ignores nms_param.eta: tests check eta by hand.)
    detection_output(rng, "detection_three_classes",
                     "nms_param { nms_threshold: 0.7 top_k: 100 } "
                     "code_type: CENTER_SIZE confidence_threshold: 0.1 keep_top_k: 40",
                     loc_scale=0.3, classes=3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
