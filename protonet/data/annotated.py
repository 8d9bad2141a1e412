"""SSD's AnnotatedData layer: images and their boxes from an LMDB of AnnotatedDatum.

As Wei Liu's fork (weiliu89/caffe `ssd`: annotated_data_layer.cpp, data_transformer.cpp,
util/sampler.cpp, util/bbox_util.cpp, util/im_transforms.cpp) makes a batch: for each
record, the photometric distortion (distort_param: brightness, contrast, saturation,
hue, channel order; encoded records only, as in the fork) and the expansion
(expand_param: the image placed on a larger canvas of the mean colour, or of the
fork's filler byte 32 for raw records), each re-encoded as JPEG for encoded records;
then the batch
samplers propose crops (scale and aspect ratio drawn uniformly, kept when they meet
their SampleConstraint against any object: Jaccard overlap, sample or object
coverage), one of the proposals is picked at random and the image cropped to it (an
encoded image is re-encoded as JPEG, as the fork does) with its boxes projected into
the crop (dropped by the emit constraint or when nothing is left); then the
transform: resize_param's WARP resize (interpolation drawn among interp_mode),
crop_size (random in TRAIN, centered in TEST), mirror with boxes flipped, mean and
scale. Tops: data [N, C, H, W] and label [1, 1, G, 8] rows of [item, group label,
instance id, xmin, ymin, xmax, ymax, difficult] (one row of -1 when the batch has no
box); records without an annotation type give the Datum's label per item instead.

Random draws come from protonet's seeded generator (protonet.set_random_seed), not
Caffe's stream, so crops are the fork's in kind, not draw for draw. noise_param and
the FIT_* resize modes are refused by name.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import DataError
from ..layers.registry import register
from ..proto import caffe_pb2
from .datum import decode_datum, decode_image_bytes
from .layers import PrefetchingDataLayer, _DatumSource, _Source
from .lmdb_source import RecordCursor
from .transformer import Batch, DataTransformer
from .. import rng

RESIZE = caffe_pb2.ResizeParameter
# The fork's ResizeParameter interp_mode -> OpenCV's interpolation flag (OpenCV's own
# numbering; cv2 itself loads on first use, as only image datasets need it).
INTERPOLATION = {RESIZE.LINEAR: 1, RESIZE.AREA: 3, RESIZE.NEAREST: 0, RESIZE.CUBIC: 2,
                 RESIZE.LANCZOS4: 4}
EMIT = caffe_pb2.EmitConstraint


# -- boxes (plain floats; a record holds a handful) -------------------------------------------
def _size(b) -> float:
    return 0.0 if b[2] < b[0] or b[3] < b[1] else (b[2] - b[0]) * (b[3] - b[1])


def _intersection(a, b):
    if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
        return (0.0, 0.0, 0.0, 0.0)
    return (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))


def jaccard(a, b) -> float:
    inter = _intersection(a, b)
    w, h = inter[2] - inter[0], inter[3] - inter[1]
    if w <= 0 or h <= 0:
        return 0.0
    return w * h / (_size(a) + _size(b) - w * h)


def coverage(a, b) -> float:
    """The fork's BBoxCoverage: the share of a that b covers."""
    inter = _intersection(a, b)
    size = _size(inter)
    return size / _size(a) if size > 0 else 0.0


def clip(b):
    return tuple(min(max(v, 0.0), 1.0) for v in b)


def project(source, b):
    """The fork's ProjectBBox: b in source's coordinates, clipped; None when empty."""
    if b[0] >= source[2] or b[2] <= source[0] or b[1] >= source[3] or b[3] <= source[1]:
        return None
    w, h = source[2] - source[0], source[3] - source[1]
    out = clip(((b[0] - source[0]) / w, (b[1] - source[1]) / h,
                (b[2] - source[0]) / w, (b[3] - source[1]) / h))
    return out if _size(out) > 0 else None


def satisfies(sample, objects, constraint) -> bool:
    """The fork's SatisfySampleConstraint, its loop kept as is."""
    has = constraint.HasField
    jac = has("min_jaccard_overlap") or has("max_jaccard_overlap")
    cov = has("min_sample_coverage") or has("max_sample_coverage")
    obj = has("min_object_coverage") or has("max_object_coverage")
    if not (jac or cov or obj):
        return True
    found = False
    for box in objects:
        if jac:
            value = jaccard(sample, box)
            if has("min_jaccard_overlap") and value < constraint.min_jaccard_overlap:
                continue
            if has("max_jaccard_overlap") and value > constraint.max_jaccard_overlap:
                continue
            found = True
        if cov:
            value = coverage(sample, box)
            if has("min_sample_coverage") and value < constraint.min_sample_coverage:
                continue
            if has("max_sample_coverage") and value > constraint.max_sample_coverage:
                continue
            found = True
        if obj:
            value = coverage(box, sample)
            if has("min_object_coverage") and value < constraint.min_object_coverage:
                continue
            if has("max_object_coverage") and value > constraint.max_object_coverage:
                continue
            found = True
        if found:
            return True
    return found


