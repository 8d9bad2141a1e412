"""Layer implementations, one module per family, all behind the type registry."""
from .base import Layer
from .registry import layer_class, register, registered_types

# Importing a family module registers its layer types.
from . import (  # noqa: F401,E402
    classification, conv, detection, fork_bn, inner_product, input, loss, lrn, multibox,
    neuron, normalization, pooling, python_layer, recurrent, structure, upsampling,
)
from . import channel_ops, roi  # noqa: F401,E402  (Caffe forks' layers: docs/forks.md)

__all__ = ["Layer", "layer_class", "register", "registered_types"]
