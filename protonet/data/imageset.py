"""Caffe's convert_imageset and compute_image_mean, parallel and crash-safe.

The databases we write must be read by real Caffe exactly as its own tools' output:
keys `%08d_<path>` numbered by list line (so a skipped image leaves a gap, as in
Caffe), Datum fields exactly as convert_imageset sets them (raw: channels, height,
width, data, label, encoded=false; encoded: data, label, encoded=true), commits every
1000 records, and an LMDB map that doubles whenever it fills. What differs is
deliberate: images decode and resize on a thread pool (results are still written
in list order), a bad or missing image is logged and skipped instead of aborting,
and the database is built in a temporary directory next to the target and renamed
into place only when complete, so a crash never leaves a half-written database
under the final name. Like Caffe we refuse to write into an existing database.

Image reading is Caffe's ReadImageToCVMat: OpenCV imread in BGR (or grayscale) and
cv::resize with bilinear interpolation; ImageData layers read images the same way.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import lmdb
import numpy as np
from tqdm import tqdm

from .. import limits
from ..errors import DataError
from ..io.binary import write_binary
from ..proto import caffe_pb2
from .datum import check_image_header, decode_datum, encoded_datum, parse_datum, raw_datum
from .lmdb_source import LMDB, RecordCursor, backend_value, import_plyvel
from .prefetch import default_workers, ordered_map

log = logging.getLogger("protonet")

COMMIT_EVERY = 1000            # records per transaction, as convert_imageset
LMDB_START_MAP_SIZE = 10 << 20  # LMDB's default map size; doubled when full
_LEADING_INT = re.compile(rb"\s*([+-]?\d+)")
HEADER_BYTES = 1 << 18      # where image headers (JPEG after its EXIF block) end
INT32 = (-2**31, 2**31 - 1)


# --- image lists and image files ---------------------------------------------

def read_image_list(path: str) -> list[tuple[str, int]]:
    """'<path> <label>' lines split at the last space, labels read like C's atoi.

    As in Caffe, a line without a space is both path and label, and an empty line
    is an entry with an empty path (its image then fails to read).
    """
    try:
        with open(path, "rb") as f:
            raw_lines = f.read().split(b"\n")
    except FileNotFoundError:
        raise DataError(f"{path}: image list not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the image list ({e.strerror})") from None
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()             # the final newline ends a line, it starts none
    entries = []
    for number, line in enumerate(raw_lines, 1):
        name, space, label = line.rpartition(b" ")
        if not space:
            name, label = line, line
        match = _LEADING_INT.match(label)
        value = int(match.group(1)) if match else 0
        if not INT32[0] <= value <= INT32[1]:
            raise DataError(f"{path}:{number}: label {value} does not fit Caffe's int32 "
                            "labels")
        entries.append((os.fsdecode(name), value))
    if not entries:
        raise DataError(f"{path}: the image list is empty")
    return entries


def read_image(path: str, height: int = 0, width: int = 0,
               is_color: bool = True, nearest: bool = False) -> np.ndarray:
    """An image file as OpenCV's (H, W[, 3]) uint8 BGR, resized when both sizes > 0
    (bilinear, or nearest-neighbour for label images, as SegNet's ReadImageToCVMat)."""
    import cv2  # loaded on first use (raw records never need it)
    if "\0" in path:
        raise DataError(f"{path!r}: an image path cannot contain a NUL byte")
    if height > 0 and width > 0 and limits.image_problem(width, height):
        raise DataError(f"{path}: cannot resize to {width}x{height}: "
                        f"{limits.image_problem(width, height)}")
    if not os.path.isfile(path):
        raise DataError(f"{path}: image not found")
    try:
        with open(path, "rb") as f:
            check_image_header(f.read(HEADER_BYTES), path, os.fstat(f.fileno()).st_size)
        image = cv2.imread(path, cv2.IMREAD_COLOR if is_color else cv2.IMREAD_GRAYSCALE)
    except OSError as e:
        raise DataError(f"{path}: cannot read the image ({e.strerror})") from None
    except cv2.error as e:
        raise DataError(f"{path}: OpenCV cannot read the image: "
                        f"{str(e).strip().splitlines()[-1]}") from None
    if image is None:
        raise DataError(f"{path}: not a readable image")
    if height > 0 and width > 0:
        image = cv2.resize(image, (width, height),
                           interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR)
    return image


def image_to_datum(path: str, label: int, height: int, width: int, is_color: bool,
                   encoding: str) -> caffe_pb2.Datum:
    """Caffe's ReadImageToDatum: raw pixels, the file's own bytes, or re-encoded."""
    import cv2  # loaded on first use (raw records never need it)
    image = read_image(path, height, width, is_color)
    if not encoding:
        return raw_datum(image, label)
    channels = 1 if image.ndim == 2 else image.shape[2]
    # Caffe keeps the file as is when nothing would change it (even with --gray:
    # a grayscale decode "matches" then, and the stored file stays in color).
    if (channels == 3) == is_color and not height and not width and \
            _extension_matches(path, encoding):
        with open(path, "rb") as f:
            return encoded_datum(f.read(), label)
    try:
        ok, buffer = cv2.imencode("." + encoding, image)
    except cv2.error:
        ok = False
    if not ok:
        raise DataError(f"{path}: OpenCV cannot encode images as '{encoding}'")
    return encoded_datum(buffer.tobytes(), label)


def _extension_matches(path: str, encoding: str) -> bool:
    extension = path.rpartition(".")[2].lower()
    encoding = encoding.lower()
    return extension == encoding or (encoding == "jpg" and extension == "jpeg")


def _guess_encoding(name: str) -> str:
    if "." not in name:
        raise DataError(f"{name}: cannot guess the encoding (no file extension); "
                        "give --encode_type")
    return name.rpartition(".")[2].lower()


# --- convert-imageset ----------------------------------------------------------

@dataclass
class ConvertResult:
    """What a conversion wrote and what it skipped (path, reason)."""
    written: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def convert_imageset(root: str, list_file: str, db_path: str, *, resize_height: int = 0,
                     resize_width: int = 0, gray: bool = False, shuffle: bool = False,
                     backend: str = "lmdb", encoded: bool = False, encode_type: str = "",
                     check_size: bool = False, workers: int | None = None,
                     seed: int | None = None, progress: bool = True) -> ConvertResult:
    """Write the images of `list_file` (paths relative to `root`) into a new database."""
    backend_id = backend_value(backend)
    if check_size and (encoded or encode_type):
        raise DataError("--check_size compares raw pixel sizes and cannot be combined "
                        "with --encoded/--encode_type (Caffe aborts on the second "
                        "image in that case)")
    if os.path.exists(db_path):
        raise DataError(f"{db_path}: already exists; choose a new name or remove it")
    lines = read_image_list(list_file)
    if shuffle:
        random.Random(seed).shuffle(lines)
    if encode_type and not encoded:
        log.info("encode_type specified, assuming encoded=true.")
    height, width = max(0, resize_height), max(0, resize_width)
    if (height > 0) != (width > 0):
        log.warning("only one of resize_height/resize_width is set; like Caffe, images "
                    "are not resized unless both are")

    def make(line_id: int) -> tuple[bytes, bytes]:
        name, label = lines[line_id]
        encoding = encode_type or (_guess_encoding(name) if encoded else "")
        datum = image_to_datum(root + name, label, height, width, not gray, encoding)
        return f"{line_id:08d}_{name}".encode("utf-8", "surrogateescape"), \
            datum.SerializeToString()

    result = ConvertResult()
    with _staging_dir(db_path) as staging, _writer(staging, backend_id) as writer, \
            ThreadPoolExecutor(workers or default_workers()) as pool, \
            tqdm(total=len(lines), unit="img", disable=not progress,
                 desc="convert-imageset") as bar:
        size_check = _SizeCheck() if check_size else None
        for line_id, outcome in enumerate(ordered_map(pool, _catching(make),
                                                      range(len(lines)))):
            bar.update()
            if isinstance(outcome, DataError):
                log.warning("skipping %s: %s", lines[line_id][0], outcome)
                result.skipped.append((lines[line_id][0], str(outcome)))
                continue
            if size_check is not None:
                size_check(outcome[1], root + lines[line_id][0])
            writer.put(*outcome)
            result.written += 1
    _report(result, len(lines), root, db_path)
    return result


def _catching(function):
    """`function` returning a DataError instead of raising it (one bad image)."""
    def call(item):
        try:
            return function(item)
        except DataError as e:
            return e
    return call


class _SizeCheck:
    """--check_size: every record's pixel count equals the first one's."""

    def __init__(self):
        self.size: int | None = None

    def __call__(self, value: bytes, path: str) -> None:
        datum = parse_datum(value, path)
        size = len(datum.data)
        if self.size is None:
            self.size = datum.channels * datum.height * datum.width
        elif size != self.size:
            raise DataError(f"{path}: {size} bytes of data, the first image has "
                            f"{self.size} (--check_size)")


def _report(result: ConvertResult, total: int, root: str, db_path: str) -> None:
    log.info("Processed %d files into %s.", result.written, db_path)
    if not result.skipped:
        return
    hint = ""
    if result.written == 0 and root and not root.endswith(("/", os.sep)):
        hint = (f" (ROOT '{root}' is joined to each path as is, like Caffe; "
                "did you mean it with a trailing '/'?)")
    log.warning("skipped %d of %d images%s", len(result.skipped), total, hint)


class _staging_dir:
    """A temporary directory beside `target`, renamed to it on success only."""

    def __init__(self, target: str):
        self.target = os.path.abspath(target)

    def __enter__(self) -> str:
        parent = os.path.dirname(self.target)
        os.makedirs(parent, exist_ok=True)
        self.path = tempfile.mkdtemp(prefix="." + os.path.basename(self.target) + ".",
                                     suffix=".partial", dir=parent)
        return self.path

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            if isinstance(error, (lmdb.Error, OSError)):    # a full disk, a size limit
                raise DataError(f"{self.target}: could not write the database ({error}); "
                                "nothing was left under that name") from error
            return
        os.chmod(self.path, 0o755)
        try:
            os.rename(self.path, self.target)
        except OSError as e:
            shutil.rmtree(self.path, ignore_errors=True)
            raise DataError(f"{self.target}: could not move the finished database "
                            f"into place ({e.strerror})") from None


def _writer(path: str, backend: int):
    return _LmdbWriter(path) if backend == LMDB else _LevelDbWriter(path)


class _LmdbWriter:
    """Puts in transactions of COMMIT_EVERY records; doubles the map when full."""

    def __init__(self, path: str):
        self.env = lmdb.open(path, map_size=LMDB_START_MAP_SIZE, mode=0o664)
        self.pending: list[tuple[bytes, bytes]] = []

    def put(self, key: bytes, value: bytes) -> None:
        self.pending.append((key, value))
        if len(self.pending) == COMMIT_EVERY:
            self.commit()

    def commit(self) -> None:
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for key, value in self.pending:
                        txn.put(key, value)
                break
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
        self.pending.clear()

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace) -> None:
        try:
            if kind is None and self.pending:
                self.commit()
        finally:
            self.env.close()