def sample_box(sampler, rng: np.random.Generator):
    """The fork's SampleBBox: a crop of uniform scale and aspect ratio (in float32, as
    the fork computes it, so that a scale of 1 gives exactly the whole image)."""
    f32 = np.float32
    scale = f32(rng.uniform(sampler.min_scale, sampler.max_scale))
    ratio = f32(rng.uniform(sampler.min_aspect_ratio, sampler.max_aspect_ratio))
    ratio = min(max(ratio, f32(scale * scale)), f32(1 / (scale * scale)))
    root = f32(math.sqrt(ratio))
    width, height = f32(scale * root), f32(scale / root)
    x = f32(rng.uniform(0.0, max(0.0, float(f32(1) - width))))
    y = f32(rng.uniform(0.0, max(0.0, float(f32(1) - height))))
    return (float(x), float(y), float(x + width), float(y + height))


def generate_samples(samplers, objects, rng) -> list:
    """The fork's GenerateBatchSamples over the whole image."""
    found_all = []
    for batch_sampler in samplers:
        if not batch_sampler.use_original_image:
            continue
        found = 0
        for _ in range(batch_sampler.max_trials):
            if batch_sampler.HasField("max_sample") and found >= batch_sampler.max_sample:
                break
            box = sample_box(batch_sampler.sampler, rng)
            if satisfies(box, objects, batch_sampler.sample_constraint):
                found += 1
                found_all.append(box)
    return found_all


def check_sampler(layer, batch_sampler) -> None:
    s = batch_sampler.sampler
    if not (0 < s.min_scale <= s.max_scale <= 1):
        layer_error = f"sampler scales must satisfy 0 < min_scale <= max_scale <= 1, got " \
                      f"{s.min_scale}, {s.max_scale}"
        raise layer.error(layer_error)
    if not (0 < s.min_aspect_ratio <= s.max_aspect_ratio):
        raise layer.error(f"sampler aspect ratios must satisfy 0 < min <= max, got "
                          f"{s.min_aspect_ratio}, {s.max_aspect_ratio}")



