"""SSD's convert_annoset: images with PASCAL VOC XML boxes into an LMDB of AnnotatedDatum.

As the SSD fork's tool (weiliu89/caffe `ssd`, tools/convert_annoset.cpp and
util/io.cpp's ReadXMLToAnnotatedDatum): LIST lines are `<image> <annotation>` relative
to ROOT; each object's `name` maps to a label through a LabelMap prototxt; boxes are
stored normalized by the XML's size (the image's when the XML has none), grouped by
label in first-seen order with per-group instance ids, `difficult` kept. Keys are
`%08d_<image>` by list line. The image is stored as convert-imageset stores it (raw or
encoded, optionally resized); its annotations need no change when it is resized, being
relative. Differences: an unreadable image or annotation is logged and skipped (the
fork aborts), a box coordinate that is not an integer is an error naming the file (the
fork reads it as 0), and only XML annotations (`label_type: xml`) are read.
"""
from __future__ import annotations

import logging
import os
import random
import xml.etree.ElementTree as ElementTree
from concurrent.futures import ThreadPoolExecutor

import cv2
from tqdm import tqdm

from ..errors import DataError, ProtonetError
from ..io.text import read_text
from ..proto import caffe_pb2
from .imageset import (ConvertResult, _catching, _report, _staging_dir, _writer,
                       image_to_datum, _guess_encoding)
from .lmdb_source import backend_value
from .prefetch import default_workers, ordered_map

log = logging.getLogger("protonet")


def read_label_map(path: str) -> dict[str, int]:
    """A LabelMap prototxt (item { name label display_name }) as name -> label."""
    try:
        label_map = read_text(path, caffe_pb2.LabelMap())
    except ProtonetError as e:
        raise DataError(f"label map: {e}") from None
    names: dict[str, int] = {}
    for item in label_map.item:
        if item.name in names:
            raise DataError(f"{path}: name '{item.name}' is listed twice")
        names[item.name] = item.label
    if not names:
        raise DataError(f"{path}: the label map has no items")
    return names


def read_annotation_list(path: str) -> list[tuple[str, str]]:
    """`<image> <annotation>` lines (blank lines skipped)."""
    pairs = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2:
                    raise DataError(f"{path}:{number}: expected '<image> <annotation>', "
                                    f"got '{line.strip()}'")
                pairs.append((parts[0], parts[1]))
    except OSError as e:
        raise DataError(f"{path}: cannot read the list ({e.strerror})") from None
    return pairs


def _integer(element, tag: str, where: str) -> int:
    node = element.find(tag)
    if node is None or node.text is None:
        return 0
    try:
        return int(node.text.strip())
    except ValueError:
        raise DataError(f"{where}: <{tag}> is '{node.text.strip()}', not an integer "
                        "(SSD's reader takes pixel coordinates as integers)") from None


def read_voc_xml(path: str, image_height: int, image_width: int,
                 names: dict[str, int]) -> list[caffe_pb2.AnnotationGroup]:
    """The annotation groups of one PASCAL VOC XML file, as the fork builds them."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError) as e:
        raise DataError(f"{path}: cannot read the annotation ({e})") from None
    size = root.find("size")
    height = _integer(size, "height", path) if size is not None else 0
    width = _integer(size, "width", path) if size is not None else 0
    if not height or not width:
        height, width = image_height, image_width
    if (height, width) != (image_height, image_width):
        log.warning("%s: size %dx%d differs from the image's %dx%d", path, width, height,
                    image_width, image_height)
    groups: list[caffe_pb2.AnnotationGroup] = []
    for obj in root.findall("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in names:
            raise DataError(f"{path}: unknown name '{name}' (not in the label map)")
        label = names[name]
        group = next((g for g in groups if g.group_label == label), None)
        if group is None:
            group = caffe_pb2.AnnotationGroup(group_label=label)
            groups.append(group)
        instance = group.annotation[-1].instance_id + 1 if group.annotation else 0
        annotation = group.annotation.add(instance_id=instance)
        difficult = (obj.findtext("difficult") or "").strip() == "1"
        box = obj.find("bndbox")
        if box is None:
            raise DataError(f"{path}: object '{name}' has no <bndbox>")
        xmin, ymin, xmax, ymax = (_integer(box, t, path)
                                  for t in ("xmin", "ymin", "xmax", "ymax"))
        if xmin > xmax or ymin > ymax or min(xmin, ymin, xmax, ymax) < 0 \
                or max(xmin, xmax) > width or max(ymin, ymax) > height:
            log.warning("%s: box (%d, %d, %d, %d) is irregular or leaves the %dx%d image",
                        path, xmin, ymin, xmax, ymax, width, height)
        bbox = annotation.bbox
        bbox.xmin, bbox.ymin = xmin / width, ymin / height
        bbox.xmax, bbox.ymax = xmax / width, ymax / height
        bbox.difficult = difficult
    return groups


def convert_annoset(root: str, list_file: str, db_path: str, label_map_file: str, *,
                    resize_height: int = 0, resize_width: int = 0, gray: bool = False,
                    shuffle: bool = False, backend: str = "lmdb", encoded: bool = False,
                    encode_type: str = "", workers: int | None = None,
                    seed: int | None = None, progress: bool = True) -> ConvertResult:
    """Write `list_file`'s images and their XML boxes into a new AnnotatedDatum DB."""
    backend_id = backend_value(backend)
    if os.path.exists(db_path):
        raise DataError(f"{db_path}: already exists; choose a new name or remove it")
    names = read_label_map(label_map_file)
    lines = read_annotation_list(list_file)
    if shuffle:
        random.Random(seed).shuffle(lines)
    height, width = max(0, resize_height), max(0, resize_width)

    def make(line_id: int) -> tuple[bytes, bytes]:
        image_name, anno_name = lines[line_id]
        path = root + image_name
        encoding = encode_type or (_guess_encoding(image_name) if encoded else "")
        datum = image_to_datum(path, -1, height, width, not gray, encoding)
        original = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        record = caffe_pb2.AnnotatedDatum(type=caffe_pb2.AnnotatedDatum.BBOX)
        record.datum.CopyFrom(datum)
        if os.path.exists(root + anno_name):
            record.annotation_group.extend(read_voc_xml(root + anno_name, original.shape[0],
                                                        original.shape[1], names))
        return (f"{line_id:08d}_{image_name}".encode("utf-8", "surrogateescape"),
                record.SerializeToString())

    result = ConvertResult()
    with _staging_dir(db_path) as staging, _writer(staging, backend_id) as writer, \
            ThreadPoolExecutor(workers or default_workers()) as pool, \
            tqdm(total=len(lines), unit="img", disable=not progress,
                 desc="convert-annoset") as bar:
        for line_id, outcome in enumerate(ordered_map(pool, _catching(make),
                                                      range(len(lines)))):
            bar.update()
            if isinstance(outcome, DataError):
                log.warning("skipping %s: %s", lines[line_id][0], outcome)
                result.skipped.append((lines[line_id][0], str(outcome)))
                continue
            writer.put(*outcome)
            result.written += 1
    _report(result, len(lines), root, db_path)
    return result
