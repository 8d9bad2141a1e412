"""Caffe's DataTransformer: crop, mirror, mean subtraction and scaling of records.

Numerics follow Caffe master's data_transformer.cpp: each value is
`(pixel - mean) * scale` in float32, the mean file is indexed at the pixel's
uncropped position, crops sit at a random offset in TRAIN and at the floor-centre in
TEST, and `mirror: true` flips a coin for every item *in either phase* (Caffe does
not look at the phase for mirroring). Whoever wants no mirroring at test time says
so explicitly with `mirror_in_test=False` (a Python keyword, see
`protonet.data.layers.configure_data_layers`); the default stays Caffe's.

The work is split so that it can run in parallel and on the device: `crop` picks the
window of one decoded (C, H, W) record and mirrors it (uint8 views, done by decode
threads), `collate` stacks a batch (the one copy), and `normalize` does the float
arithmetic for the whole batch with torch, on the CPU or on the GPU after a uint8
copy; a mirrored item subtracts the mirrored window of the mean, which is the same
arithmetic as Caffe's flip after subtraction. Random draws are taken up front, in
record order, so parallel decoding stays deterministic: the transformer's own
mt19937 (Caffe's `InitRand`, seeded from the main stream by `init_rand`) gives, per
record, a mirror word when `mirror` is set, then h and w words for a TRAIN crop, each
used `% n` as Caffe's `Rand(n)`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .. import rng
from ..errors import DataError, ProtonetError
from ..io.binary import read_binary
from ..io.weights import blob_shape, blob_to_array
from ..proto import caffe_pb2

TRAIN = caffe_pb2.TRAIN


@dataclass
class Crop:
    """The window of one record that goes into the batch, before any arithmetic."""
    pixels: np.ndarray      # (C, h, w) view on the decoded record, already mirrored
    h_off: int
    w_off: int
    mirror: bool


@dataclass
class Batch:
    """A batch on its way to the net: raw crops plus what `normalize` needs."""
    data: torch.Tensor               # (N, C, h, w); uint8/float32 raw, or normalized
    label: torch.Tensor | None       # (N,) float32
    offsets: torch.Tensor            # (N, 2) int64 crop offsets (h, w)
    mirror: torch.Tensor             # (N,) bool
    normalized: bool = False


def load_mean_file(path: str) -> np.ndarray:
    """A mean BlobProto as a (C, H, W) float32 array, read as Caffe's Blob::FromProto."""
    try:
        blob = read_binary(path, caffe_pb2.BlobProto())
        values = blob_to_array(blob, where=path)
    except ProtonetError as e:
        raise DataError(f"mean_file: {e}") from None
    dims = blob_shape(blob)
    # Caffe reads channels/height/width as the legacy axes 1..3 (1 where missing).
    legacy = [dims[i] if i < len(dims) else 1 for i in (1, 2, 3)]
    size = legacy[0] * legacy[1] * legacy[2]
    if len(dims) > 4 or values.size < size or size == 0:
        raise DataError(f"{path}: mean blob of shape {list(dims)} is not a "
                        "(1, C, H, W) image mean")
    return values.reshape(-1)[:size].reshape(legacy)


