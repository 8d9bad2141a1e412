"""Caffe's Datum record <-> pixel arrays, decoded exactly as Caffe decodes them.

A Datum holds either raw uint8 pixels (channel-major, BGR), float values
(`float_data`), or an encoded image file (`encoded: true`, JPEG/PNG bytes) that
OpenCV decodes. Everything downstream (DataTransformer, compute-image-mean) works on
one channel-major (C, H, W) array per record, so this is the only place that knows
the three layouts. Pixel order and flags follow Caffe's util/io.cpp: encoded images
decode "natively" (IMREAD_UNCHANGED) unless force_color / force_gray asks for
IMREAD_COLOR / IMREAD_GRAYSCALE.
"""
from __future__ import annotations

import struct

from .. import limits  # noqa: F401 - sets OpenCV's image size limit before cv2 loads
import numpy as np
from google.protobuf import message as pb_message

from ..errors import DataError
from ..proto import caffe_pb2


def parse_datum(value: bytes, where: str) -> caffe_pb2.Datum:
    """The Datum serialized in `value`; `where` names the record in errors."""
    datum = caffe_pb2.Datum()
    try:
        datum.ParseFromString(value)
    except (pb_message.DecodeError, ValueError) as e:
        raise DataError(f"{where}: not a Caffe Datum record ({e})") from None
    return datum


def decode_datum(datum: caffe_pb2.Datum, where: str, force_color: bool = False,
                 force_gray: bool = False) -> np.ndarray:
    """The record's pixels as a (C, H, W) array: uint8, or float32 for float_data."""
    if datum.encoded:
        import cv2  # loaded on first use (raw records never need it)
        flag = (cv2.IMREAD_COLOR if force_color else
                cv2.IMREAD_GRAYSCALE if force_gray else cv2.IMREAD_UNCHANGED)
        return decode_image_bytes(datum.data, flag, where)
    shape = (datum.channels, datum.height, datum.width)
    if min(shape) <= 0:
        raise DataError(f"{where}: raw Datum has shape {list(shape)}; Caffe needs "
                        "positive channels, height and width")
    count = shape[0] * shape[1] * shape[2]
    if datum.data:
        values = np.frombuffer(datum.data, dtype=np.uint8)
    else:
        values = np.asarray(datum.float_data, dtype=np.float32)
    if values.size != count:
        kind = "data bytes" if datum.data else "float_data values"
        raise DataError(f"{where}: Datum holds {values.size} {kind} but its shape "
                        f"{list(shape)} needs {count}")
    return values.reshape(shape)


def decode_image_bytes(data: bytes, flag: int, where: str) -> np.ndarray:
    """An encoded image (JPEG/PNG/...) decoded by OpenCV into (C, H, W) uint8.

    The size in a PNG, JPEG, GIF or BMP header is checked against
    protonet.limits.max_image_pixels before OpenCV allocates the image."""
    import cv2  # loaded on first use (raw records never need it)
    check_image_header(data, where)
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag) if data else None
    except cv2.error as e:
        raise DataError(f"{where}: OpenCV cannot decode the encoded image "
                        f"({len(data)} bytes): {_cv_message(e)}") from None
    if image is None:
        raise DataError(f"{where}: could not decode the encoded image "
                        f"({len(data)} bytes)")
    return to_chw(image, where)


def check_image_header(data: bytes, where: str, file_size: int | None = None) -> None:
    """Refuse an image whose header asks for more pixels than the limit allows, or
    (PNG) whose chunks claim more bytes than the file has: OpenCV allocates what a
    chunk claims before it reads. `data` may be the first part of a longer file of
    `file_size` bytes."""
    size = image_size(data)
    if size is not None:
        problem = limits.image_problem(*size)
        if problem:
            raise DataError(f"{where}: {problem}")
    if data[:8] == _PNG:
        total = len(data) if file_size is None else file_size
        at = 8
        while at + 8 <= len(data):
            length = struct.unpack(">I", data[at:at + 4])[0]
            if length > 2**31 - 1 or at + 12 + length > total:
                raise DataError(f"{where}: PNG chunk at byte {at} claims {length} bytes; "
                                f"the file has {total}: it is truncated or corrupt")
            if data[at + 4:at + 8] == b"IEND":
                break
            at += 12 + length


def _cv_message(error: Exception) -> str:
    """The useful last line of an OpenCV error."""
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__


_PNG = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (all but DHT 0xC4, JPG 0xC8 and DAC 0xCC).
_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG, GIF or BMP header; None for other data."""
    if data[:8] == _PNG and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if data[:2] == b"BM" and len(data) >= 26:
        width, height = struct.unpack("<ii", data[18:26])
        return abs(width), abs(height)
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    at, end = 2, len(data)
    while at + 4 <= end:
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:                      # fill byte
            at += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            at += 2                             # markers without a length
            continue
        if marker in (0xD9, 0xDA):              # end of image, start of scan: no frame
            return None
        length = struct.unpack(">H", data[at + 2:at + 4])[0]
        if marker in _SOF and at + 9 <= end:
            height, width = struct.unpack(">HH", data[at + 5:at + 9])
            return width, height
        at += 2 + length
    return None


def to_chw(image: np.ndarray, where: str) -> np.ndarray:
    """OpenCV's (H, W[, C]) layout as a (C, H, W) view; only 8-bit images, as Caffe."""
    if image.dtype != np.uint8:
        raise DataError(f"{where}: image has {image.dtype} pixels; Caffe only reads "
                        "8-bit images")
    if image.ndim == 2:
        return image[None]
    return image.transpose(2, 0, 1)


def raw_datum(image: np.ndarray, label: int) -> caffe_pb2.Datum:
    """A raw Datum from an OpenCV (H, W[, C]) uint8 image, as CVMatToDatum writes it."""
    chw = to_chw(image, "image")
    datum = caffe_pb2.Datum(channels=chw.shape[0], height=chw.shape[1],
                            width=chw.shape[2], encoded=False, label=label)
    datum.data = np.ascontiguousarray(chw).tobytes()
    return datum


def encoded_datum(data: bytes, label: int) -> caffe_pb2.Datum:
    """An encoded Datum (no shape fields), as ReadFileToDatum and imencode leave it."""
    return caffe_pb2.Datum(data=data, label=label, encoded=True)
