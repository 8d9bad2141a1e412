"""Protobuf text format (prototxt) reading and writing with located errors.

A few fields exist only in Caffe forks but appear in published model files; where
their meaning maps exactly onto a BVLC field they are rewritten with a warning
(see FORK_FIELDS), otherwise the error names the file, line and column.
"""
from __future__ import annotations

import re
import warnings
from typing import Callable, TypeVar

from google.protobuf import message as pb_message
from google.protobuf import text_format

from ..errors import ParseError, closest
from .atomic import atomic_write

M = TypeVar("M", bound=pb_message.Message)

_NO_FIELD = re.compile(r'Message type "([\w.]+)" has no field named "(\w+)"')
_NO_ENUM = re.compile(r'Enum type "([\w.]+)" has no value named (\w+)')
_PREFIX = re.compile(r"^\d+:\d+ : (?:'[^\n]*?': )?")


def _ceil_mode(value: str) -> str:
    lowered = value.lower()
    if lowered in ("true", "t", "1"):
        return "round_mode: CEIL"
    if lowered in ("false", "f", "0"):
        return "round_mode: FLOOR"
    raise ValueError("expected true or false")


# (message full name, field) -> (translation of the value text, explanation)
FORK_FIELDS: dict[tuple[str, str], tuple[Callable[[str], str], str]] = {
    ("caffe.PoolingParameter", "ceil_mode"):
        (_ceil_mode, "ceil_mode is a fork field; read as BVLC round_mode"),
}


def parse_text(text: str, message: M, path: str | None = None) -> M:
    """Merge prototxt `text` into `message` and return it."""
    for _ in range(1000):  # one pass per fork field rewritten
        try:
            message.Clear()
            text_format.Parse(text, message)
            return message
        except text_format.ParseError as e:
            rewritten = _rewrite_fork_field(text, e, path)
            if rewritten is None:
                raise _located(e, message, path) from None
            text = rewritten
    raise ParseError("too many fork fields to rewrite", path)


def read_text(path: str, message: M) -> M:
    """Read a prototxt file into `message`."""
    return parse_text(_read_file(path), message, path)


def to_text(message: pb_message.Message) -> str:
    return text_format.MessageToString(message, as_utf8=True)


def write_text(path: str, message: pb_message.Message) -> None:
    """Write `message` as prototxt, atomically."""
    atomic_write(path, to_text(message))


def _read_file(path: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ParseError("file not found", path) from None
    except OSError as e:
        raise ParseError(f"cannot read ({e.strerror})", path) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ParseError(f"not UTF-8 text (byte {e.start}); is this a binary "
                         "file? Binary protos are read with read_binary", path) from None


def _offset(text: str, line: int, column: int) -> int:
    lines = text.split("\n")
    return sum(len(l) + 1 for l in lines[: line - 1]) + column - 1


def _rewrite_fork_field(text: str, error: text_format.ParseError,
                        path: str | None) -> str | None:
    match = _NO_FIELD.search(str(error))
    if not match or error.GetLine() is None:
        return None
    entry = FORK_FIELDS.get((match.group(1), match.group(2)))
    if entry is None:
        return None
    translate, why = entry
    start = _offset(text, error.GetLine(), error.GetColumn())
    field = re.compile(re.escape(match.group(2)) + r"\s*:\s*([\w.+-]+)")
    found = field.match(text, start)
    if not found:
        return None
    where = f"{path or '<string>'}:{error.GetLine()}:{error.GetColumn()}"
    try:
        replacement = translate(found.group(1))
    except ValueError as bad:
        raise ParseError(f"{match.group(2)}: {bad}", path, error.GetLine(),
                         error.GetColumn()) from None
    warnings.warn(f"{where}: {why} ('{found.group(0)}' -> '{replacement}')",
                  stacklevel=4)
    return text[:start] + replacement + text[found.end():]


def _located(error: text_format.ParseError, message: pb_message.Message,
             path: str | None) -> ParseError:
    detail = _PREFIX.sub("", str(error))
    hint = ""
    field = _NO_FIELD.search(detail)
    enum = _NO_ENUM.search(detail)
    if field:
        desc = _find_message(message.DESCRIPTOR, field.group(1))
        if desc is not None:
            names = [f.name for f in desc.fields]
            hint = closest(field.group(2), names) or (
                "; valid fields: " + ", ".join(sorted(names)))
    elif enum:
        desc = _find_enum(message.DESCRIPTOR, enum.group(1))
        if desc is not None:
            hint = "; valid values: " + ", ".join(v.name for v in desc.values)
    return ParseError(detail + hint, path, error.GetLine(), error.GetColumn())


def _find_message(root, full_name: str):
    pool = root.file.pool
    try:
        return pool.FindMessageTypeByName(full_name)
    except KeyError:
        return None


def _find_enum(root, full_name: str):
    pool = root.file.pool
    try:
        return pool.FindEnumTypeByName(full_name)
    except KeyError:
        return None