class DataTransformer:
    """Crop / mirror / mean / scale per Caffe's TransformationParameter."""

    def __init__(self, param: caffe_pb2.TransformationParameter, phase: int, *,
                 mirror_in_test: bool = True):
        if param.HasField("mean_file") and len(param.mean_value):
            raise DataError("transform_param: give mean_file or mean_value, not both")
        if param.force_color and param.force_gray:
            raise DataError("transform_param: force_color and force_gray are exclusive")
        self.crop_size = int(param.crop_size)
        self.scale = float(np.float32(param.scale))
        self.random_crop = phase == TRAIN and self.crop_size > 0
        self.phase = phase
        self.mirror_requested = bool(param.mirror)
        self.mirror_in_test = mirror_in_test
        self.force_color = bool(param.force_color)
        self.force_gray = bool(param.force_gray)
        self.mean_image = load_mean_file(param.mean_file) if param.HasField(
            "mean_file") else None
        self.mean_values = (np.asarray(param.mean_value, dtype=np.float32)
                            if len(param.mean_value) else None)
        self._rng: rng.CaffeRNG | None = None
        self._rng_ready = False
        self._device_means: dict[torch.device, torch.Tensor] = {}

    @property
    def mirror(self) -> bool:
        """Whether items get a mirror coin flip: Caffe's rule unless opted out in TEST."""
        return self.mirror_requested and (self.phase == TRAIN or self.mirror_in_test)

    @property
    def needs_rand(self) -> bool:
        return self.mirror_requested or self.random_crop

    def init_rand(self) -> None:
        """Caffe's DataTransformer::InitRand: a generator of its own, seeded with one
        word of the main stream, when mirror or a TRAIN crop needs one."""
        self._rng = rng.child() if self.needs_rand else None
        self._rng_ready = True

    # -- per record (decode threads) ------------------------------------------------
    def draw(self, count: int) -> np.ndarray:
        """Raw 32-bit draws (mirror, h, w) for `count` records, in record order: the
        words Caffe's Transform takes, mirror first (when `mirror`), then h and w
        (for a TRAIN crop); columns Caffe does not draw stay 0."""
        if not self._rng_ready:
            self.init_rand()
        out = np.zeros((count, 3), dtype=np.uint64)
        if self._rng is None:
            return out
        columns = [0] * self.mirror_requested + [1, 2] * self.random_crop
        words = self._rng.words(count * len(columns)).reshape(count, len(columns))
        out[:, columns] = words
        return out

    def output_shape(self, image_shape: Sequence[int], where: str) -> tuple[int, int, int]:
        """(C, h, w) of a transformed record (Caffe's InferBlobShape), checked."""
        self.check(image_shape, where)
        channels, height, width = image_shape
        if self.crop_size:
            return (channels, self.crop_size, self.crop_size)
        return (channels, height, width)

    def crop(self, image: np.ndarray, draw: np.ndarray, where: str) -> Crop:
        """Check one (C, H, W) record against the params and pick its window."""
        self.check(image.shape, where)
        _, height, width = image.shape
        crop = self.crop_size
        h_off = w_off = 0
        if crop:
            if self.random_crop:
                h_off = int(draw[1] % (height - crop + 1))
                w_off = int(draw[2] % (width - crop + 1))
            else:
                h_off, w_off = (height - crop) // 2, (width - crop) // 2
            image = image[:, h_off:h_off + crop, w_off:w_off + crop]
        mirror = self.mirror and bool(draw[0] % 2)
        return Crop(image[:, :, ::-1] if mirror else image, h_off, w_off, mirror)

    def check(self, shape: Sequence[int], where: str) -> None:
        channels, height, width = shape
        if channels <= 0:
            raise DataError(f"{where}: record has no channels")
        if height < self.crop_size or width < self.crop_size:
            raise DataError(f"{where}: {height}x{width} image is smaller than "
                            f"crop_size {self.crop_size}")
        if self.mean_image is not None and self.mean_image.shape != tuple(shape):
            raise DataError(f"{where}: image shape {list(shape)} differs from the "
                            f"mean_file's {list(self.mean_image.shape)}; the mean "
                            "must have the full (uncropped) image size")
        if self.mean_values is not None and len(self.mean_values) not in (1, channels):
            raise DataError(f"{where}: {len(self.mean_values)} mean_value entries for a "
                            f"{channels}-channel image; give 1 or {channels}")

    # -- per batch ----------------------------------------------------------------
    @staticmethod
    def collate(crops: Sequence[Crop], labels: Sequence[float] | None,
                names: Sequence[str]) -> Batch:
        """Stack same-shaped crops into a Batch (Caffe requires one shape per batch)."""
        first = crops[0].pixels.shape
        for crop, name in zip(crops, names):
            if crop.pixels.shape != first:
                raise DataError(f"{name}: shape {list(crop.pixels.shape)} differs from "
                                f"the batch's first record {list(first)}; without "
                                "crop_size every record of a batch needs one size")
        data = torch.from_numpy(np.stack([c.pixels for c in crops]))
        label = None if labels is None else torch.tensor(labels, dtype=torch.float32)
        offsets = torch.tensor([(c.h_off, c.w_off) for c in crops], dtype=torch.int64)
        mirror = torch.tensor([c.mirror for c in crops], dtype=torch.bool)
        return Batch(data, label, offsets, mirror)

    def normalize(self, batch: Batch) -> torch.Tensor:
        """(pixel - mean) * scale in float32 (the pixels arrive already mirrored), with
        torch on the batch's device."""
        mean = self._mean(batch, on_host=False)
        if mean is None:
            values = batch.data.to(torch.float32)
        else:
            values = torch.sub(batch.data, mean)        # float32: promotes the pixels
        if self.scale != 1.0:
            values.mul_(self.scale)
        return values

    def normalize_on_host(self, batch: Batch) -> torch.Tensor:
        """normalize() of a CPU batch with numpy, for the loader thread: numpy computes
        on the calling thread alone, while a torch op large enough to run in parallel
        there would start a second OpenMP thread team, which then contends with the
        net's for the cores. The same float32 operations, so the same values."""
        pixels = batch.data.numpy()
        mean = self._mean(batch, on_host=True)
        if mean is None:
            values = pixels.astype(np.float32)
        else:
            values = np.subtract(pixels, mean, dtype=np.float32)
        if self.scale != 1.0:
            values *= np.float32(self.scale)
        return torch.from_numpy(values)

    def _mean(self, batch: Batch, on_host: bool):
        """The mean each value subtracts, broadcastable to the batch: a numpy array
        (on_host), else a tensor on the batch's device."""
        if on_host:
            xp, offsets, mirror = np, batch.offsets.numpy(), batch.mirror.numpy()
            arange, place = np.arange, (lambda array: array)
        else:
            device = batch.data.device
            xp, offsets, mirror = torch, batch.offsets, batch.mirror
            arange = functools.partial(torch.arange, device=device)
            place = functools.partial(self._on_device, device=device)
        if self.mean_values is not None:
            return place(self.mean_values).reshape(1, -1, 1, 1)
        if self.mean_image is None:
            return None
        mean = place(self.mean_image)
        height, width = batch.data.shape[-2:]
        if not bool(mirror.any()) and bool((offsets == offsets[:1]).all()):
            h, w = (int(v) for v in offsets[0])
            return mean[:, h:h + height, w:w + width]
        # Each item's window of the mean, its columns reversed where it is mirrored.
        if not on_host:
            offsets, mirror = offsets.to(device), mirror.to(device)
        steps = xp.where(mirror[:, None], width - 1 - arange(width), arange(width))
        rows = offsets[:, :1] + arange(height)
        cols = offsets[:, 1:] + steps
        return mean[:, rows[:, :, None], cols[:, None, :]].swapaxes(0, 1)

    def _on_device(self, array: np.ndarray, device: torch.device) -> torch.Tensor:
        cached = self._device_means.get(device)
        if cached is None:
            cached = torch.from_numpy(array).to(device)
            self._device_means[device] = cached
        return cached
