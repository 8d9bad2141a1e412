"""Binary protobuf files: .caffemodel, .solverstate, .binaryproto."""
from __future__ import annotations

import os
from typing import TypeVar

from google.protobuf import message as pb_message
from google.protobuf.descriptor import FieldDescriptor

from ..errors import ParseError
from .atomic import atomic_write
from .forks import park_foreign_fork_fields, remap_layer_fields

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
    except ValueError:          # a NUL byte in the name
        raise ParseError("not a valid file name", repr(path)) from None
    return parse_binary(data, message, path)


def parse_binary(data: bytes, message: M, path: str | None = None) -> M:
    if message.DESCRIPTOR.full_name == "caffe.NetParameter":
        try:    # other forks' fields under numbers this schema uses (io/forks.py)
            data = park_foreign_fork_fields(data) or data
        except ValueError:
            pass                # not well-formed: protobuf's parse below says how
    try:
        message.Clear()
        message.ParseFromString(data)
    except (pb_message.DecodeError, RecursionError, ValueError) as e:
        name = message.DESCRIPTOR.full_name
        raise ParseError(f"not a valid binary {name} ({e}); the file is truncated, "
                         "corrupt, or of another kind", path) from None
    if message.DESCRIPTOR.full_name == "caffe.NetParameter":
        try:    # fork layers whose field numbers BVLC also uses (io/forks.py)
            remap_layer_fields(message)
        except (ValueError, pb_message.DecodeError) as e:
            raise ParseError(f"a fork layer's fields do not decode ({e}); the file is "
                             "corrupt", path) from None
    bad = _non_utf8_field(message)
    if bad:
        raise ParseError(f"field {bad} is not UTF-8 text; the file is corrupt or of "
                         "another kind", path)
    return message


def _non_utf8_field(message: pb_message.Message, prefix: str = "") -> str | None:
    """The path of a string field that holds non-UTF-8 bytes (protobuf hands those
    out as bytes, which nothing downstream expects), or None."""
    for field, value in message.ListFields():
        name = prefix + field.name
        if field.type == FieldDescriptor.TYPE_STRING:
            values = value if field.is_repeated else [value]
            for i, text in enumerate(values):
                if isinstance(text, bytes):
                    return f"{name}[{i}]" if field.is_repeated else name
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            values = value if field.is_repeated else [value]
            for i, sub in enumerate(values):
                where = f"{name}[{i}]." if field.is_repeated else f"{name}."
                bad = _non_utf8_field(sub, where)
                if bad:
                    return bad
    return None


def write_binary(path: str, message: pb_message.Message) -> None:
    """Serialize `message` to `path` atomically."""
    atomic_write(path, message.SerializeToString())
