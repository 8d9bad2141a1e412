"""Generated protobuf bindings for Caffe's schema (see protos/caffe.proto)."""
from . import caffe_pb2

__all__ = ["caffe_pb2"]
