"""Caffe's data layers: Data (LMDB/LevelDB), ImageData, MemoryData and WindowData,
and SegNet's DenseImageData (image / label-image pairs).

They reproduce Caffe master's batches: records in cursor (or list) order with
Caffe's wrap-around, the DataTransformer's arithmetic, and Caffe's checks turned
into DataErrors that name the layer and the file or record. Loading runs ahead on
a background thread (`data_param.prefetch` batches, Caffe's default 4), decoding
each batch on a thread pool; it starts at the first forward, so options set with
`configure` (or `configure_data_layers` for a whole net) apply from the first
batch on:

- `prefetch=False`: load each batch in `forward` instead (still thread-parallel),
- `workers=N`: decode threads per layer (0 or 1: decode on the loading thread),
- `mirror_in_test=False`: no mirror coin flips in the TEST phase. Caffe flips
  whenever `mirror: true`, whatever the phase; this is the explicit opt-out.

Whole-net helpers for a Net or NetModule: `configure_data_layers(net, ...)`,
`close_data_layers(net)` (stops the threads; collected layers and interpreter exit
do it too) and `set_input_arrays(net, data, labels)`, pycaffe's call for a net whose
first layer is MemoryData.

Deliberate departures: Caffe master's Data layer ignores `rand_skip`; we honour it
as ImageData does (and as Caffe's Data layer did before master), skipping
`rand() % rand_skip` records once at the start. `prefetch: 0`, with which Caffe
waits forever, is refused with an explanation.
"""
from __future__ import annotations

import logging
import math
import os
import weakref
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from ..errors import DataError
from ..layers.base import Layer
from ..layers.registry import register
from ..proto import caffe_pb2
from .datum import decode_datum, parse_datum, to_chw
from .imageset import read_image, read_image_list
from .lmdb_source import RecordCursor
from .prefetch import DecodePool, Loader, default_workers
from .. import rng
from .transformer import Batch, DataTransformer

log = logging.getLogger("protonet")


# --- batch sources (run on the loading thread; they never reference their layer) --

class _Source:
    """Makes batches; decodes the items of one batch on a thread pool."""

    def __init__(self, batch_size: int, transformer: DataTransformer):
        self.batch_size = batch_size
        self.transformer = transformer
        self.workers = default_workers()
        self._pool: DecodePool | None = None

    def map(self, function: Callable, items: Iterable) -> list:
        if self.workers <= 1:
            return list(map(function, items))
        if self._pool is None:
            self._pool = DecodePool(self.workers, "protonet-decode")
        return self._pool.map(function, items)

    def next_batch(self) -> Batch:
        raise NotImplementedError

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None


class _DatumSource(_Source):
    """Datum records of an LMDB/LevelDB in key order (Caffe's DataLayer)."""

    def __init__(self, path: str, backend: int, batch_size: int,
                 transformer: DataTransformer, skip: int, with_label: bool,
                 shard: tuple[int, int] = (0, 1)):
        super().__init__(batch_size, transformer)
        self.path, self.backend, self.skip, self.with_label = path, backend, skip, with_label
        # Data-parallel training: record i of the endless walk (rand_skip included)
        # is worker i % workers's (Caffe's DataLayer::Skip).
        self.shard_rank, self.shard_count = shard
        self.offset = 0
        self._cursor: RecordCursor | None = None
        self._warned = False
        probe = RecordCursor(path, backend)
        try:
            record = probe.peek()
            first, _ = self._decode(record)
            encoded = parse_datum(record[1], self._where(record[0])).encoded
        finally:
            probe.close()
        if not encoded:     # raw pixels: decoding is a copy, cheaper than a thread handoff
            self.workers = 1
        self.item_shape = transformer.output_shape(first.shape, self._where(record[0]))

    def _where(self, key: bytes) -> str:
        return f"{self.path} record '{key.decode('utf-8', 'replace')}'"

    def _decode(self, record: tuple[bytes, bytes]) -> tuple[np.ndarray, float]:
        where = self._where(record[0])
        datum = parse_datum(record[1], where)
        t = self.transformer
        if not datum.encoded and (t.force_color or t.force_gray) and not self._warned:
            self._warned = True
            log.warning("%s: force_color/force_gray only apply to encoded records "
                        "(Caffe ignores them for raw ones too)", where)
        return decode_datum(datum, where, t.force_color, t.force_gray), float(datum.label)

    def _item(self, job):
        record, draw = job
        image, label = self._decode(record)
        return self.transformer.crop(image, draw, self._where(record[0])), label

    def next_batch(self) -> Batch:
        if self._cursor is None:
            self._cursor = RecordCursor(self.path, self.backend)
            self._cursor.skip(self.skip)
            self.offset = self.skip
        records = [self._take() for _ in range(self.batch_size)]
        items = self.map(self._item, zip(records, self.transformer.draw(len(records))))
        crops, labels = zip(*items)
        return self.transformer.collate(crops, labels if self.with_label else None,
                                        [self._where(k) for k, _ in records])

    def _take(self) -> tuple[bytes, bytes]:
        while self.offset % self.shard_count != self.shard_rank:
            self._cursor.next()
            self.offset += 1
        self.offset += 1
        return self._cursor.next()

    def close(self) -> None:
        super().close()
        if self._cursor is not None:
            self._cursor.close()
            self._cursor = None


