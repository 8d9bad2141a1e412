"""pycaffe's `caffe.io`: the Transformer, image loading and resizing, oversampling,
and BlobProto / Datum conversions.

Images are decoded and resized by OpenCV rather than scikit-image (not a protonet
dependency). What callers see is pycaffe's: `load_image` gives float32 RGB (or
intensity) in [0, 1], H x W x 3 (or x 1); `resize_image` keeps the value range and
the pixel-centre grid of skimage's resize. Orders 0 and 1 give skimage's values
(checked against skimage 0.19 without anti-aliasing), except that enlarging does
not blend the border with zeros (skimage's mode='constant' darkens a 1-pixel rim)
and shrinking never smooths first (skimage >= 0.15 does by default); orders 2 to 5
use bicubic (4, 5: Lanczos) rather than splines. protonet's own file readers are
protonet.io, a different module.
"""
from __future__ import annotations

import os

import cv2
import numpy as np

from .. import classify as _classify
from ..errors import ProtonetError
from .proto import caffe_pb2


# -- proto / datum / ndarray conversion -------------------------------------------------
def blobproto_to_array(blob, return_diff: bool = False) -> np.ndarray:
    """The blob's data (or diff) as a float64 array in the blob's shape: the legacy
    num/channels/height/width when any is set, else shape.dim (no shape: a scalar,
    or ValueError when the blob holds more than one value)."""
    data = np.array(blob.diff if return_diff else blob.data)
    if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        return data.reshape(blob.num, blob.channels, blob.height, blob.width)
    return data.reshape(tuple(blob.shape.dim))


def array_to_blobproto(arr, diff=None):
    """A BlobProto with `arr`'s shape (shape.dim) and values (and `diff`'s)."""
    arr = np.asarray(arr)
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend(int(d) for d in arr.shape)
    blob.data.extend(arr.astype(float).flat)
    if diff is not None:
        blob.diff.extend(np.asarray(diff).astype(float).flat)
    return blob


def arraylist_to_blobprotovector_str(arraylist) -> bytes:
    """A serialized BlobProtoVector of the arrays."""
    vec = caffe_pb2.BlobProtoVector()
    vec.blobs.extend(array_to_blobproto(a) for a in arraylist)
    return vec.SerializeToString()


def blobprotovector_str_to_arraylist(serialized: bytes) -> list[np.ndarray]:
    """The arrays of a serialized BlobProtoVector."""
    vec = caffe_pb2.BlobProtoVector()
    vec.ParseFromString(serialized)
    return [blobproto_to_array(b) for b in vec.blobs]


def array_to_datum(arr, label=None):
    """A Datum of a C x H x W array: uint8 arrays as the `data` bytes, anything else as
    float_data. The label is set only when given."""
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise ValueError("Incorrect array shape.")
    datum = caffe_pb2.Datum()
    datum.channels, datum.height, datum.width = (int(d) for d in arr.shape)
    if arr.dtype == np.uint8:
        datum.data = arr.tobytes()
    else:
        datum.float_data.extend(arr.astype(float).flat)
    if label is not None:
        datum.label = int(label)
    return datum


def datum_to_array(datum) -> np.ndarray:
    """The Datum's C x H x W array: uint8 from `data`, else float64 from float_data
    (the label is datum.label)."""
    shape = (datum.channels, datum.height, datum.width)
    if len(datum.data):
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(shape).copy()
    return np.array(datum.float_data, dtype=float).reshape(shape)


