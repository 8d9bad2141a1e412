"""Object detection with SSD-style nets: boxes, labels and scores from a DetectionOutput.

An image is decoded by OpenCV (BGR, 8 bits), resized to the entry's image size (else
the net's input), and becomes (pixel - mean) * scale, as `protonet classify` prepares
images and as OpenCV's SSD samples do (the whole image, no crop). The net's output is
SSD's [1, 1, N, 7] table of [image, label, score, xmin, ymin, xmax, ymax] rows with
coordinates relative to the image; a row whose label is -1 is DetectionOutput's "none
found" marker. Boxes are scaled to the image's pixels (not clipped: SSD's decoded boxes
may reach past the border; drawing clips them).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Sequence

import cv2
import numpy as np
import torch

from . import zoo
from .classify import input_size, load_image, preprocess, read_labels  # noqa: F401
from .errors import ProtonetError
from .pycaffe import TEST, Net

BATCH = 8               # images per forward pass
DEFAULT_THRESHOLD = 0.5


@dataclass
class Model:
    """What detection needs: the deploy net, its weights, preprocessing and labels."""
    deploy: str
    weights: str
    preprocess: zoo.Preprocess
    labels: list[str] | None = None
    output: str | None = None
    threshold: float = DEFAULT_THRESHOLD


@dataclass
class Detection:
    """One box: its label (and name), score, and corners in pixels and relative."""
    label: int
    score: float
    box: list[float]                    # xmin, ymin, xmax, ymax in pixels
    relative: list[float]               # the same, as fractions of width and height
    name: str | None = None


@dataclass
class ImageDetections:
    path: str
    width: int
    height: int
    detections: list[Detection] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def zoo_model(name: str, weights: str | None = None, cache=None) -> Model:
    """A detection zoo entry as a Model; its weights are downloaded (and verified) when
    needed."""
    entry = zoo.load_entry(name)
    if entry.task != "detection":
        raise ProtonetError(f"zoo model '{name}' is a {entry.task} model, not a detector"
                            + ("; use `protonet classify`" if entry.task == "classification"
                               else ""))
    path = zoo.resolve_weights(weights, cache) if weights else \
        str(zoo.ensure_weights(entry, cache))
    labels = entry.labels
    labels_file = entry.folder / str(entry.meta.get("labels_file", ""))
    if labels is None and entry.meta.get("labels_file") and labels_file.is_file():
        labels = read_labels(str(labels_file))
    return Model(str(entry.deploy), path, entry.preprocess, labels,
                 entry.meta.get("output"),
                 float(entry.meta.get("threshold", DEFAULT_THRESHOLD)))


def detect(model: Model, images: Sequence[str], threshold: float | None = None,
           device: str | torch.device = "cpu") -> list[ImageDetections]:
    """The detections scoring at least `threshold` (default: the model's) in each image,
    image by image in the order given, each image's in the net's order."""
    threshold = model.threshold if threshold is None else threshold
    net = Net(model.deploy, model.weights, TEST, device=device)
    if len(net.inputs) != 1:
        raise ProtonetError(f"{model.deploy}: detection needs a net with one input, this "
                            f"one has {net.inputs}")
    output = model.output or net.outputs[-1]
    if output not in net.blobs:
        raise ProtonetError(f"{model.deploy}: no output blob '{output}'")
    size = input_size(net, model.preprocess)
    results = []
    for start in range(0, len(images), BATCH):
        paths = images[start:start + BATCH]
        pictures = [load_image(p) for p in paths]
        batch = np.stack([preprocess(p, model.preprocess, size) for p in pictures])
        net.blobs[net.inputs[0]].reshape(*batch.shape)
        net.reshape()
        with torch.no_grad():
            table = net.forward(**{net.inputs[0]: batch})[output]
        if table.ndim != 4 or table.shape[-1] != 7:
            raise ProtonetError(f"{model.deploy}: output '{output}' has shape "
                                f"{list(table.shape)}; detection reads SSD's [1, 1, N, 7] "
                                "DetectionOutput")
        rows = table.reshape(-1, 7)
        for index, (path, picture) in enumerate(zip(paths, pictures)):
            found = ImageDetections(os.fspath(path), picture.shape[1], picture.shape[0])
            mine = rows[(rows[:, 0] == index) & (rows[:, 1] >= 0) & (rows[:, 2] >= threshold)]
            found.detections = [_detection(row, found.width, found.height, model.labels)
                                for row in mine]
            results.append(found)
    return results


def _detection(row: np.ndarray, width: int, height: int, labels) -> Detection:
    label = int(row[1])
    relative = [float(v) for v in row[3:7]]
    box = [relative[0] * width, relative[1] * height, relative[2] * width,
           relative[3] * height]
    name = labels[label] if labels and 0 <= label < len(labels) else None
    return Detection(label, float(row[2]), box, relative, name)


# -- drawing ----------------------------------------------------------------------------------
def colour(label: int) -> tuple[int, int, int]:
    """A distinct, stable BGR colour per label."""
    hue = (label * 47) % 180
    pixel = cv2.cvtColor(np.uint8([[[hue, 220, 255]]]), cv2.COLOR_HSV2BGR)[0, 0]
    return tuple(int(v) for v in pixel)


def draw(image: np.ndarray, detections: Sequence[Detection]) -> np.ndarray:
    """A copy of the BGR image with each detection's box and 'name score' drawn."""
    canvas = image.copy()
    h, w = canvas.shape[:2]
    thickness = max(1, round(min(h, w) / 300))
    for d in detections:
        x1, y1, x2, y2 = (int(round(v)) for v in d.box)
        x1, x2 = np.clip([x1, x2], 0, w - 1)
        y1, y2 = np.clip([y1, y2], 0, h - 1)
        c = colour(d.label)
        cv2.rectangle(canvas, (int(x1), int(y1)), (int(x2), int(y2)), c, thickness)
        text = f"{d.name or d.label} {d.score:.2f}"
        scale = 0.4 * thickness
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        top = int(y1) - th - base if int(y1) - th - base >= 0 else int(y1)
        cv2.rectangle(canvas, (int(x1), top), (int(x1) + tw, top + th + base), c, -1)
        cv2.putText(canvas, text, (int(x1), top + th), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    (0, 0, 0), 1, cv2.LINE_AA)
    return canvas


def write_drawn(found: ImageDetections, folder: str, taken: set[str]) -> str:
    """Draw `found` on its image and write it into `folder` under the image's own file
    name (numbered when two inputs share one); returns the path written."""
    os.makedirs(folder, exist_ok=True)
    stem, ext = os.path.splitext(os.path.basename(found.path))
    ext = ext if ext.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff") else ".png"
    name, n = stem + ext, 1
    while name in taken:
        name, n = f"{stem}_{n}{ext}", n + 1
    taken.add(name)
    target = os.path.join(folder, name)
    if not cv2.imwrite(target, draw(load_image(found.path), found.detections)):
        raise ProtonetError(f"{target}: OpenCV could not write the image")
    return target
