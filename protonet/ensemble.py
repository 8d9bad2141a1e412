"""Scoring an ensemble of trained weights of one net: `protonet test --ensemble`.

Caffe's meaning of several weight files (`--weights a,b`: copied in order into one
net, later files overwriting same-named layers) stays what `protonet test` does without
--ensemble. With --ensemble each file (or glob match) is a *member*: the same net with
that file's weights, as `protonet test --weights FILE` alone would score it.

Per test batch:

1. The net's leading data layers (those without bottoms) run once, so every member
   sees the same batch, with the same random mirror flips.
2. Each member runs the rest of the net on it, with its own weights swapped into the
   one net (so the memory cost is one set of activations plus each member's params).
3. The *heads* — Accuracy layers and loss layers (loss_weight != 0) whose tops no
   other layer reads — are run once more on the members' averaged predictions: each
   head bottom that depends on the weights is averaged over the members; bottoms the
   data layers give (labels, also through param-free layers such as Split) are passed
   as they are. The net's own layers do the scoring,
   so top_k, ignore_label and normalization keep their meaning.

How predictions are averaged (`mean`):

- "prob" (default): a prediction that feeds only softmax-based heads (Accuracy,
  SoftmaxWithLoss) and is not already a Softmax output is turned into probabilities
  (softmax over the head's axis), averaged, and handed to the heads as
  log(mean probability). Softmax of that is the mean probability again, so Accuracy
  scores the argmax of the averaged probabilities and SoftmaxWithLoss gives the
  ensemble's log loss. Other predictions are averaged as they are.
- "score": every prediction is averaged as it is (logits, scores, regressions).

Net outputs that are not heads' tops (e.g. a `prob` blob) are averaged over members.
The result has each member's mean outputs, their average over members, and the
ensemble's outputs (the heads on averaged predictions) with its loss.

Members come from comma-separated paths, `zoo:NAME`, and globs: `snap/lenet_iter_*.caffemodel`
matches a run's snapshots, in iteration order (names sorted with their numbers
compared as numbers). A glob skips EMA files (`.ema.` in the name, protonet.solver.ema)
unless it asks for them itself (`snap/*.ema.caffemodel`).
"""
from __future__ import annotations

import glob
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .errors import ProtonetError
from .io.weights import copy_weights
from .net.module import NetModule
from .solver.scoring import flat_outputs, group_scores, output_labels, score_line
from .solver.updates import f32

log = logging.getLogger("protonet")

MEANS = ("prob", "score")
SOFTMAX_HEADS = ("Accuracy", "SoftmaxWithLoss")
_GLOB = re.compile(r"[*?\[]")


