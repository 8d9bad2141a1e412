"""Protobuf text format (prototxt) reading and writing with located errors.

A few fields exist only in Caffe forks but appear in published model files; where
their meaning maps exactly onto a BVLC field they are rewritten with a warning
(see FORK_FIELDS), otherwise the error names the file, line and column.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Callable, TypeVar

from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message as pb_message
from google.protobuf import text_format

from ..errors import ParseError, closest
from .atomic import atomic_write
from .forks import fork_of_enum_value, fork_of_field

M = TypeVar("M", bound=pb_message.Message)

_NO_FIELD = re.compile(r'Message type "([\w.]+)" has no field named "(\w+)"')
_NO_ENUM = re.compile(r'Enum type "([\w.]+)" has no value (?:named|with number) ([\w-]+)')
_PREFIX = re.compile(r"^\d+:\d+ : (?:'[^\n]*?': )?")
# Errors about the value given to a field: the hint names the field and its type.
_BAD_VALUE = re.compile(r"^(Couldn't parse|Expected (string|\"true\"|\":\")|Value out of range"
                        r"|Invalid)")
_FIELD_BEFORE = re.compile(r"(\w+)\s*:?\s*$")
# Bytes that never occur in a prototxt (only in binary files decoded as text).
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f]")


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
                raise _located(e, message, path, text) from None
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


# The protobuf size limit Caffe's readers have; text files get the same bound.
MAX_TEXT_BYTES = 2**31 - 1


def _read_file(path: str) -> str:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_TEXT_BYTES:
                raise ParseError(f"{size} bytes is over the 2 GiB protobuf limit", path)
            raw = f.read()
    except FileNotFoundError:
        raise ParseError("file not found", path) from None
    except OSError as e:
        raise ParseError(f"cannot read ({e.strerror})", path) from None
    except ValueError:          # a NUL byte in the name
        raise ParseError("not a valid file name", repr(path)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ParseError(f"not UTF-8 text (byte {e.start}); is this a binary "
                         "file? Binary protos are read with read_binary", path) from None
    control = _CONTROL.search(text)
    if control:
        raise ParseError(f"control character {control.group()!r} at byte "
                         f"{len(text[:control.start()].encode('utf-8'))}; is this a binary "
                         "file? Binary protos are read with read_binary", path)
    return text


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
             path: str | None, text: str) -> ParseError:
    detail = _PREFIX.sub("", str(error))
    line, column = error.GetLine(), error.GetColumn()
    hint = ""
    field = _NO_FIELD.search(detail)
    enum = _NO_ENUM.search(detail)
    if field:
        desc = _find_message(message.DESCRIPTOR, field.group(1))
        fork = fork_of_field(field.group(1), field.group(2))
        if fork is not None:
            hint = (f" (a field of the {fork} Caffe fork, which protonet does not "
                    "read; see docs/forks.md)")
        elif desc is not None:
            names = [f.name for f in desc.fields]
            hint = closest(field.group(2), names) or (
                "; valid fields: " + ", ".join(sorted(names)))
    elif enum:
        desc = _find_enum(message.DESCRIPTOR, enum.group(1))
        fork = fork_of_enum_value(enum.group(1), enum.group(2))
        if fork is not None:
            hint = (f" (a value of the {fork} Caffe fork, which protonet does not "
                    "read; see docs/forks.md)")
        elif desc is not None:
            hint = "; valid values: " + ", ".join(v.name for v in desc.values)
    elif line is not None and _BAD_VALUE.match(detail):
        name = _field_before(text, _offset(text, line, column))
        if name:
            kinds = _field_kinds(message.DESCRIPTOR, name)
            hint = f" (in the value of field '{name}'" + (
                f", which takes {kinds.pop()})" if len(kinds) == 1 else ")")
    elif detail.startswith('Expected "}"'):
        opened = _unclosed_block(text)
        if opened is not None:
            hint = (f" (the text ends inside '{opened[0]}', opened at "
                    f"{opened[1]}:{opened[2]} and never closed)")
    return ParseError(detail + hint, path, line, column)


_SCALAR_KINDS = {
    pb_descriptor.FieldDescriptor.TYPE_DOUBLE: "a double",
    pb_descriptor.FieldDescriptor.TYPE_FLOAT: "a float",
    pb_descriptor.FieldDescriptor.TYPE_INT64: "an int64",
    pb_descriptor.FieldDescriptor.TYPE_UINT64: "a uint64",
    pb_descriptor.FieldDescriptor.TYPE_INT32: "an int32",
    pb_descriptor.FieldDescriptor.TYPE_UINT32: "a uint32",
    pb_descriptor.FieldDescriptor.TYPE_BOOL: "true or false",
    pb_descriptor.FieldDescriptor.TYPE_STRING: "a quoted string",
    pb_descriptor.FieldDescriptor.TYPE_BYTES: "a quoted string",
}


def _field_kinds(root, name: str) -> set[str]:
    """What fields called `name` (in messages reachable from `root`) take."""
    kinds: set[str] = set()
    seen: set[str] = set()
    stack = [root]
    while stack:
        desc = stack.pop()
        if desc.full_name in seen:
            continue
        seen.add(desc.full_name)
        for f in desc.fields:
            if f.message_type is not None:
                stack.append(f.message_type)
            if f.name != name:
                continue
            if f.enum_type is not None:
                kinds.add("one of " + ", ".join(v.name for v in f.enum_type.values))
            elif f.message_type is not None:
                kinds.add("a message { ... }")
            else:
                kinds.add(_SCALAR_KINDS.get(f.type, "a scalar"))
    return kinds


def _unclosed_block(text: str) -> tuple[str, int, int] | None:
    """(field name, line, column) of the innermost '{' or '<' left open at the end."""
    stack: list[tuple[int, int, int]] = []      # (offset, line, column) of each opening
    line, column, i, n = 1, 1, 0, len(text)
    while i < n:
        c = text[i]
        if c in "\"'":                      # skip a string literal, escapes included
            j = i + 1
            while j < n and text[j] not in (c, "\n"):
                j += 2 if text[j] == "\\" else 1
            j = j + 1 if j < n and text[j] == c else j   # past the closing quote
            column += j - i
            i = j
            continue
        if c == "#":                         # a comment runs to the end of the line
            j = text.find("\n", i)
            column += (n if j < 0 else j) - i
            i = n if j < 0 else j
            continue
        if c in "{<":
            stack.append((i, line, column))
        elif c in "}>" and stack:
            stack.pop()
        if c == "\n":
            line, column = line + 1, 1
        else:
            column += 1
        i += 1
    if not stack:
        return None
    offset, line, column = stack[-1]
    name = _field_before(text, offset)
    return (name or "?", line, column)


def _field_before(text: str, offset: int) -> str | None:
    """The field name just before `offset` ('name:' or 'name {')."""
    found = _FIELD_BEFORE.search(text[max(0, offset - 256):offset])
    return found.group(1) if found else None


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