# -- photometric distortion and expansion (util/im_transforms.cpp, ExpandImage) ---------------
def _convert(image: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """OpenCV's convertTo on uint8: saturate(round(alpha * v + beta))."""
    values = image.astype(np.float32) * np.float32(alpha) + np.float32(beta)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _hsv_channel(image: np.ndarray, channel: int, alpha: float, beta: float) -> np.ndarray:
    import cv2  # loaded on first use (raw records never need it)
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
    hsv[:, :, channel] = _convert(hsv[:, :, channel], alpha, beta)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def distort(image: np.ndarray, p, rng: np.random.Generator) -> np.ndarray:
    """The fork's ApplyDistort: brightness, contrast, saturation, hue (contrast first
    or last, by a coin), then a random channel order; each with its probability."""
    def brightness(img):
        if rng.uniform(0, 1) < p.brightness_prob:
            delta = rng.uniform(-p.brightness_delta, p.brightness_delta)
            return _convert(img, 1, delta) if abs(delta) > 0 else img
        return img

    def contrast(img):
        if rng.uniform(0, 1) < p.contrast_prob:
            delta = rng.uniform(p.contrast_lower, p.contrast_upper)
            return _convert(img, delta, 0) if abs(delta - 1) > 1e-3 else img
        return img

    def saturation(img):        # the fork converts even when delta is 1
        if rng.uniform(0, 1) < p.saturation_prob:
            return _hsv_channel(img, 1, rng.uniform(p.saturation_lower,
                                                    p.saturation_upper), 0)
        return img

    def hue(img):
        if rng.uniform(0, 1) < p.hue_prob:
            delta = rng.uniform(-p.hue_delta, p.hue_delta)
            return _hsv_channel(img, 0, 1, delta) if abs(delta) > 0 else img
        return img

    def order(img):
        if rng.uniform(0, 1) < p.random_order_prob:
            return np.ascontiguousarray(img[:, :, rng.permutation(img.shape[2])])
        return img

    steps = [brightness, contrast, saturation, hue, order] if rng.uniform(0, 1) > 0.5 \
        else [brightness, saturation, hue, contrast, order]
    for step in steps:
        image = step(image)
    return image


def expand(image: np.ndarray, ratio: float, fill, rng: np.random.Generator):
    """The fork's ExpandImage: the image at a random whole-pixel offset on a canvas
    `ratio` times larger, filled with `fill`; returns (canvas, the canvas's box in the
    image's normalized coordinates)."""
    height, width = image.shape[:2]
    out_h, out_w = int(height * ratio), int(width * ratio)
    h_off = math.floor(rng.uniform(0, out_h - height))
    w_off = math.floor(rng.uniform(0, out_w - width))
    canvas = np.empty((out_h, out_w) + image.shape[2:], np.uint8)
    canvas[...] = fill
    canvas[h_off:h_off + height, w_off:w_off + width] = image
    box = (-w_off / width, -h_off / height, (out_w - w_off) / width,
           (out_h - h_off) / height)
    return canvas, box


# -- a record through the fork's pipeline ------------------------------------------------------
class _Annotations:
    """(group label, instance id, box, difficult) of one record."""

    def __init__(self, rows):
        self.rows = rows

    @classmethod
    def of(cls, record: caffe_pb2.AnnotatedDatum):
        return cls([(g.group_label, a.instance_id, (a.bbox.xmin, a.bbox.ymin, a.bbox.xmax,
                                                    a.bbox.ymax), a.bbox.difficult)
                    for g in record.annotation_group for a in g.annotation])

    def boxes(self):
        return [r[2] for r in self.rows]

    def transformed(self, crop_box, mirror: bool, emit) -> "_Annotations":
        """The fork's TransformAnnotation (WARP resizes leave boxes as they are)."""
        rows = []
        for label, instance, box, difficult in self.rows:
            if emit is not None and not _meets(crop_box, box, emit):
                continue
            projected = project(crop_box, box)
            if projected is None:
                continue
            if mirror:
                projected = (1 - projected[2], projected[1], 1 - projected[0], projected[3])
            rows.append((label, instance, projected, difficult))
        return _Annotations(rows)


def _meets(source, box, emit) -> bool:
    if emit.emit_type == EMIT.CENTER:
        x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        return source[0] <= x <= source[2] and source[1] <= y <= source[3]
    return coverage(box, source) > emit.emit_overlap


class _AnnotatedSource(_DatumSource):
    """AnnotatedDatum records in key order, through sampling and the transform."""

    def __init__(self, layer: "AnnotatedData", path, backend, batch_size, transformer,
                 skip, shard):
        self.samplers = list(layer.param.annotated_data_param.batch_sampler)
        self.transform_param = layer.param.transform_param
        self.emit = self.transform_param.emit_constraint \
            if self.transform_param.HasField("emit_constraint") else None
        self.train = layer.phase == caffe_pb2.TRAIN
        means = list(self.transform_param.mean_value)
        self.expand_fill = np.clip(np.rint(np.asarray(means or [0.0], np.float64)), 0,
                                   255).astype(np.uint8)
        self.forced_type = layer.param.annotated_data_param.HasField("anno_type")
        # Not the fork's draw order (see docs/detection.md), but seeded from Caffe's stream.
        self.rng = np.random.default_rng(rng.child_seed())
        _Source.__init__(self, batch_size, transformer)
        self.path, self.backend, self.skip, self.with_label = path, backend, skip, True
        self.shard_rank, self.shard_count = shard
        self.offset = 0
        self._cursor = None
        self._warned = False
        probe = RecordCursor(path, backend)
        try:
            key, value = probe.peek()
            first = _parse(value, self._where(key))
            self.item_shape = self.item_shape_of(self._pixels(first.datum, self._where(key)))
        finally:
            probe.close()

    def _pixels(self, datum, where) -> np.ndarray:
        t = self.transformer
        image = decode_datum(datum, where, t.force_color, t.force_gray)
        return np.ascontiguousarray(image.transpose(1, 2, 0)) if image.ndim == 3 else image

    def item_shape_of(self, image: np.ndarray) -> tuple[int, int, int]:
        height, width = image.shape[:2]
        r = self.transform_param.resize_param
        if self.transform_param.HasField("resize_param") and r.height and r.width:
            height, width = r.height, r.width
        crop_h, crop_w = self._crop_size()
        if crop_h and crop_w:
            height, width = crop_h, crop_w
        return (image.shape[2] if image.ndim == 3 else 1, height, width)

    def _crop_size(self) -> tuple[int, int]:
        p = self.transform_param
        return (p.crop_size, p.crop_size) if p.crop_size else (p.crop_h, p.crop_w)

    def next_batch(self) -> Batch:
        if self._cursor is None:
            self._cursor = RecordCursor(self.path, self.backend)
            self._cursor.skip(self.skip)
            self.offset = self.skip
        records = [self._take() for _ in range(self.batch_size)]
        seeds = self.rng.integers(0, 2 ** 63, len(records))
        items = self.map(self._item, zip(records, seeds))
        pixels = [i[0] for i in items]
        first = pixels[0].shape
        for (key, _), p in zip(records, pixels):
            if p.shape != first:
                raise DataError(f"{self._where(key)}: transformed to {list(p.shape)}, the "
                                f"batch's first record to {list(first)}; give resize_param "
                                "(or crop_size) so that every record has one size")
        data = torch.from_numpy(np.stack(pixels))
        offsets = torch.tensor([i[1] for i in items], dtype=torch.int64)
        mirror = torch.tensor([i[2] for i in items], dtype=torch.bool)
        label = self._labels([i[3] for i in items])
        return Batch(data, label, offsets, mirror)

    def _labels(self, annotations) -> torch.Tensor:
        if all(isinstance(a, float) for a in annotations):
            return torch.tensor(annotations, dtype=torch.float32)
        rows = [(item, label, instance, *box, float(difficult))
                for item, anno in enumerate(annotations)
                for label, instance, box, difficult in anno.rows]
        if not rows:
            return torch.full((1, 1, 1, 8), -1.0)
        return torch.tensor(rows, dtype=torch.float32).view(1, 1, -1, 8)

    def _item(self, job):
        (key, value), seed = job
        rng = np.random.default_rng(int(seed))
        where = self._where(key)
        record = _parse(value, where)
        image = self._pixels(record.datum, where)
        boxed = record.HasField("type") or self.forced_type
        annotations = _Annotations.of(record) if boxed else None
        encoded = record.datum.encoded
        p = self.transform_param
        if p.HasField("distort_param") and encoded:   # the fork distorts encoded only
            image = _through_jpeg(distort(image, p.distort_param, rng), where)
        if p.HasField("expand_param"):
            e = p.expand_param
            if rng.uniform(0, 1) <= e.prob and abs(e.max_expand_ratio - 1) >= 1e-2:
                ratio = rng.uniform(1, e.max_expand_ratio)
                # a raw record's canvas is the fork's std::string filler, ' ' (32)
                fill = self.expand_fill if encoded else 32
                image, box = expand(image, ratio, fill, rng)
                if encoded:
                    image = _through_jpeg(image, where)
                if boxed:
                    annotations = annotations.transformed(box, False, self.emit)
        if self.samplers and boxed:
            proposals = generate_samples(self.samplers, annotations.boxes(), rng)
            if proposals:
                crop_box = clip(proposals[int(rng.integers(len(proposals)))])
                image = self._crop(image, crop_box, encoded, where)
                annotations = annotations.transformed(crop_box, False, self.emit)
        image, offsets, mirror, crop_box = self._transform(image, rng)
        if boxed:
            return image, offsets, mirror, annotations.transformed(crop_box, mirror, self.emit)
        return image, offsets, mirror, float(record.datum.label)

    def _crop(self, image, box, encoded: bool, where: str) -> np.ndarray:
        """The fork's CropImage: pixels of the (clipped) box, truncated to integers; an
        encoded image comes back through a JPEG round trip, as the fork re-encodes it."""
        height, width = image.shape[:2]
        x0, y0 = int(box[0] * width), int(box[1] * height)
        w = int(box[2] * width - box[0] * width)
        h = int(box[3] * height - box[1] * height)
        crop = np.ascontiguousarray(image[y0:y0 + h, x0:x0 + w])
        if encoded and crop.size:
            crop = _through_jpeg(crop, where)
        if crop.size == 0:
            raise DataError(f"{where}: the sampled crop {box} is empty")
        return crop

    def _transform(self, image, rng):
        """Resize, crop, mirror (the normalization follows on the batch): (CHW pixels,
        crop offsets, mirrored, the crop's box in the resized image)."""
        import cv2  # loaded on first use (raw records never need it)
        p = self.transform_param
        mirror = bool(p.mirror) and bool(rng.integers(2))
        if p.HasField("resize_param"):
            r = p.resize_param
            modes = list(r.interp_mode)
            interp = INTERPOLATION[modes[int(rng.integers(len(modes)))]] if modes \
                else cv2.INTER_LINEAR
            if not (r.height and r.width):
                raise DataError("resize_param needs height and width")
            image = cv2.resize(image, (r.width, r.height), interpolation=interp)
        height, width = image.shape[:2]
        crop_h, crop_w = self._crop_size()
        h_off = w_off = 0
        if crop_h and crop_w:
            if height < crop_h or width < crop_w:
                raise DataError(f"crop {crop_h}x{crop_w} is larger than the {height}x"
                                f"{width} image")
            if self.train:
                h_off = int(rng.integers(height - crop_h + 1))
                w_off = int(rng.integers(width - crop_w + 1))
            else:
                h_off, w_off = (height - crop_h) // 2, (width - crop_w) // 2
            out_h, out_w = crop_h, crop_w
        else:
            out_h, out_w = height, width
        crop_box = (w_off / width, h_off / height, (w_off + out_w) / width,
                    (h_off + out_h) / height)
        pixels = image[h_off:h_off + out_h, w_off:w_off + out_w]
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if mirror:
            pixels = pixels[:, ::-1]
        return np.ascontiguousarray(pixels.transpose(2, 0, 1)), (h_off, w_off), mirror, \
            crop_box


def _through_jpeg(image: np.ndarray, where: str) -> np.ndarray:
    """Encoded as JPEG and decoded again, as the fork re-encodes what it changed."""
    import cv2  # loaded on first use (raw records never need it)
    ok, buffer = cv2.imencode(".jpg", image)
    if not ok:
        raise DataError(f"{where}: could not re-encode an augmented image as JPEG")
    decoded = decode_image_bytes(buffer.tobytes(), cv2.IMREAD_UNCHANGED, where)
    return np.ascontiguousarray(decoded.transpose(1, 2, 0)) if decoded.ndim == 3 \
        else decoded


def _parse(value: bytes, where: str) -> caffe_pb2.AnnotatedDatum:
    record = caffe_pb2.AnnotatedDatum()
    try:
        record.ParseFromString(value)
    except Exception:           # protobuf's DecodeError, or worse on garbage
        raise DataError(f"{where}: not an AnnotatedDatum record") from None
    if not record.HasField("datum"):
        raise DataError(f"{where}: the AnnotatedDatum record holds no datum (a plain "
                        "Datum database? use a Data layer)")
    return record


@register("AnnotatedData")
class AnnotatedData(PrefetchingDataLayer):
    """SSD's data layer over AnnotatedDatum records (see the module docstring)."""
    min_tops = 1
    max_tops = 2

    def make_transformer(self) -> DataTransformer:
        p = self.param.transform_param
        if p.HasField("noise_param"):
            raise self.error("transform_param.noise_param is not supported by protonet's "
                             "AnnotatedData yet")
        if p.HasField("expand_param") and p.HasField("mean_file"):
            raise self.error("expand_param with mean_file is not supported; use mean_value")
        if p.HasField("resize_param") and p.resize_param.resize_mode != RESIZE.WARP:
            raise self.error("only resize_mode WARP is supported")
        if p.HasField("mean_file") and (p.HasField("resize_param") or
                                        self.param.annotated_data_param.batch_sampler):
            raise self.error("mean_file with resizing or sampling is not supported; use "
                             "mean_value")
        plain = caffe_pb2.TransformationParameter()
        plain.CopyFrom(p)
        for name in ("resize_param", "emit_constraint", "crop_size", "crop_h", "crop_w",
                     "mirror", "distort_param", "expand_param"):
            plain.ClearField(name)
        return DataTransformer(plain, self.phase)

    def make_source(self):
        for sampler in self.param.annotated_data_param.batch_sampler:
            check_sampler(self, sampler)
        p = self.param.data_param
        batch = self.positive_batch_size(p.batch_size, "data_param.batch_size")
        from ..solver.distributed import data_shard
        source = _AnnotatedSource(self, p.source, p.backend, batch, self.make_transformer(),
                                  self.rand_skip(p.rand_skip), data_shard(self.phase))
        return source

    def reshape(self, bottom_shapes):
        batch = self.source.batch_size
        return [(batch, *self.source.item_shape), (1, 1, 1, 8)][:self.num_tops]