# -- which files ---------------------------------------------------------------------------
def _natural_key(path: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def expand_weights(spec: str, cache=None) -> list[str]:
    """The member files of a --weights value: comma-separated paths, zoo:NAME, globs."""
    from .zoo import resolve_weights
    files: list[str] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if item.startswith("zoo:") or not _GLOB.search(item):
            files.append(resolve_weights(item, cache))
            continue
        matches = [m for m in glob.glob(item) if os.path.isfile(m)]
        if ".ema." not in os.path.basename(item):
            matches = [m for m in matches if ".ema." not in os.path.basename(m)]
        if not matches:
            raise ProtonetError(f"--weights {item}: no file matches")
        files += sorted(matches, key=_natural_key)
    if not files:
        raise ProtonetError(f"--weights '{spec}' names no weights file")
    return files


# -- the result --------------------------------------------------------------------------
@dataclass
class EnsembleResult:
    """Mean outputs over the batches: per member, averaged over members, and of the
    ensemble (heads on averaged predictions). Outputs are by name, as in JSON logs."""
    files: list[str]
    members: list[dict]
    member_losses: list[float]
    member_mean: dict
    ensemble: dict
    loss: float
    batches: int
    labels: list = field(default_factory=list, repr=False)
    ensemble_flat: list = field(default_factory=list, repr=False)


# -- scoring -----------------------------------------------------------------------------
class Ensemble:
    """Members (one weights file each) of one net, scored batch by batch."""

    def __init__(self, module: NetModule, files: Sequence[str], mean: str = "prob"):
        if mean not in MEANS:
            raise ProtonetError(f"ensemble mean must be one of {', '.join(MEANS)}, got '{mean}'")
        if not files:
            raise ProtonetError("an ensemble needs at least one weights file")
        self.module = module
        self.files = [os.fspath(f) for f in files]
        self.mean = mean
        self._params = [entry.param for entry in module.learnable]
        self.members = self._load_members()
        self._plan()

    def _load_members(self) -> list[list[torch.Tensor]]:
        """Each file's params: copied over the net's initial (filler) values, so a
        layer one file lacks keeps its filler, not another member's weights."""
        initial = [p.detach().clone() for p in self._params]
        members = []
        with torch.no_grad():
            for path in self.files:
                for p, value in zip(self._params, initial):
                    p.copy_(value)
                log.info("Ensemble member %d: %s", len(members), path)
                copy_weights(self.module.layers, path)
                members.append([p.detach().clone() for p in self._params])
        return members

    def _use(self, index: int) -> None:
        with torch.no_grad():
            for p, value in zip(self._params, self.members[index]):
                p.copy_(value)

    # -- the net's parts ------------------------------------------------------------------
    def _plan(self) -> None:
        module = self.module
        steps = module.steps
        self.sources = 0           # leading steps without bottoms: the data layers
        while self.sources < len(steps) and not steps[self.sources].bottoms:
            self.sources += 1
        # Blobs every member computes alike: the data layers' tops and what layers
        # without params compute from them alone (labels, through Split layers).
        data_blobs = {t for step in steps[:self.sources] for t in step.tops}
        for step in steps[self.sources:]:
            if not len(module.layers[step.layer].blobs) and \
                    all(b in data_blobs for b in step.bottoms):
                data_blobs.update(step.tops)
        readers: dict[int, list[int]] = {}
        for k, step in enumerate(steps):
            for b in step.bottoms:
                readers.setdefault(b, []).append(k)
        self.producer = {t: k for k, step in enumerate(steps) for t in step.tops}
        self.heads = []
        for k, step in enumerate(steps[self.sources:], self.sources):
            layer = module.layers[step.layer]
            if not (layer.type == "Accuracy" or step.losses):
                continue
            if any(r > k for t in step.tops for r in readers.get(t, [])):
                continue          # something reads its tops: part of the body
            self.heads.append(k)
        head_tops = {t for k in self.heads for t in steps[k].tops}
        # Head bottoms computed by the body: the predictions to average.
        consumers: dict[int, list[int]] = {}
        for k in self.heads:
            for b in steps[k].bottoms:
                if b not in data_blobs:
                    consumers.setdefault(b, []).append(k)
        self.predictions = {b: self._transform(b, ks) for b, ks in consumers.items()}
        # Net outputs no head makes are averaged as they are.
        self.plain_outputs = [b for b in module.output_ids if b not in head_tops]

    def _transform(self, blob: int, heads: list[int]) -> int | None:
        """The softmax axis when the blob is averaged as probabilities, else None."""
        if self.mean != "prob":
            return None
        layers = [self.module.layers[self.module.steps[k].layer] for k in heads]
        if any(layer.type not in SOFTMAX_HEADS for layer in layers):
            return None
        if self._producer_type(blob) == "Softmax":
            return None
        param = layers[0].param
        if layers[0].type == "Accuracy":
            return param.accuracy_param.axis
        return param.softmax_param.axis

    def _producer_type(self, blob: int) -> str | None:
        """The type of the layer that computes `blob`, looking through Split layers."""
        steps, layers = self.module.steps, self.module.layers
        while blob in self.producer:
            step = steps[self.producer[blob]]
            layer = layers[step.layer]
            if layer.type != "Split" or not step.bottoms:
                return layer.type
            blob = step.bottoms[0]
        return None

    # -- one batch ------------------------------------------------------------------------
    def forward(self) -> dict:
        """One test batch through every member and the ensemble.

        Returns {"members": [(values, loss)], "ensemble": (values, loss)} where values
        are the net's blob values (the ensemble's: averaged predictions, head tops and
        averaged plain outputs; other entries are the first member's)."""
        module = self.module
        with torch.no_grad():
            data, _ = module(None, 0, self.sources - 1)
            sums: dict[int, torch.Tensor] = {}
            members = []
            for m in range(len(self.members)):
                self._use(m)
                values, loss = module(None, self.sources, None, list(data))
                members.append((values, loss))
                for b, axis in self.predictions.items():
                    self._accumulate(sums, b, self._prepared(values[b], axis))
                for b in self.plain_outputs:
                    self._accumulate(sums, b, values[b].float())
            count = len(self.members)
            ensemble: list = list(members[0][0])   # for the data blobs, alike in all
            for b, total in sums.items():
                mean = total / count
                axis = self.predictions.get(b)
                if axis is not None:
                    mean = torch.log(mean.clamp_min(torch.finfo(mean.dtype).tiny))
                ensemble[b] = mean
            loss = None
            for k in self.heads:
                step = module.steps[k]
                out = module.layers[step.layer](*[ensemble[b] for b in step.bottoms])
                if isinstance(out, torch.Tensor):
                    out = (out,)
                for t, v in zip(step.tops, out):
                    ensemble[t] = v
                for pos, weight in step.losses:
                    term = out[pos].sum() * weight
                    loss = term if loss is None else loss + term
        return {"members": members, "ensemble": (ensemble, loss)}

    @staticmethod
    def _prepared(value: torch.Tensor, axis: int | None) -> torch.Tensor:
        value = value.float()
        if axis is None:
            return value
        return torch.softmax(value, dim=axis % value.dim())

    @staticmethod
    def _accumulate(sums: dict, blob: int, value: torch.Tensor) -> None:
        if blob in sums:
            sums[blob] += value
        else:
            sums[blob] = value.clone()

    # -- many batches ---------------------------------------------------------------------
    def run(self, iterations: int, log_batches: bool = True) -> EnsembleResult:
        """Caffe's test over `iterations` batches, for every member and the ensemble."""
        module = self.module
        count = len(self.members)
        member_sums: list = [None] * count
        member_loss = [np.float32(0)] * count
        ens_sums, ens_loss, labels = None, np.float32(0), []
        for i in range(iterations):
            batch = self.forward()
            for m, (values, loss) in enumerate(batch["members"]):
                if loss is not None:
                    member_loss[m] += np.float32(float(loss))
                flat = flat_outputs(module, values)
                member_sums[m] = flat.clone() if member_sums[m] is None else member_sums[m] + flat
                if not labels:
                    labels = output_labels(module, values)
            values, loss = batch["ensemble"]
            if loss is not None:
                ens_loss += np.float32(float(loss))
            flat = flat_outputs(module, values)
            ens_sums = flat.clone() if ens_sums is None else ens_sums + flat
            if log_batches:
                for (name, _), score in zip(labels, flat.tolist()):
                    log.info("Batch %d, %s = %g", i, name, score)
        n = max(iterations, 1)
        member_means = [(s / n).tolist() if s is not None else [] for s in member_sums]
        ens_means = (ens_sums / n).tolist() if ens_sums is not None else []
        average = [float(np.mean([m[j] for m in member_means], dtype=np.float64))
                   for j in range(len(labels))] if member_means and labels else []
        return EnsembleResult(
            files=list(self.files),
            members=[group_scores(labels, m) for m in member_means],
            member_losses=[f32(loss / np.float32(n)) for loss in member_loss],
            member_mean=group_scores(labels, average),
            ensemble=group_scores(labels, ens_means),
            loss=f32(ens_loss / np.float32(n)), batches=iterations,
            labels=labels, ensemble_flat=ens_means)


def log_result(result: EnsembleResult) -> None:
    """Members' scores, their mean, then the ensemble's in `caffe test`'s final lines."""
    for m, (path, scores) in enumerate(zip(result.files, result.members)):
        log.info("Member %d (%s): %s (total loss %g)", m, path, _summary(scores),
                 result.member_losses[m])
    log.info("Members' mean: %s", _summary(result.member_mean))
    log.info("Ensemble of %d:", len(result.files))
    log.info("Loss: %g", result.loss)
    for (name, weight), mean in zip(result.labels, result.ensemble_flat):
        log.info("%s", score_line(mean, name, weight))


def _summary(scores: dict) -> str:
    def text(value) -> str:
        if isinstance(value, list):
            return "[" + ", ".join(f"{v:g}" for v in value) + "]"
        return f"{value:g}"
    return ", ".join(f"{name} = {text(value)}" for name, value in scores.items())