# -- pre-processing ---------------------------------------------------------------------
class Transformer:
    """Formats H x W x K images for a net's input blobs, as pycaffe's Transformer:
    `inputs` maps each input name to its blob shape (N, K, H, W)."""

    def __init__(self, inputs):
        self.inputs = {k: tuple(v) for k, v in dict(inputs).items()}
        self.transpose: dict = {}
        self.channel_swap: dict = {}
        self.raw_scale: dict = {}
        self.mean: dict = {}
        self.input_scale: dict = {}

    def __check_input(self, in_):
        if in_ not in self.inputs:
            raise Exception(f"{in_} is not one of the net inputs: {self.inputs}")

    def preprocess(self, in_, data) -> np.ndarray:
        """H' x W' x K image -> K x H x W net input, in pycaffe's order: float32,
        resize to the blob's H x W, transpose, channel swap, * raw_scale, - mean,
        * input_scale."""
        self.__check_input(in_)
        caffe_in = np.asarray(data).astype(np.float32, copy=False)
        in_dims = self.inputs[in_][2:]
        if caffe_in.shape[:2] != in_dims:
            caffe_in = resize_image(caffe_in, in_dims)
        transpose = self.transpose.get(in_)
        channel_swap = self.channel_swap.get(in_)
        raw_scale = self.raw_scale.get(in_)
        mean = self.mean.get(in_)
        input_scale = self.input_scale.get(in_)
        if transpose is not None:
            caffe_in = caffe_in.transpose(transpose)
        if channel_swap is not None:
            caffe_in = caffe_in[list(channel_swap), :, :]
        if raw_scale is not None:
            caffe_in *= raw_scale
        if mean is not None:
            caffe_in -= mean
        if input_scale is not None:
            caffe_in *= input_scale
        return caffe_in

    def deprocess(self, in_, data) -> np.ndarray:
        """preprocess undone, in reverse order (no resize back); singleton axes dropped."""
        self.__check_input(in_)
        decaf_in = np.array(data, copy=True).squeeze()
        transpose = self.transpose.get(in_)
        channel_swap = self.channel_swap.get(in_)
        raw_scale = self.raw_scale.get(in_)
        mean = self.mean.get(in_)
        input_scale = self.input_scale.get(in_)
        if input_scale is not None:
            decaf_in /= input_scale
        if mean is not None:
            decaf_in += mean
        if raw_scale is not None:
            decaf_in /= raw_scale
        if channel_swap is not None:
            decaf_in = decaf_in[np.argsort(channel_swap), :, :]
        if transpose is not None:
            decaf_in = decaf_in.transpose(np.argsort(transpose))
        return decaf_in

    def set_transpose(self, in_, order) -> None:
        """Axis order, e.g. (2, 0, 1) for H x W x K -> K x H x W."""
        self.__check_input(in_)
        if len(order) != len(self.inputs[in_]) - 1:
            raise Exception("Transpose order needs to have the same number of "
                            "dimensions as the input.")
        self.transpose[in_] = order

    def set_channel_swap(self, in_, order) -> None:
        """Channel order after transpose, e.g. (2, 1, 0) for RGB -> BGR."""
        self.__check_input(in_)
        if len(order) != self.inputs[in_][1]:
            raise Exception("Channel swap needs to have the same number of "
                            "dimensions as the input channels.")
        self.channel_swap[in_] = order

    def set_raw_scale(self, in_, scale) -> None:
        """Multiply the raw image (e.g. 255 for [0, 1] images and [0, 255] models)."""
        self.__check_input(in_)
        self.raw_scale[in_] = scale

    def set_mean(self, in_, mean) -> None:
        """Mean to subtract: per channel (K,) or per pixel (K x H x W, or H x W); a
        per-pixel mean of another size is resized to the input's H x W."""
        self.__check_input(in_)
        mean = np.asarray(mean)
        ms = mean.shape
        if mean.ndim == 1:
            if ms[0] != self.inputs[in_][1]:
                raise ValueError("Mean channels incompatible with input.")
            mean = mean[:, np.newaxis, np.newaxis]
        else:
            if len(ms) == 2:
                ms = (1,) + ms
            if len(ms) != 3:
                raise ValueError("Mean shape invalid")
            if ms != self.inputs[in_][1:]:
                in_shape = self.inputs[in_][1:]
                m_min, m_max = mean.min(), mean.max()
                normal = (mean - m_min) / (m_max - m_min)
                mean = resize_image(normal.transpose((1, 2, 0)), in_shape[1:]) \
                    .transpose((2, 0, 1)) * (m_max - m_min) + m_min
        self.mean[in_] = mean

    def set_input_scale(self, in_, scale) -> None:
        """Multiply after mean subtraction (raw_scale multiplies before)."""
        self.__check_input(in_)
        self.input_scale[in_] = scale