class _LevelDbWriter(_LmdbWriter):
    """The same through plyvel, with Caffe's LevelDB options."""

    def __init__(self, path: str):
        plyvel = import_plyvel()
        self.env = plyvel.DB(path, create_if_missing=True, error_if_exists=True,
                             block_size=65536, write_buffer_size=268435456,
                             max_open_files=100)
        self.pending = []

    def commit(self) -> None:
        with self.env.write_batch() as batch:
            for key, value in self.pending:
                batch.put(key, value)
        self.pending.clear()


# --- compute-image-mean ----------------------------------------------------------

def compute_image_mean(db_path: str, out_path: str | None = None, *,
                       backend: str = "lmdb", workers: int | None = None,
                       progress: bool = True) -> np.ndarray:
    """The per-pixel mean of every record, as compute_image_mean computes it.

    Sums run in float32, record by record in key order, and are divided by the
    count in float32, so the result is bit-identical to Caffe's. The mean is
    written (atomically) as a legacy (1, C, H, W) BlobProto when `out_path` is given.
    """
    cursor = RecordCursor(db_path, backend_value(backend))
    try:
        shape, total, count = _sum_records(cursor, workers, progress)
    finally:
        cursor.close()
    mean = (total / np.float32(count)).astype(np.float32)
    if out_path:
        blob = caffe_pb2.BlobProto(num=1, channels=shape[0], height=shape[1],
                                   width=shape[2])
        blob.data.extend(mean.tolist())
        write_binary(out_path, blob)
        log.info("Wrote the mean of %d records to %s", count, out_path)
    per_channel = mean.reshape(shape[0], -1).mean(axis=1)
    for channel, value in enumerate(per_channel):
        log.info("mean_value channel [%d]: %g", channel, value)
    return mean.reshape(shape)


def _sum_records(cursor: RecordCursor, workers: int | None, progress: bool):
    def decode(record: tuple[bytes, bytes]) -> np.ndarray:
        where = cursor.where(record[0])
        return decode_datum(parse_datum(record[1], where), where)

    first_key = cursor.peek()[0]
    shape = decode(cursor.peek()).shape
    total = np.zeros(shape[0] * shape[1] * shape[2], dtype=np.float32)
    count = 0
    with ThreadPoolExecutor(workers or default_workers()) as pool, \
            tqdm(total=cursor.size_hint(), unit="rec", disable=not progress,
                 desc="compute-image-mean") as bar:
        records = cursor.scan()
        for key, values in ordered_map(pool, lambda r: (r[0], decode(r)), records):
            if values.size != total.size:
                raise DataError(f"{cursor.where(key)}: {values.size} values, but the "
                                f"first record ('{first_key.decode('utf-8', 'replace')}')"
                                f" has {total.size}")
            np.add(total, values.reshape(-1), out=total)
            count += 1
            bar.update()
    return shape, total, count
