"""Every error protonet raises on purpose derives from ProtonetError.

The CLI prints these as one readable message (no traceback); each names where the
problem is (file, line:column, layer, field) and what was expected there.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class ProtonetError(Exception):
    """Base of all deliberate protonet errors."""


class ParseError(ProtonetError):
    """A text or binary file could not be read as the expected message."""

    def __init__(self, message: str, path: str | None = None,
                 line: int | None = None, column: int | None = None):
        self.path, self.line, self.column = path, line, column
        where = path or "<string>"
        if line is not None:
            where += f":{line}"
            if column is not None:
                where += f":{column}"
        super().__init__(f"{where}: {message}")


class NetError(ProtonetError):
    """The net definition is inconsistent (wiring, rules, params)."""

    def __init__(self, message: str, layer: str | None = None,
                 layer_type: str | None = None):
        self.layer, self.layer_type = layer, layer_type
        self.detail = message                   # the message without the layer
        if layer is not None:
            kind = f" ({layer_type})" if layer_type else ""
            label = f"layer '{layer}'" if layer else "an unnamed layer"
            message = f"{label}{kind}: {message}"
        super().__init__(message)


class ShapeError(NetError):
    """Blob shapes do not fit a layer's expectations."""


class WeightsError(ProtonetError):
    """Weights from a file do not fit the net they are copied into."""


class SolverError(ProtonetError):
    """The solver definition or state is invalid."""


class DataError(ProtonetError):
    """A dataset (LMDB, HDF5, image list) is missing or malformed."""


_ALSO: dict[tuple[type, type], type] = {}


def also_a(error: ProtonetError, kind: type[BaseException]) -> ProtonetError:
    """`error`, made an instance of `kind` too (a subclass of both, same message).

    pycaffe scripts catch the exception types Caffe's Python bindings raise: a Python
    layer's own exception comes back as its type, a file Caffe cannot open as a
    RuntimeError, a missing name as a KeyError or ValueError. protonet's errors stay
    ProtonetErrors (one readable message, the layer named) and are caught by those
    handlers too. Types whose instances cannot share a layout (OSError) are left as is.
    """
    if isinstance(error, kind) or not issubclass(kind, Exception) or \
            kind.__module__ != "builtins":
        return error
    key = (type(error), kind)
    cls = _ALSO.get(key)
    if cls is None:
        try:
            base = type(error)
            cls = type(base.__name__, key, {
                "__str__": Exception.__str__, "__module__": base.__module__,
                # pickled as the protonet class (this one cannot be looked up by name)
                "__reduce__": lambda self, base=base: (base, self.args, self.__dict__)})
        except TypeError:
            return error
        _ALSO[key] = cls
    try:
        error.__class__ = cls
    except TypeError:
        pass
    return error


def closest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """A ' (did you mean ...?)' hint, or '' when nothing is close."""
    choices = list(choices)
    matches = difflib.get_close_matches(name, choices, n=n, cutoff=0.6)
    if not matches:   # case-only typos ('Relu' for 'ReLU') rank low by plain ratio
        by_lower = {c.lower(): c for c in choices}
        matches = [by_lower[m] for m in
                   difflib.get_close_matches(name.lower(), list(by_lower), n=n, cutoff=0.6)]
    if not matches:
        return ""
    return " (did you mean " + " or ".join(f"'{m}'" for m in matches) + "?)"
