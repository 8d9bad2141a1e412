"""Caffe type name -> Layer class, like Caffe's LayerRegistry.

Layers register themselves with the `register` decorator; users add their own types the
same way (see docs/extending.md) without touching protonet.
"""
from __future__ import annotations

from typing import Callable, TypeVar

from ..errors import NetError, closest
from .base import Layer

_REGISTRY: dict[str, type[Layer]] = {}
L = TypeVar("L", bound=type[Layer])


def register(type_name: str, *, replace: bool = False) -> Callable[[L], L]:
    """Class decorator: make `cls` the implementation of Caffe type `type_name`."""
    def wrap(cls: L) -> L:
        if type_name in _REGISTRY and not replace and _REGISTRY[type_name] is not cls:
            raise ValueError(f"layer type '{type_name}' is already registered "
                             f"({_REGISTRY[type_name].__qualname__}); pass replace=True")
        cls.type = type_name
        _REGISTRY[type_name] = cls
        return cls
    return wrap


_DATA_LOADED = False


def _load_data_layers() -> None:
    """The data layers (Data, ImageData, HDF5Data, AnnotatedData, ...) live in
    protonet.data and register when imported; the first lookup imports them, so
    however protonet was imported (`import protonet` itself loads no torch) the
    registry knows them, without an import cycle with protonet.layers."""
    global _DATA_LOADED
    if not _DATA_LOADED:
        _DATA_LOADED = True
        from ..data import annotated, hdf5, layers  # noqa: F401


def layer_class(type_name: str, layer_name: str = "") -> type[Layer]:
    """The class for `type_name`, or an error naming the closest known types."""
    _load_data_layers()
    cls = _REGISTRY.get(type_name)
    if cls is None:
        raise NetError(f"unknown layer type '{type_name}'{closest(type_name, _REGISTRY)}",
                       layer_name or None)
    return cls


def registered_types() -> list[str]:
    _load_data_layers()
    return sorted(_REGISTRY)