class _ImageListSource(_Source):
    """Image files from a '<path> <label>' list (Caffe's ImageDataLayer)."""

    def __init__(self, p: caffe_pb2.ImageDataParameter, transformer: DataTransformer,
                 rand_skip: Callable[[int], int]):
        super().__init__(p.batch_size, transformer)
        self.list_path, self.root = p.source, p.root_folder
        self.size = (p.new_height, p.new_width)
        self.is_color = p.is_color
        self.entries = self.read_list(p.source)
        # Caffe's order: the shuffle's own generator is seeded, the list shuffled
        # (caffe::shuffle), then rand_skip drawn; each epoch reshuffles.
        self._rng = rng.child() if p.shuffle else None
        if self._rng is not None:
            self._rng.shuffle(self.entries)
        skip = rand_skip(p.rand_skip)
        if skip >= len(self.entries):
            raise DataError(f"{p.source}: rand_skip drew {skip}, but the list has only "
                            f"{len(self.entries)} images")
        self.position = skip
        self.item_shape = self.first_shape(self.entries[skip])

    read_list = staticmethod(read_image_list)

    def first_shape(self, first) -> tuple[int, int, int]:
        return self.transformer.output_shape(self._read(first).shape, self.root + first[0])

    def _read(self, entry: tuple[str, int]) -> np.ndarray:
        try:
            image = read_image(self.root + entry[0], *self.size, self.is_color)
        except DataError as e:
            raise DataError(f"{self.list_path}: entry '{entry[0]}': {e}") from None
        return to_chw(image, self.root + entry[0])

    def _take(self) -> tuple[str, int]:
        entry = self.entries[self.position]
        self.position += 1
        if self.position == len(self.entries):
            self.position = 0
            if self._rng is not None:
                self._rng.shuffle(self.entries)
        return entry

    def _item(self, job):
        entry, draw = job
        return self.transformer.crop(self._read(entry), draw, self.root + entry[0]), \
            float(entry[1])

    def next_batch(self) -> Batch:
        entries = [self._take() for _ in range(self.batch_size)]
        items = self.map(self._item, zip(entries, self.transformer.draw(len(entries))))
        crops, labels = zip(*items)
        return self.transformer.collate(crops, labels,
                                        [self.root + name for name, _ in entries])


def read_pair_list(path: str) -> list[tuple[str, str]]:
    """'<image> <label image>' pairs, read as whitespace-separated words the way SegNet's
    `infile >> image >> label` loop does (a dangling last word is dropped)."""
    try:
        with open(path, "rb") as f:
            words = f.read().split()
    except FileNotFoundError:
        raise DataError(f"{path}: image list not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the image list ({e.strerror})") from None
    pairs = [(os.fsdecode(words[i]), os.fsdecode(words[i + 1]))
             for i in range(0, len(words) - 1, 2)]
    if not pairs:
        raise DataError(f"{path}: the list holds no '<image> <label image>' pair")
    return pairs


