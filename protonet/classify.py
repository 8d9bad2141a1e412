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
from .data.datum import check_image_header
from .pycaffe import TEST, Net
from .speed import autocast

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


def decode_image(data: bytes, where: str) -> np.ndarray:
    """Encoded image bytes as `load_image` reads a file: (H, W, 3) uint8 BGR. Header
    sizes are checked against protonet.limits before OpenCV allocates."""
    check_image_header(data, where)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) \
            if data else None
    except cv2.error as e:
        lines = str(e).strip().splitlines()
        raise ProtonetError(f"{where}: OpenCV cannot decode it "
                            f"({lines[-1] if lines else 'cv2.error'})") from None
    if image is None:
        raise ProtonetError(f"{where}: cannot decode {len(data)} bytes as an image (not "
                            "a format OpenCV reads, or truncated)")
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


class Classifier:
    """A classification net loaded once: preprocessed images in, scores out.

    `protonet classify` and `protonet serve` both go through it, so a served answer
    is computed as the command computes it. Not thread-safe: one forward at a time."""

    def __init__(self, model: Model, device: str | torch.device = "cpu",
                 precision: str = "fp32"):
        net = Net(model.deploy, model.weights, TEST, device=device)
        if len(net.inputs) != 1:
            raise ProtonetError(f"{model.deploy}: classification needs a net with one "
                                f"input, this one has {net.inputs}")
        self.output = model.output or net.outputs[-1]
        if self.output not in net.blobs:
            raise ProtonetError(f"{model.deploy}: no output blob '{self.output}'")
        self.model, self.net, self.precision = model, net, precision
        self.device = torch.device(device)
        self.size = input_size(net, model.preprocess)

    def inputs(self, image: np.ndarray, oversample: bool = False) -> np.ndarray:
        """One BGR uint8 image -> its net inputs: (1, 3, h, w), or (10, 3, h, w)."""
        if oversample:
            return preprocess_oversampled(image, self.model.preprocess, self.size)
        return preprocess(image, self.model.preprocess, self.size)[None]

    def scores(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One forward pass over every image's inputs (as `inputs` made them); each
        image's output, averaged over its crops when it has several."""
        batch = np.concatenate(inputs) if len(inputs) > 1 else inputs[0]
        data = self.net.inputs[0]
        self.net.blobs[data].reshape(*batch.shape)
        self.net.reshape()
        with torch.no_grad(), autocast(self.precision, self.device):
            out = self.net.forward(**{data: batch})[self.output]
        out = out.reshape(len(batch), -1).copy()     # the blob is reused next pass
        result, at = [], 0
        for crops in (len(x) for x in inputs):
            # Ten crops average as numpy's float32 mean, as pycaffe's predict does.
            result.append(out[at] if crops == 1 else out[at:at + crops].mean(axis=0))
            at += crops
        return result

    def top(self, scores: np.ndarray, k: int) -> list[tuple]:
        return top_k(scores, k, self.model.labels)


def classify(model: Model, images: Sequence[str], k: int = 5,
             device: str = "cpu", oversample: bool = False) -> list[list[tuple]]:
    """Top-k (index, score, label) for each image, in order; with `oversample`, of the
    outputs averaged over ten crops (corners, center and their mirrors)."""
    classifier = Classifier(model, device)
    results = []
    per_pass = OVERSAMPLE_BATCH if oversample else BATCH
    for start in range(0, len(images), per_pass):
        inputs = [classifier.inputs(load_image(p), oversample)
                  for p in images[start:start + per_pass]]
        results += [classifier.top(s, k) for s in classifier.scores(inputs)]
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
