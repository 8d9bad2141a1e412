"""pycaffe's `caffe.proto`: `caffe.proto.caffe_pb2` is protonet's caffe_pb2 itself
(one module object, registered under this package's name too)."""
import sys

from ...proto import caffe_pb2

sys.modules.setdefault(__name__ + ".caffe_pb2", caffe_pb2)

__all__ = ["caffe_pb2"]
