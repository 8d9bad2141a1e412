"""Binary protobuf files: .caffemodel, .solverstate, .binaryproto."""
from __future__ import annotations

import os
from typing import TypeVar

from google.protobuf import message as pb_message

from ..errors import ParseError
from .atomic import atomic_write

M = TypeVar("M", bound=pb_message.Message)

# Protobuf's C++ reader (Caffe's) refuses messages over 2 GiB; so do we, before reading.
MAX_BYTES = 2**31 - 1


def read_binary(path: str, message: M) -> M:
    """Parse the binary file `path` into `message` and return it."""
    try:
        size = os.path.getsize(path)
        if size > MAX_BYTES:
            raise ParseError(f"{size} bytes is over the 2 GiB protobuf limit", path)
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ParseError("file not found", path) from None
    except IsADirectoryError:
        raise ParseError("is a directory, expected a file", path) from None
    except OSError as e:
        raise ParseError(f"cannot read ({e.strerror})", path) from None
    return parse_binary(data, message, path)


def parse_binary(data: bytes, message: M, path: str | None = None) -> M:
    try:
        message.Clear()
        message.ParseFromString(data)
    except (pb_message.DecodeError, RecursionError, ValueError) as e:
        name = message.DESCRIPTOR.full_name
        raise ParseError(f"not a valid binary {name} ({e}); the file is truncated, "
                         "corrupt, or of another kind", path) from None
    return message


def write_binary(path: str, message: pb_message.Message) -> None:
    """Serialize `message` to `path` atomically."""
    atomic_write(path, message.SerializeToString())
