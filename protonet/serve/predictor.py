"""What the server runs, split where the batching needs it.

A predictor turns one decoded image into its net inputs (`prepare`, in the request's
thread, so decoding and resizing of many requests overlap) and a list of prepared
images into one answer per image with one forward pass (`run`, in the single forward
thread). Classification is protonet.classify's Classifier, so an answer is computed
exactly as `protonet classify` computes it; detection (SSD-style nets, a
DetectionOutput top) reads the rows as protonet.detect does, so boxes are
`protonet detect`'s. `load_predictor` is the one place that picks which.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from .. import classify, detect
from ..errors import ProtonetError
from ..pycaffe import TEST, Net
from ..speed import autocast


MAX_K = 1000


class OptionError(ProtonetError):
    """A request's query option is malformed (answered with 400)."""


@dataclass
class Prepared:
    """One image's rows of the next batch and the request's options."""
    inputs: np.ndarray
    options: dict = field(default_factory=dict)


def _flag(query: Mapping[str, str], name: str) -> bool:
    value = query.get(name, "0").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise OptionError(f"?{name}= takes 1 or 0, got '{value[:40]}'")


class ClassifierPredictor:
    """Top-k classes of each image, as `protonet classify` ranks them."""
    kind = "classifier"

    def __init__(self, model: classify.Model, name: str, device="cpu",
                 precision: str = "fp32"):
        self.name = name
        self.classifier = classify.Classifier(model, device, precision)

    def options(self, query: Mapping[str, str]) -> dict:
        """?k=5 (classes to return), ?oversample=1 (10-crop average)."""
        text = query.get("k", "5")
        try:
            k = int(text)
        except ValueError:
            raise OptionError(f"?k= takes a whole number, got '{text[:40]}'") from None
        if not 1 <= k <= MAX_K:
            raise OptionError(f"?k= must be between 1 and {MAX_K}, got {k}")
        return {"k": k, "oversample": _flag(query, "oversample")}

    def prepare(self, image: np.ndarray, options: dict) -> Prepared:
        return Prepared(self.classifier.inputs(image, options["oversample"]), options)

    def run(self, items: Sequence[Prepared]) -> list[dict]:
        scores = self.classifier.scores([item.inputs for item in items])
        return [{"top": [{"index": index, "label": label, "score": score}
                         for index, score, label in self.classifier.top(s, item.options["k"])]}
                for s, item in zip(scores, items)]

    def describe(self) -> dict:
        """What GET /model shows: the net's blobs, preprocessing and labels."""
        c = self.classifier
        net, prep = c.net, c.model.preprocess
        return {
            "name": self.name, "kind": self.kind,
            "deploy": _base_name(c.model.deploy),
            "inputs": {name: list(net.blobs[name].shape) for name in net.inputs},
            "outputs": {name: list(net.blobs[name].shape) for name in net.outputs},
            "output": c.output,
            "preprocessing": {
                "image_size": list(prep.image_size) if prep.image_size else None,
                "crop": list(c.size), "mean": list(prep.mean) if prep.mean else None,
                "scale": prep.scale, "channel_order": prep.channel_order},
            "labels": c.model.labels,
            "precision": c.precision, "device": str(c.device),
        }


def _base_name(path: str) -> str:
    """A file's name without its folders: the page needs no server paths."""
    return str(path).replace("\\", "/").rsplit("/", 1)[-1]


class DetectorPredictor:
    """Boxes, labels and scores of an SSD-style net, as `protonet detect` finds them."""
    kind = "detector"

    def __init__(self, model: detect.Model, name: str, device="cpu",
                 precision: str = "fp32"):
        net = Net(model.deploy, model.weights, TEST, device=device)
        if len(net.inputs) != 1:
            raise ProtonetError(f"{model.deploy}: detection needs a net with one input, "
                                f"this one has {net.inputs}")
        self.output = model.output or net.outputs[-1]
        if self.output not in net.blobs:
            raise ProtonetError(f"{model.deploy}: no output blob '{self.output}'")
        self.name, self.model, self.net, self.precision = name, model, net, precision
        self.device = torch.device(device)
        self.size = classify.input_size(net, model.preprocess)

    def options(self, query: Mapping[str, str]) -> dict:
        """?threshold=0.5: the lowest score returned (default: the model's)."""
        text = query.get("threshold")
        if text is None:
            return {"threshold": self.model.threshold}
        try:
            threshold = float(text)
        except ValueError:
            raise OptionError(f"?threshold= takes a number, got '{text[:40]}'") from None
        if not 0 <= threshold <= 1:
            raise OptionError(f"?threshold= must be between 0 and 1, got {threshold}")
        return {"threshold": threshold}

    def prepare(self, image: np.ndarray, options: dict) -> Prepared:
        inputs = classify.preprocess(image, self.model.preprocess, self.size)[None]
        return Prepared(inputs, dict(options, width=image.shape[1], height=image.shape[0]))

    def run(self, items: Sequence[Prepared]) -> list[dict]:
        batch = np.concatenate([item.inputs for item in items])
        data = self.net.inputs[0]
        self.net.blobs[data].reshape(*batch.shape)
        self.net.reshape()
        with torch.no_grad(), autocast(self.precision, self.device):
            table = self.net.forward(**{data: batch})[self.output]
        if table.ndim != 4 or table.shape[-1] != 7:
            raise ProtonetError(f"{self.model.deploy}: output '{self.output}' has shape "
                                f"{list(table.shape)}; detection reads SSD's [1, 1, N, 7]")
        rows = table.reshape(-1, 7).copy()
        answers = []
        for index, item in enumerate(items):
            o = item.options
            mine = rows[(rows[:, 0] == index) & (rows[:, 1] >= 0) &
                        (rows[:, 2] >= o["threshold"])]
            found = [detect._detection(row, o["width"], o["height"], self.model.labels)
                     for row in mine]
            answers.append({"width": o["width"], "height": o["height"], "detections": [
                {"index": d.label, "label": d.name, "score": d.score, "box": d.box,
                 "relative": d.relative} for d in found]})
        return answers

    def describe(self) -> dict:
        net, prep = self.net, self.model.preprocess
        return {
            "name": self.name, "kind": self.kind, "deploy": _base_name(self.model.deploy),
            "inputs": {name: list(net.blobs[name].shape) for name in net.inputs},
            "outputs": {name: list(net.blobs[name].shape) for name in net.outputs},
            "output": self.output,
            "preprocessing": {
                "image_size": list(prep.image_size) if prep.image_size else None,
                "crop": None, "input": list(self.size),
                "mean": list(prep.mean) if prep.mean else None,
                "scale": prep.scale, "channel_order": prep.channel_order},
            "labels": self.model.labels, "threshold": self.model.threshold,
            "precision": self.precision, "device": str(self.device),
        }


def load_predictor(model, name: str, device="cpu", precision: str = "fp32"):
    """The predictor for a classify.Model (top classes) or a detect.Model (boxes)."""
    if isinstance(model, detect.Model):
        return DetectorPredictor(model, name, device, precision)
    return ClassifierPredictor(model, name, device, precision)