# -- image I/O --------------------------------------------------------------------------
_GRAY = np.array([0.2125, 0.7154, 0.0721], dtype=np.float64)   # skimage's rgb2gray


def load_image(filename, color: bool = True) -> np.ndarray:
    """An image file as float32 in [0, 1]: H x W x 3 RGB when `color`, else
    H x W x 1 intensity (colour images converted with skimage's rgb2gray weights).
    Grey files are repeated to 3 channels when `color`; alpha is dropped."""
    img = cv2.imread(os.fspath(filename), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ProtonetError(f"{filename}: cannot read as an image (missing, or a format "
                            "OpenCV does not decode)")
    if img.dtype == np.uint8:
        img = img.astype(np.float64) / 255.0
    elif img.dtype == np.uint16:
        img = img.astype(np.float64) / 65535.0
    else:
        img = img.astype(np.float64)
    if img.ndim == 3:
        img = img[:, :, [2, 1, 0, 3][:img.shape[2]]] if img.shape[2] in (3, 4) else img
        if img.shape[2] == 4:
            img = img[:, :, :3]
        if not color:
            img = img[:, :, :3] @ _GRAY if img.shape[2] >= 3 else img[:, :, 0]
    img = img.astype(np.float32)
    if img.ndim == 2:
        img = img[:, :, np.newaxis]
        if color:
            img = np.tile(img, (1, 1, 3))
    return img


_INTERP = {1: cv2.INTER_LINEAR, 2: cv2.INTER_CUBIC, 3: cv2.INTER_CUBIC,
           4: cv2.INTER_LANCZOS4, 5: cv2.INTER_LANCZOS4}


def _nearest(n_out: int, n_in: int) -> np.ndarray:
    """Source index of each output pixel: the one under its centre (skimage's order 0)."""
    centres = (np.arange(n_out) + 0.5) * (n_in / n_out)
    return np.minimum(np.floor(centres), n_in - 1).astype(np.intp)


def _resample(im: np.ndarray, new_dims, interp_order: int) -> np.ndarray:
    if interp_order == 0:
        return im[_nearest(int(new_dims[0]), im.shape[0])][:, _nearest(int(new_dims[1]),
                                                                         im.shape[1])]
    if interp_order not in _INTERP:
        raise ProtonetError(f"resize_image: interp_order must be 0 to 5, got {interp_order}")
    size = (int(new_dims[1]), int(new_dims[0]))
    channels = [cv2.resize(np.ascontiguousarray(im[:, :, k]), size,
                           interpolation=_INTERP[interp_order])
                for k in range(im.shape[2])]
    return np.stack(channels, axis=2)


def resize_image(im, new_dims, interp_order: int = 1) -> np.ndarray:
    """An H x W x K image resized to new_dims (height, width), float32, with
    interpolation of order `interp_order` (0 nearest, 1 bilinear, 2-5 bicubic or
    Lanczos). A constant image stays that constant; 1- and 3-channel images are
    resampled in [0, 1] and scaled back to their own range, as pycaffe does."""
    im = np.asarray(im)
    if im.ndim != 3:
        raise ProtonetError(f"resize_image expects an H x W x K array, got shape "
                            f"{list(im.shape)}")
    new_dims = tuple(int(d) for d in new_dims)
    if im.shape[-1] in (1, 3):
        im_min, im_max = im.min(), im.max()
        if not im_max > im_min:
            return np.full((new_dims[0], new_dims[1], im.shape[-1]), im_min,
                           dtype=np.float32)
        std = ((im - im_min) / (im_max - im_min)).astype(np.float32)
        resized = _resample(std, new_dims, interp_order).astype(np.float64)
        resized = np.clip(resized, 0.0, 1.0) * (im_max - im_min) + im_min
    else:
        resized = _resample(im.astype(np.float32), new_dims, interp_order)
    return resized.astype(np.float32)


def oversample(images, crop_dims) -> np.ndarray:
    """10 crops of each H x W x K image, float32 (10 N x h x w x K): the four corners
    and the centre, then the same five mirrored left-right."""
    height, width = (int(d) for d in crop_dims)
    return np.concatenate([_classify.oversample(np.asarray(im), height, width)
                           for im in images]).astype(np.float32)