class _DenseImageListSource(_ImageListSource):
    """Image and label-image pairs (SegNet's DenseImageDataLayer): the label image is
    read as one gray channel, resized nearest-neighbour, mirrored and cropped with its
    image, and goes to the top untransformed (no mean, no scale)."""

    read_list = staticmethod(read_pair_list)

    def __init__(self, p, transformer: DataTransformer, rand_skip: Callable[[int], int]):
        self.crop_size = (p.crop_height, p.crop_width) if p.crop_height > 0 else None
        self.mirror = bool(p.mirror)
        # ENet's caffe: labels at 1/factor of the image size (for its encoder stage).
        self.label_factor = max(1, int(p.label_divide_factor))
        if self.label_factor > 1 and self.crop_size:
            raise DataError("label_divide_factor > 1 cannot go with crop_height/crop_width "
                            "(the crop window would not fit the smaller label image)")
        # The fork draws (rand() % 2 to mirror, then the crop's row and column offsets)
        # per item; here up front per batch, in item order, so decoding may run in parallel.
        self._draws = rng.child() if self.mirror or self.crop_size else None
        super().__init__(p, transformer, rand_skip)

    def first_shape(self, first) -> tuple[int, int, int]:
        channels, height, width = self._read(first).shape
        if self.crop_size:
            self._check_crop(height, width, self.root + first[0])
            height, width = self.crop_size
        return self.transformer.output_shape((channels, height, width), self.root + first[0])

    def _check_crop(self, height: int, width: int, where: str) -> None:
        if height < self.crop_size[0] or width < self.crop_size[1]:
            raise DataError(f"{where}: {height}x{width} image is smaller than crop_height x "
                            f"crop_width {self.crop_size[0]}x{self.crop_size[1]}")

    def _label(self, entry: tuple[str, str]) -> np.ndarray:
        path = self.root + entry[1]
        size = [side // self.label_factor for side in self.size]
        try:
            image = read_image(path, *size, is_color=False, nearest=True)
        except DataError as e:
            raise DataError(f"{self.list_path}: label image '{entry[1]}': {e}") from None
        return to_chw(image, path)

    def _item(self, job):
        entry, draw = job
        where = self.root + entry[0]
        image, label = self._read(entry), self._label(entry)
        expected = tuple(side // self.label_factor for side in image.shape[1:])
        if label.shape[1:] != expected:
            factor = f" / label_divide_factor {self.label_factor}" \
                if self.label_factor > 1 else ""
            raise DataError(f"{where}: image is {image.shape[1]}x{image.shape[2]} but its "
                            f"label image '{entry[1]}' is {label.shape[1]}x{label.shape[2]}; "
                            f"they must match{factor}")
        if self.mirror and draw[0] % 2:
            image, label = image[:, :, ::-1], label[:, :, ::-1]
        if self.crop_size:
            height, width = image.shape[1:]
            self._check_crop(height, width, where)
            crop_h, crop_w = self.crop_size
            h_off = int(draw[1] % (height - crop_h + 1))
            w_off = int(draw[2] % (width - crop_w + 1))
            image = image[:, h_off:h_off + crop_h, w_off:w_off + crop_w]
            label = label[:, h_off:h_off + crop_h, w_off:w_off + crop_w]
        return self.transformer.crop(image, _NO_DRAW, where), label

    def next_batch(self) -> Batch:
        entries = [self._take() for _ in range(self.batch_size)]
        draws = (self._draws.words(3 * len(entries)).astype(np.uint64).reshape(-1, 3)
                 if self._draws is not None else np.zeros((len(entries), 3), np.uint64))
        items = self.map(self._item, zip(entries, draws))
        crops, labels = zip(*items)
        batch = self.transformer.collate(crops, None, [self.root + e[0] for e in entries])
        batch.label = torch.from_numpy(np.stack(labels).astype(np.float32))
        return batch


_NO_DRAW = np.zeros(3, dtype=np.uint64)


# --- the prefetching layers --------------------------------------------------------

class PrefetchingDataLayer(Layer):
    """Shared life cycle: a batch source made in setup, a Loader from the first forward."""
    exact_bottoms = 0

    def __init__(self, param: caffe_pb2.LayerParameter, phase: int = caffe_pb2.TEST):
        super().__init__(param, phase)
        self.prefetch = True
        self.workers: int | None = None
        self.source: _Source | None = None
        self._loader: Loader | None = None
        self._closed = False

    def configure(self, *, prefetch: bool | None = None, workers: int | None = None,
                  mirror_in_test: bool | None = None) -> None:
        """Loading options (see the module docstring); only before the first forward."""
        if self._loader is not None:
            raise self.error("configure data layers before their first forward")
        if prefetch is not None:
            self.prefetch = bool(prefetch)
        if workers is not None:
            self.workers = max(0, int(workers))
        if mirror_in_test is not None and self.source is not None:
            self.source.transformer.mirror_in_test = bool(mirror_in_test)

    def setup(self, bottom_shapes):
        depth = self.param.data_param.prefetch
        if depth < 1:
            raise self.error("data_param.prefetch must be at least 1 (with 0 Caffe "
                             "waits forever); use configure(prefetch=False) to load "
                             "batches synchronously")
        # Caffe's draws from the main stream, in its order: BaseDataLayer::LayerSetUp
        # seeds the transformer, DataLayerSetUp draws what the layer needs (shuffle
        # seed, rand_skip), BasePrefetchingDataLayer::LayerSetUp seeds the
        # transformer again (that generator is the one used) and StartInternalThread
        # draws the loading thread's seed (which no stock layer's loading uses).
        try:
            self.transformer = DataTransformer(self.param.transform_param, self.phase)
            self.transformer.init_rand()
            self.source = self.make_source()
        except DataError as e:
            raise self.located(e) from None
        self.transformer.init_rand()
        self.thread_seed = rng.child_seed()

    def make_source(self) -> _Source:
        raise NotImplementedError

    def make_transformer(self) -> DataTransformer:
        """The transformer setup made (Caffe's data_transformer_)."""
        return self.transformer

    def reshape(self, bottom_shapes):
        batch = self.source.batch_size
        return [(batch, *self.source.item_shape), (batch,)][:self.num_tops]

    def forward(self):
        if self._closed:
            raise self.error("is closed; build the net again to read more batches")
        if self._loader is None:
            self._loader = self._start()
        try:
            data, label = self._loader.next(self.device)
        except DataError as e:
            raise self.located(e) from None
        return [data, label] if self.num_tops == 2 else data

    def _start(self) -> Loader:
        source = self.source
        if self.workers is not None:
            source.workers = self.workers
        loader = Loader(source.next_batch, source.transformer, self.device,
                        self.param.data_param.prefetch, self.prefetch,
                        name=f"protonet-prefetch-{self.layer_name}")
        # A collected layer stops its threads; at exit prefetch.close_all_loaders does.
        weakref.finalize(self, _shut_down, loader, source).atexit = False
        return loader

    def close(self) -> None:
        """Stop the loading threads and close the files; forward fails after this."""
        self._closed = True
        if self._loader is not None:
            _shut_down(self._loader, self.source)
        elif self.source is not None:
            self.source.close()

    def located(self, error: DataError) -> DataError:
        return DataError(f"layer '{self.layer_name}' ({self.type}): {error}")

    def positive_batch_size(self, value: int, field: str) -> int:
        if value <= 0:
            raise self.error(f"{field} must be positive, got {value}")
        return value

    def rand_skip(self, limit: int) -> int:
        """Caffe's `caffe_rng_rand() % rand_skip`, from the main stream."""
        return rng.rand_mod(limit)


def _shut_down(loader: Loader, source: _Source) -> None:
    loader.close()
    source.close()


@register("Data")
class Data(PrefetchingDataLayer):
    """Datum records from an LMDB (or LevelDB through plyvel), cursor order, wrapping."""
    min_tops = 1
    max_tops = 2

    def make_source(self) -> _Source:
        p = self.param.data_param
        batch = self.positive_batch_size(p.batch_size, "data_param.batch_size")
        from ..solver.distributed import data_shard
        return _DatumSource(p.source, p.backend, batch, self.make_transformer(),
                            self.rand_skip(p.rand_skip), self.num_tops == 2,
                            data_shard(self.phase))


@register("ImageData")
class ImageData(PrefetchingDataLayer):
    """Images listed in a text file, read with OpenCV and optionally resized."""
    exact_tops = 2

    def make_source(self) -> _Source:
        p = self.param.image_data_param
        if (p.new_height > 0) != (p.new_width > 0):
            raise self.error("set new_height and new_width together (or neither)")
        self.positive_batch_size(p.batch_size, "image_data_param.batch_size")
        return _ImageListSource(p, self.make_transformer(), self.rand_skip)


@register("DenseImageData")
class DenseImageData(PrefetchingDataLayer):
    """SegNet's data layer (alexgkendall/caffe-segnet dense_image_data_layer.cpp; ENet's
    caffe adds label_divide_factor, labels read at new_height/f x new_width/f):
    '<image> <label image>' lines, tops data (N, C, h, w) and label (N, 1, h, w). Its own mirror / crop_height / crop_width move image and label
    together; transform_param's mirror and crop_size, which would move the image alone,
    are refused as the fork refuses them. With batch_size 1 and no resize or crop each
    batch keeps its image's size, as in the fork."""
    exact_tops = 2

    def make_source(self) -> _Source:
        p = self.param.dense_image_data_param
        if (p.new_height > 0) != (p.new_width > 0):
            raise self.error("set new_height and new_width together (or neither)")
        if (p.crop_height > 0) != (p.crop_width > 0):
            raise self.error("set crop_height and crop_width together (or neither)")
        t = self.param.transform_param
        if t.mirror or t.crop_size:
            raise self.error("transform_param mirror and crop_size would move the image "
                             "without its label image; use dense_image_data_param's mirror, "
                             "crop_height and crop_width")
        self.positive_batch_size(p.batch_size, "dense_image_data_param.batch_size")
        return _DenseImageListSource(p, self.make_transformer(), self.rand_skip)

    def reshape(self, bottom_shapes):
        batch, factor = self.source.batch_size, self.source.label_factor
        channels, height, width = self.source.item_shape
        return [(batch, channels, height, width),
                (batch, 1, height // factor, width // factor)]


@register("MemoryData")
class MemoryData(Layer):
    """Batches sliced from arrays handed over with `set_input_arrays` (pycaffe's).

    As in Caffe, the arrays are used in place (later edits to them show), they are
    not transformed (transform_param is ignored, with a warning), the label top
    comes out as (N, 1, 1, 1), and the position wraps after the last full batch.
    """
    exact_bottoms = 0
    exact_tops = 2

    def setup(self, bottom_shapes):
        p = self.param.memory_data_param
        self.batch_size = p.batch_size
        self.item_shape = (p.channels, p.height, p.width)
        if self.batch_size * math.prod(self.item_shape) <= 0:
            raise self.error("batch_size, channels, height and width must be given and "
                             "positive in memory_data_param")
        self._data: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self._position = 0
        t = self.param.transform_param
        if t.mirror or (self.phase == caffe_pb2.TRAIN and t.crop_size):
            rng.child_seed()    # BaseDataLayer::InitRand's draw, though nothing is transformed

    def reshape(self, bottom_shapes):
        return [(self.batch_size, *self.item_shape), (self.batch_size,)]

    def set_input_arrays(self, data: np.ndarray, labels: np.ndarray) -> None:
        """Feed (N, C, H, W) float32 data and N float32 labels, N a multiple of batch_size."""
        labels = np.asarray(labels)
        if labels.ndim == 1:
            labels = np.ascontiguousarray(labels[:, None, None, None])
        self._check_array(data, "data", self.item_shape)
        self._check_array(labels, "labels", (1, 1, 1))
        if data.shape[0] != labels.shape[0]:
            raise self.data_error(f"data has {data.shape[0]} items but labels "
                                  f"{labels.shape[0]}")
        if data.shape[0] == 0 or data.shape[0] % self.batch_size:
            raise self.data_error(f"{data.shape[0]} items is not a positive multiple "
                                  f"of batch_size {self.batch_size}")
        if self.param.HasField("transform_param"):
            log.warning("layer '%s': MemoryData does not transform arrays given to "
                        "set_input_arrays (as in Caffe)", self.layer_name)
        self._data, self._labels = torch.from_numpy(data), torch.from_numpy(labels)
        self._position = 0

    def _check_array(self, array, name: str, item_shape: Sequence[int]) -> None:
        if not isinstance(array, np.ndarray) or array.dtype != np.float32 or \
                not array.flags.c_contiguous:
            raise self.data_error(f"{name} must be a C-contiguous float32 numpy "
                                  "array (it is used in place, as in Caffe)")
        if array.ndim != 4 or tuple(array.shape[1:]) != tuple(item_shape):
            raise self.data_error(f"{name} has shape {list(array.shape)}; expected "
                                  f"(N, {', '.join(map(str, item_shape))})")

    def forward(self):
        if self._data is None:
            raise self.data_error("no data yet: call set_input_arrays first")
        start, end = self._position, self._position + self.batch_size
        self._position = end % self._data.shape[0]
        return [self._data[start:end].to(self.device),
                self._labels[start:end].to(self.device)]

    def data_error(self, message: str) -> DataError:
        return DataError(f"layer '{self.layer_name}' ({self.type}): {message}")


# --- WindowData ------------------------------------------------------------------

_WINDOW_FIELDS = 6   # label overlap x1 y1 x2 y2


def read_window_file(path: str, root: str, fg_threshold: float, bg_threshold: float):
    """R-CNN window file -> (images [(path, channels)], fg windows, bg windows).

    A window is (image index, label, x1, y1, x2, y2); background windows get label 0.
    """
    try:
        with open(path) as f:
            tokens = f.read().split()
    except OSError as e:
        raise DataError(f"{path}: cannot read the window file ({e.strerror})") from None
    if not tokens:
        raise DataError(f"{path}: the window file is empty")
    images, fg, bg = [], [], []
    at = 0

    def take(count: int) -> list[str]:
        nonlocal at
        if at + count > len(tokens):
            raise DataError(f"{path}: ends in the middle of an image entry")
        at += count
        return tokens[at - count:at]

    try:
        while at < len(tokens):
            hashtag, index, name, channels, _, _, count = take(7)
            if hashtag != "#":
                raise DataError(f"{path}: expected '#' to start image entry "
                                f"{len(images)}, found '{hashtag}'")
            images.append((root + name, int(channels)))
            for _ in range(int(count)):
                label, overlap, *box = take(_WINDOW_FIELDS)
                overlap = np.float32(overlap)
                window = (int(index), int(label), *map(int, box))
                if overlap >= np.float32(fg_threshold):
                    if window[1] <= 0:
                        raise DataError(f"{path}: foreground window of image {index} "
                                        f"has label {window[1]}; it must be > 0")
                    fg.append(window)
                elif overlap < np.float32(bg_threshold):
                    bg.append((window[0], 0, *window[2:]))
    except ValueError as e:
        raise DataError(f"{path}: malformed number ({e})") from None
    return images, fg, bg


def _c_round(value) -> int:
    """C's round(): halves away from zero."""
    return int(math.copysign(math.floor(abs(float(value)) + 0.5), float(value)))


class _WindowSource(_Source):
    """Foreground/background windows warped to crop_size (Caffe's WindowDataLayer)."""

    def __init__(self, p: caffe_pb2.WindowDataParameter, transformer: DataTransformer):
        super().__init__(p.batch_size, transformer)
        self.images, self.fg, self.bg = read_window_file(
            p.source, p.root_folder, p.fg_threshold, p.bg_threshold)
        channels = self.images[-1][1]
        if channels != 3:
            raise DataError(f"{p.source}: images are read in color (3 channels); the "
                            f"window file says {channels}")
        if not self.fg or not self.bg:
            raise DataError(f"{p.source}: needs foreground and background windows "
                            f"(has {len(self.fg)} and {len(self.bg)})")
        self.crop = transformer.crop_size
        self.item_shape = (channels, self.crop, self.crop)
        self.scale = np.float32(p.scale)
        self.context_pad = p.context_pad
        self.square = p.crop_mode == "square"
        self.num_fg = int(np.float32(p.batch_size) * np.float32(p.fg_fraction))
        self.cache = [self._file_bytes(path) for path, _ in self.images] \
            if p.cache_images else None
        # PrefetchRand's generator, seeded in DataLayerSetUp (crop_size is required).
        self._rng = rng.child()
        means = transformer.mean_values
        if means is not None and len(means) not in (1, channels):
            raise DataError(f"{len(means)} mean_value entries for {channels} channels; "
                            f"give 1 or {channels}")

    @staticmethod
    def _file_bytes(path: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise DataError(f"{path}: cannot read the image ({e.strerror})") from None

    def _image(self, index: int) -> np.ndarray:
        import cv2  # loaded on first use (raw records never need it)
        if not 0 <= index < len(self.images):
            raise DataError(f"window refers to image {index}; the file lists "
                            f"{len(self.images)}")
        path = self.images[index][0]
        if self.cache is None:
            return read_image(path)
        image = cv2.imdecode(np.frombuffer(self.cache[index], np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise DataError(f"{path}: could not decode the cached image")
        return image

    def next_batch(self) -> Batch:
        jobs = []
        for windows, count in ((self.bg, self.batch_size - self.num_fg),
                               (self.fg, self.num_fg)):
            for _ in range(count):
                window = windows[self._rng.rand() % len(windows)]
                # Caffe draws the coin whenever mirror is set; mirror_in_test=False
                # only ignores it.
                coin = self.transformer.mirror_requested and bool(self._rng.rand() % 2)
                mirror = coin and self.transformer.mirror
                jobs.append((window, mirror))
        data = torch.from_numpy(np.stack(self.map(self._warp, jobs)))
        labels = torch.tensor([float(w[1]) for w, _ in jobs], dtype=torch.float32)
        count = len(jobs)
        return Batch(data, labels, torch.zeros(count, 2, dtype=torch.int64),
                     torch.zeros(count, dtype=torch.bool), normalized=True)

    def _warp(self, job) -> np.ndarray:
        import cv2  # loaded on first use (raw records never need it)
        (index, _, x1, y1, x2, y2), mirror = job
        image = self._image(index)
        size = (self.crop, self.crop)   # (height, width) the window is warped to
        pad_h = pad_w = 0
        if self.context_pad > 0 or self.square:
            x1, y1, x2, y2, size, pad_h, pad_w = self._context(image.shape, x1, y1,
                                                               x2, y2, mirror)
        where = f"{self.images[index][0]} window ({x1}, {y1}, {x2}, {y2})"
        if x1 < 0 or y1 < 0 or x2 >= image.shape[1] or y2 >= image.shape[0] or \
                x2 < x1 or y2 < y1 or min(size) <= 0:
            raise DataError(f"{where}: outside the {image.shape[1]}x{image.shape[0]} "
                            "image or empty after warping")
        warped = cv2.resize(image[y1:y2 + 1, x1:x2 + 1], (size[1], size[0]),
                            interpolation=cv2.INTER_LINEAR)
        if mirror:
            warped = warped[:, ::-1]
        out = np.zeros((3, self.crop, self.crop), dtype=np.float32)
        values = to_chw(warped, where).astype(np.float32)
        mean = self._mean(size, pad_h, pad_w, where)
        if mean is not None:
            values = values - mean
        out[:, pad_h:pad_h + size[0], pad_w:pad_w + size[1]] = values * self.scale
        return out

    def _context(self, shape, x1, y1, x2, y2, mirror):
        """The window grown by context_pad (and squared), clipped to the image."""
        f32 = np.float32
        crop = f32(self.crop)
        context_scale = crop / f32(self.crop - 2 * self.context_pad)
        half_h, half_w = f32((y2 - y1 + 1) / 2.0), f32((x2 - x1 + 1) / 2.0)
        center_x, center_y = f32(x1) + half_w, f32(y1) + half_h
        if self.square:
            half_h = half_w = max(half_h, half_w)
        x1 = _c_round(center_x - half_w * context_scale)
        x2 = _c_round(center_x + half_w * context_scale)
        y1 = _c_round(center_y - half_h * context_scale)
        y2 = _c_round(center_y + half_h * context_scale)
        unclipped_h, unclipped_w = y2 - y1 + 1, x2 - x1 + 1
        pad_x1, pad_y1 = max(0, -x1), max(0, -y1)
        pad_x2, pad_y2 = max(0, x2 - shape[1] + 1), max(0, y2 - shape[0] + 1)
        x1, x2, y1, y2 = x1 + pad_x1, x2 - pad_x2, y1 + pad_y1, y2 - pad_y2
        scale_x, scale_y = crop / f32(unclipped_w), crop / f32(unclipped_h)
        height = _c_round(f32(y2 - y1 + 1) * scale_y)
        width = _c_round(f32(x2 - x1 + 1) * scale_x)
        pad_h = _c_round(f32(pad_y1) * scale_y)
        pad_w = _c_round(f32(pad_x2 if mirror else pad_x1) * scale_x)
        height = min(height, self.crop - pad_h)
        width = min(width, self.crop - pad_w)
        return x1, y1, x2, y2, (height, width), pad_h, pad_w

    def _mean(self, size, pad_h: int, pad_w: int, where: str) -> np.ndarray | None:
        t = self.transformer
        if t.mean_values is not None:
            return t.mean_values.reshape(-1, 1, 1)
        if t.mean_image is None:
            return None
        mean = t.mean_image
        offset = int((mean.shape[2] - self.crop) / 2)   # C division; width for both axes
        top, left = offset + pad_h, offset + pad_w
        if top < 0 or left < 0 or top + size[0] > mean.shape[1] or \
                left + size[1] > mean.shape[2]:
            raise DataError(f"{where}: the mean_file ({list(mean.shape)}) is too small "
                            f"for crop_size {self.crop}")
        return mean[:, top:top + size[0], left:left + size[1]]


@register("WindowData")
class WindowData(PrefetchingDataLayer):
    """R-CNN style: fg_fraction foreground windows per batch, warped to crop_size."""
    exact_tops = 2

    def make_source(self) -> _Source:
        p = self.param.window_data_param
        self.positive_batch_size(p.batch_size, "window_data_param.batch_size")
        transformer = self.make_transformer()
        if transformer.crop_size <= 0:
            raise self.error("needs transform_param.crop_size > 0 (the warp size)")
        return _WindowSource(p, transformer)


# --- whole-net helpers -------------------------------------------------------------

def _layers(net) -> list:
    return list(getattr(net, "module", net).layers)


def configure_data_layers(net, **options) -> list[str]:
    """`configure(**options)` on every prefetching data layer of a Net or NetModule;
    returns their names. E.g. `configure_data_layers(net, mirror_in_test=False)`."""
    names = []
    for layer in _layers(net):
        if isinstance(layer, PrefetchingDataLayer):
            layer.configure(**options)
            names.append(layer.layer_name)
    return names


def close_data_layers(net) -> None:
    """Stop the loading threads of every data layer of a Net or NetModule."""
    for layer in _layers(net):
        if isinstance(layer, PrefetchingDataLayer):
            layer.close()


def set_input_arrays(net, data: np.ndarray, labels: np.ndarray) -> None:
    """pycaffe's Net.set_input_arrays: feed the net's first layer, a MemoryData."""
    layers = _layers(net)
    if not layers or not isinstance(layers[0], MemoryData):
        raise DataError("set_input_arrays needs a net whose first layer is MemoryData")
    layers[0].set_input_arrays(data, labels)
