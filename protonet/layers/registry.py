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


def layer_class(type_name: str, layer_name: str = "") -> type[Layer]:
    """The class for `type_name`, or an error naming the closest known types."""
    cls = _REGISTRY.get(type_name)
    if cls is None:
        raise NetError(f"unknown layer type '{type_name}'{closest(type_name, _REGISTRY)}",
                       layer_name or None)
    return cls


def registered_types() -> list[str]:
    return sorted(_REGISTRY)
