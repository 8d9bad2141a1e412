"""Semantic segmentation with FCN / SegNet / PSPNet-style nets: a score map to a label map.

An image is decoded and oriented as `classify` does it, resized (bilinearly, aspect
not kept) to the net's input size (or the zoo entry's crop), then becomes
(pixel - mean) * scale. The net's output is read as scores (1, C, h, w): they are
resized bilinearly to the image's own size and the label of a pixel is the argmax over
C (the first class on ties). An output with one channel is taken as a label map
already (ENet's deploy ends in an ArgMax layer) and resized nearest-neighbour.

Each image gives two PNGs: `<stem>_labels.png`, the raw labels (8-bit, 16-bit when
there are more than 256 classes), and `<stem>_overlay.png`, the image blended with
the labels coloured in the PASCAL VOC palette.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .classify import Model, _oriented_resized, _to_input, load_image
from .errors import ProtonetError
from .pycaffe import TEST, Net


def voc_palette(count: int = 256) -> np.ndarray:
    """(count, 3) uint8 RGB colours of the PASCAL VOC palette: the bits of a class index,
    three at a time, go to the high bits of red, green and blue."""
    index = np.arange(count)
    colours = np.zeros((count, 3), dtype=np.int64)
    for shift in range(8):
        for channel in range(3):
            bit = (index >> (3 * shift + channel)) & 1
            colours[:, channel] |= bit << (7 - shift)
    return colours.astype(np.uint8)


@dataclass
class Segmentation:
    """One image's result."""
    image: str
    labels: np.ndarray          # (H, W) int64 class per pixel, at the image's size
    classes: int                # C of the net's score map

    def fractions(self) -> dict[int, float]:
        """{class: fraction of the pixels} for the classes present, by class."""
        counts = np.bincount(self.labels.reshape(-1), minlength=self.classes)
        total = self.labels.size
        return {int(c): float(n) / total for c, n in enumerate(counts) if n}


def net_input_size(net: Net, model: Model) -> tuple[int, int]:
    """What the image is resized to: the entry's crop, else the net's own input."""
    if model.preprocess.crop:
        return tuple(model.preprocess.crop)
    shape = net.blobs[net.inputs[0]].shape
    if len(shape) != 4:
        raise ProtonetError(f"{model.deploy}: segmentation needs a (1, C, H, W) input, "
                            f"'{net.inputs[0]}' is {list(shape)}")
    return int(shape[2]), int(shape[3])


def label_map(scores: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(1, C, h, w) scores (or a (1, 1, h, w) label map) -> (height, width) labels."""
    if scores.dim() != 4 or scores.shape[0] != 1:
        raise ProtonetError(f"the output is {list(scores.shape)}; segment reads a "
                            "(1, C, H, W) score map")
    scores = scores.to(torch.float32)
    if scores.shape[1] == 1:
        resized = F.interpolate(scores, size=(height, width), mode="nearest")
        return resized[0, 0].round().to(torch.int64).clamp(min=0)
    resized = F.interpolate(scores, size=(height, width), mode="bilinear",
                            align_corners=False)
    return resized[0].argmax(dim=0)


def segment(model: Model, images: Sequence[str], device: str = "cpu"):
    """Yield a Segmentation for each image, in order."""
    net = Net(model.deploy, model.weights, TEST, device=device)
    if len(net.inputs) != 1:
        raise ProtonetError(f"{model.deploy}: segmentation needs a net with one input, "
                            f"this one has {net.inputs}")
    output = model.output or net.outputs[-1]
    if output not in net.blobs:
        raise ProtonetError(f"{model.deploy}: no output blob '{output}'")
    size = net_input_size(net, model)
    prep = model.preprocess.__class__(image_size=size, crop=None, mean=model.preprocess.mean,
                                      scale=model.preprocess.scale,
                                      channel_order=model.preprocess.channel_order)
    for path in images:
        image = load_image(path)
        batch = _to_input(_oriented_resized(image, prep, size), prep)[None]
        with torch.no_grad():
            net.blobs[net.inputs[0]].reshape(*batch.shape)
            net.reshape()
            scores = net.forward(**{net.inputs[0]: batch})[output]
        scores = torch.as_tensor(np.asarray(scores))
        labels = label_map(scores, *image.shape[:2]).cpu().numpy()
        classes = max(int(scores.shape[1]), int(labels.max()) + 1)
        yield Segmentation(os.fspath(path), labels, classes)


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float) -> np.ndarray:
    """The BGR image blended with the labels' VOC colours: (1 - alpha) * image +
    alpha * colour, rounded."""
    palette = voc_palette(max(256, int(labels.max()) + 1))[:, ::-1]      # RGB -> BGR
    colour = palette[labels].astype(np.float32)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colour
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def write_outputs(result: Segmentation, out_dir: str, alpha: float,
                  stem: str | None = None) -> tuple[str, str]:
    """Write `<stem>_overlay.png` and `<stem>_labels.png` into out_dir (stem: the
    image's file name without its extension); their paths."""
    os.makedirs(out_dir, exist_ok=True)
    stem = stem or Path(result.image).stem
    overlay_path = os.path.join(out_dir, f"{stem}_overlay.png")
    labels_path = os.path.join(out_dir, f"{stem}_labels.png")
    dtype = np.uint8 if result.labels.max(initial=0) < 256 else np.uint16
    blended = overlay(load_image(result.image), result.labels, alpha)
    for path, pixels in ((overlay_path, blended), (labels_path, result.labels.astype(dtype))):
        if not cv2.imwrite(path, pixels):
            raise ProtonetError(f"{path}: cannot write the PNG")
    return overlay_path, labels_path
