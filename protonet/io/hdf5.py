"""Reading HDF5 files that may be damaged or lie about their sizes.

h5py reports a damaged file with OSError, RuntimeError, KeyError, ValueError or
TypeError, depending on where the damage is; `reading` turns each of them into one
protonet error that names the file. `read_array` refuses, before it reads, a
dataset that is not numeric, is over protonet.limits, or declares more data than
the file stores (a shape nobody wrote, or a lying one), so a small file cannot make
protonet allocate gigabytes.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import numpy as np

from ..errors import ProtonetError
from ..limits import shape_problem

# What h5py raises for damaged files and wrong kinds of nodes.
H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, AttributeError)
# deflate, HDF5's usual filter, shrinks data at most ~1032:1; a dataset that claims
# more than that over what the file stores (plus a little) was not written.
MAX_COMPRESSION = 1100
SLACK_BYTES = 1 << 20

Fail = Callable[[str], ProtonetError]


@contextlib.contextmanager
def reading(path: str, fail: Fail) -> Iterator:
    """The open h5py.File; h5py errors inside the block become `fail(message)`."""
    import h5py
    try:
        exists = os.path.isfile(path)
    except (TypeError, ValueError):          # NUL bytes and the like in the name
        exists = False
    if not exists:
        raise fail("file not found" if not os.path.isdir(path) else
                   "is a directory, expected an HDF5 file")
    try:
        handle = h5py.File(path, "r")
    except H5_ERRORS as e:
        raise fail(f"not a readable HDF5 file ({e})") from None
    try:
        with handle:
            yield handle
    except ProtonetError:
        raise
    except H5_ERRORS as e:
        raise fail(f"damaged HDF5 file ({type(e).__name__}: {e})") from None


def read_array(node, name: str, fail: Fail, dtype=np.float32) -> np.ndarray:
    """Dataset `node` (called `name` in messages) as a C-contiguous `dtype` array."""
    import h5py
    if not isinstance(node, h5py.Dataset):
        raise fail(f"'{name}' is a {type(node).__name__.lower()}, expected a dataset")
    if node.dtype.kind not in "fiub":
        raise fail(f"dataset '{name}' holds {node.dtype}; expected integer or floating "
                   "point values")
    problem = shape_problem(node.shape)
    if problem:
        raise fail(f"dataset '{name}': {problem}")
    declared = int(node.size) * node.dtype.itemsize
    stored = node.id.get_storage_size()
    if declared > stored * MAX_COMPRESSION + SLACK_BYTES:
        raise fail(f"dataset '{name}' declares shape {list(node.shape)} ({declared} bytes) "
                   f"but the file stores only {stored} bytes of it")
    return np.ascontiguousarray(node[()], dtype=dtype)


@contextlib.contextmanager
def creating(path: str) -> Iterator:
    """A new HDF5 file, built in memory and written to `path` on leaving the block.

    HDF5 itself never writes to the disk: when its own writes fail (a full disk, a
    file size limit) it leaves open objects behind that crash the interpreter at
    exit. Here the finished image is written with plain Python I/O, whose failure
    is an ordinary OSError (which atomic writes report, keeping the old file)."""
    import h5py
    handle = h5py.File(f"{path}.in-memory", "w", driver="core", backing_store=False)
    try:
        yield handle
        handle.flush()
        image = handle.id.get_file_image()
    finally:
        handle.close()
    with open(path, "wb") as f:
        f.write(image)
