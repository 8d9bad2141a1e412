"""Size limits: what protonet refuses before it allocates.

A size written in a file (a blob's dims, a Datum's channels/height/width, an HDF5
dataset's shape, an image header) can lie, and a prototxt can ask for more than any
machine holds. protonet checks sizes against these limits, and against what the
file itself could hold, before it allocates, and answers with an error naming the
file, record or layer instead of a multi-GB allocation.

- `max_blob_elements`: elements in one blob, param or dataset. Default 2**31 - 1,
  Caffe's own limit (Blob::Reshape refuses a count over INT_MAX).
  Environment: PROTONET_MAX_BLOB_ELEMENTS.
- `max_image_pixels`: width * height of one encoded image (JPEG, PNG, ...), checked
  from its header before decoding. Default 2**26 (8192 x 8192).
  Environment: PROTONET_MAX_IMAGE_PIXELS. When protonet is imported before OpenCV,
  the same number also becomes OpenCV's OPENCV_IO_MAX_IMAGE_PIXELS (unless set),
  which covers the formats protonet does not read headers of.
- `max_upload_bytes`: the largest request body `protonet serve` reads (an image
  upload). Default 2**24 (16 MiB). Environment: PROTONET_MAX_UPLOAD_BYTES; the
  command's --max-upload-bytes overrides it.

Change them for a block of code with `protonet.limits.override(...)` (the fuzzer
runs under small limits), or for a process through the environment.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator, Sequence

CAFFE_MAX_COUNT = 2**31 - 1
DEFAULT_IMAGE_PIXELS = 2**26
DEFAULT_UPLOAD_BYTES = 2**24


def _from_env(name: str, default: int) -> int:
    text = os.environ.get(name, "")
    try:
        value = int(text)
    except ValueError:
        return default
    return value if value > 0 else default


_limits = {
    "max_blob_elements": _from_env("PROTONET_MAX_BLOB_ELEMENTS", CAFFE_MAX_COUNT),
    "max_image_pixels": _from_env("PROTONET_MAX_IMAGE_PIXELS", DEFAULT_IMAGE_PIXELS),
    "max_upload_bytes": _from_env("PROTONET_MAX_UPLOAD_BYTES", DEFAULT_UPLOAD_BYTES),
}
# OpenCV reads this once, when it loads; it refuses larger images with cv2.error.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(_limits["max_image_pixels"]))


def max_blob_elements() -> int:
    return _limits["max_blob_elements"]


def max_image_pixels() -> int:
    return _limits["max_image_pixels"]


def max_upload_bytes() -> int:
    return _limits["max_upload_bytes"]


@contextlib.contextmanager
def override(*, max_blob_elements: int | None = None,
             max_image_pixels: int | None = None,
             max_upload_bytes: int | None = None) -> Iterator[None]:
    """Use other limits inside the block (process-wide, not per thread)."""
    saved = dict(_limits)
    if max_blob_elements is not None:
        _limits["max_blob_elements"] = int(max_blob_elements)
    if max_image_pixels is not None:
        _limits["max_image_pixels"] = int(max_image_pixels)
    if max_upload_bytes is not None:
        _limits["max_upload_bytes"] = int(max_upload_bytes)
    try:
        yield
    finally:
        _limits.update(saved)


def shape_problem(shape: Sequence[int]) -> str | None:
    """Why a blob of `shape` may not be made (negative dim, too many elements), or None."""
    dims = [int(d) for d in shape]
    if any(d < 0 for d in dims):
        return f"shape {dims} has a negative dimension"
    count, limit = math.prod(dims), max_blob_elements()
    if count > limit or any(d > limit for d in dims):
        what = f"{count} elements" if count > limit else f"a dimension of {max(dims)}"
        return (f"shape {dims} has {what}, over the limit of {limit} per blob "
                "(PROTONET_MAX_BLOB_ELEMENTS; Caffe's own limit is 2^31 - 1)")
    return None


def image_problem(width: int, height: int) -> str | None:
    """Why an image of this size may not be decoded, or None."""
    if width <= 0 or height <= 0:
        return f"image header says {width}x{height} pixels"
    if width * height > max_image_pixels():
        return (f"image header says {width}x{height} = {width * height} pixels, over the "
                f"limit of {max_image_pixels()} (PROTONET_MAX_IMAGE_PIXELS)")
    return None
