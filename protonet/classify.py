"""Image classification as Caffe's classifier.py does it, with a zoo entry's preprocessing.

An image is decoded by OpenCV (BGR, 8 bits: what Caffe's own data layers read), resized
bilinearly to the entry's image size, center-cropped to the net's input (the offset
Caffe's DataTransformer uses in TEST: floor((H - h) / 2)), then becomes
(pixel - mean) * scale, the order of Caffe's Transformer. The net's output for each
image is ranked into its top k classes.

With `oversample` (pycaffe's Classifier.predict(oversample=True)), the resized image
gives ten crops of the net's input size instead of the center one — the four corners
and the center (caffe.io.oversample's order), then the same five mirrored left-right —
and the net's outputs for the ten are averaged (float32, as numpy's mean in pycaffe).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch

from . import zoo
from .errors import ProtonetError
from .pycaffe import TEST, Net

BATCH = 16        # images per forward pass
OVERSAMPLE_BATCH = 4    # images per forward pass when each gives 10 crops
CROPS = 10


@dataclass
class Model:
    """What classification needs: the deploy net, its weights and preprocessing."""
    deploy: str
    weights: str
    preprocess: zoo.Preprocess
    labels: list[str] | None = None
    output: str | None = None


def load_image(path: str) -> np.ndarray:
    """The image as OpenCV reads it: (H, W, 3) uint8 BGR."""
    image = cv2.imread(os.fspath(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ProtonetError(f"{path}: cannot read as an image (missing, or a format "
                            "OpenCV does not decode)")
    return image


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The (height, width) window in the middle of an (H, W, C) image."""
    h, w = image.shape[:2]
    if h < height or w < width:
        raise ProtonetError(f"cannot crop {height}x{width} from a {h}x{w} image")
    top, left = (h - height) // 2, (w - width) // 2
    return image[top:top + height, left:left + width]


def oversample(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """pycaffe's caffe.io.oversample for one (H, W, C) image: (10, height, width, C),
    the crops at the top-left, top-right, bottom-left and bottom-right corners and the
    center, then those five mirrored left-right."""
    h, w = image.shape[:2]
    if h < height or w < width:
        raise ProtonetError(f"cannot crop {height}x{width} from a {h}x{w} image")
    # pycaffe's center crop starts at int(H / 2 - height / 2), which is this floor.
    origins = [(0, 0), (0, w - width), (h - height, 0), (h - height, w - width),
               ((h - height) // 2, (w - width) // 2)]
    crops = [image[top:top + height, left:left + width] for top, left in origins]
    crops += [crop[:, ::-1] for crop in crops]
    return np.stack(crops)


def _oriented_resized(image: np.ndarray, prep: zoo.Preprocess,
                      size: tuple[int, int]) -> np.ndarray:
    """Channel order as the model wants, resized to the entry's image size (else `size`)."""
    if prep.channel_order == "RGB":
        image = image[:, :, ::-1]
    resize = prep.image_size or size
    if image.shape[:2] != tuple(resize):
        image = cv2.resize(image, (resize[1], resize[0]), interpolation=cv2.INTER_LINEAR)
    return image


def _to_input(crop: np.ndarray, prep: zoo.Preprocess) -> np.ndarray:
    """(h, w, C) crop -> (C, h, w) float32 net input: (pixel - mean) * scale."""
    crop = crop.astype(np.float32)
    if prep.mean:
        crop -= np.asarray(prep.mean, dtype=np.float32)
    if prep.scale != 1:
        crop *= np.float32(prep.scale)
    return np.ascontiguousarray(crop.transpose(2, 0, 1))


def preprocess(image: np.ndarray, prep: zoo.Preprocess, size: tuple[int, int]) -> np.ndarray:
    """One BGR uint8 image -> the (3, h, w) float32 input for a net whose input is `size`."""
    return _to_input(center_crop(_oriented_resized(image, prep, size), *size), prep)


def preprocess_oversampled(image: np.ndarray, prep: zoo.Preprocess,
                           size: tuple[int, int]) -> np.ndarray:
    """One BGR uint8 image -> its ten (3, h, w) crops' inputs, (10, 3, h, w)."""
    crops = oversample(_oriented_resized(image, prep, size), *size)
    return np.stack([_to_input(crop, prep) for crop in crops])


def read_labels(path: str) -> list[str]:
    """One label per line (e.g. Caffe's synset_words.txt)."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise ProtonetError(f"{path}: cannot read labels ({e.strerror})") from None


def top_k(scores: np.ndarray, k: int, labels: Sequence[str] | None = None) -> list[tuple]:
    """(index, score, label or None) of the k highest scores, highest first."""
    scores = scores.reshape(-1)
    order = np.argsort(-scores, kind="stable")[:k]
    return [(int(i), float(scores[i]), labels[i] if labels and i < len(labels) else None)
            for i in order]


def input_size(net: Net, prep: zoo.Preprocess) -> tuple[int, int]:
    """The crop the net is fed: the entry's crop, else the net's own input size."""
    if prep.crop:
        return prep.crop
    shape = net.blobs[net.inputs[0]].shape
    return int(shape[2]), int(shape[3])


def classify(model: Model, images: Sequence[str], k: int = 5,
             device: str = "cpu", oversample: bool = False) -> list[list[tuple]]:
    """Top-k (index, score, label) for each image, in order; with `oversample`, of the
    outputs averaged over ten crops (corners, center and their mirrors)."""
    net = Net(model.deploy, model.weights, TEST, device=device)
    if len(net.inputs) != 1:
        raise ProtonetError(f"{model.deploy}: classification needs a net with one input, "
                            f"this one has {net.inputs}")
    output = model.output or net.outputs[-1]
    if output not in net.blobs:
        raise ProtonetError(f"{model.deploy}: no output blob '{output}'")
    size = input_size(net, model.preprocess)
    results = []
    per_pass = OVERSAMPLE_BATCH if oversample else BATCH
    for start in range(0, len(images), per_pass):
        paths = images[start:start + per_pass]
        if oversample:
            batch = np.concatenate([preprocess_oversampled(load_image(p), model.preprocess,
                                                           size) for p in paths])
        else:
            batch = np.stack([preprocess(load_image(p), model.preprocess, size)
                              for p in paths])
        net.blobs[net.inputs[0]].reshape(*batch.shape)
        net.reshape()
        with torch.no_grad():
            scores = net.forward(**{net.inputs[0]: batch})[output]
        if oversample:
            scores = scores.reshape(len(paths), CROPS, -1).mean(axis=1)
        results += [top_k(s, k, model.labels) for s in scores]
    return results


def zoo_model(name: str, weights: str | None = None, cache=None) -> Model:
    """A zoo entry as a Model; its weights are downloaded (and verified) when needed."""
    entry = zoo.load_entry(name)
    if entry.task != "classification":
        raise ProtonetError(f"zoo model '{name}' is a {entry.task} model: use `protonet "
                            f"{'detect' if entry.task == 'detection' else entry.task}`")
    path = zoo.resolve_weights(weights, cache) if weights else \
        str(zoo.ensure_weights(entry, cache))
    return Model(str(entry.deploy), path, entry.preprocess, entry.labels,
                 entry.meta.get("output"))
