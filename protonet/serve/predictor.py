"""What the server runs, split where the batching needs it.

A predictor turns one decoded image into its net inputs (`prepare`, in the request's
thread, so decoding and resizing of many requests overlap) and a list of prepared
images into one answer per image with one forward pass (`run`, in the single forward
thread). Classification is protonet.classify's Classifier, so an answer is computed
exactly as `protonet classify` computes it. Detection nets get a predictor of their
own: `load_predictor` is the one place that picks which.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from .. import classify
from ..errors import ProtonetError

MAX_K = 1000


class OptionError(ProtonetError):
    """A request's query option is malformed (answered with 400)."""


@dataclass
class Prepared:
    """One image's rows of the next batch and the request's options."""
    inputs: np.ndarray
    options: dict = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.inputs)


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


def load_predictor(model: classify.Model, name: str, device="cpu",
                   precision: str = "fp32"):
    """The predictor for this model. Detection nets (an output made by a
    DetectionOutput layer) will get a predictor that answers {"detections": [...]}
    once protonet.detect exists; until then every net is served as a classifier."""
    return ClassifierPredictor(model, name, device, precision)
