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

import cv2
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
    """An encoded image (JPEG/PNG/...) decoded by OpenCV into (C, H, W) uint8."""
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)
    if image is None:
        raise DataError(f"{where}: could not decode the encoded image "
                        f"({len(data)} bytes)")
    return to_chw(image, where)


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
