"""pycaffe's `caffe.classifier`: Classifier, a Net that predicts class
probabilities of H x W x K images by scaling, centre cropping or oversampling."""
from __future__ import annotations

import numpy as np

from . import io as caffe_io
from ._caffe import current_device
from .pycaffe import Net
from ..pycaffe import TEST


def _transformer(net, mean, input_scale, raw_scale, channel_swap) -> caffe_io.Transformer:
    """The input's Transformer: H x W x K -> K x H x W, then the given options."""
    in_ = net.inputs[0]
    transformer = caffe_io.Transformer({in_: net.blobs[in_].data.shape})
    transformer.set_transpose(in_, (2, 0, 1))
    if mean is not None:
        transformer.set_mean(in_, mean)
    if input_scale is not None:
        transformer.set_input_scale(in_, input_scale)
    if raw_scale is not None:
        transformer.set_raw_scale(in_, raw_scale)
    if channel_swap is not None:
        transformer.set_channel_swap(in_, channel_swap)
    return transformer


class Classifier(Net):
    """Net(model_file, pretrained_file, TEST) with a Transformer for its first input.
    `image_dims` (default: the input's H x W) is what images are scaled to before
    cropping; mean, input_scale, raw_scale and channel_swap configure preprocessing."""

    def __init__(self, model_file, pretrained_file, image_dims=None, mean=None,
                 input_scale=None, raw_scale=None, channel_swap=None, device=None):
        Net.__init__(self, model_file, TEST, weights=pretrained_file,
                     device=device if device is not None else current_device())
        self.transformer = _transformer(self, mean, input_scale, raw_scale, channel_swap)
        self.crop_dims = np.array(self.blobs[self.inputs[0]].data.shape[2:])
        if image_dims is None or not len(image_dims):
            image_dims = self.crop_dims
        self.image_dims = image_dims

    def predict(self, inputs, oversample: bool = True) -> np.ndarray:
        """(N x C) class probabilities of N H x W x K images: each is resized to
        image_dims, then its ten crops' predictions are averaged (`oversample`) or its
        centre crop is classified."""
        images = np.zeros((len(inputs), int(self.image_dims[0]), int(self.image_dims[1]),
                           inputs[0].shape[2]), dtype=np.float32)
        for ix, image in enumerate(inputs):
            images[ix] = caffe_io.resize_image(image, self.image_dims)
        if oversample:
            images = caffe_io.oversample(images, self.crop_dims)
        else:
            center = np.array(self.image_dims) / 2.0
            box = (np.concatenate([center, center]) +
                   np.concatenate([-self.crop_dims / 2.0, self.crop_dims / 2.0])).astype(int)
            images = images[:, box[0]:box[2], box[1]:box[3], :]
        in_ = self.inputs[0]
        caffe_in = np.zeros((len(images), images.shape[3], *images.shape[1:3]),
                            dtype=np.float32)
        for ix, image in enumerate(images):
            caffe_in[ix] = self.transformer.preprocess(in_, image)
        predictions = self.forward_all(**{in_: caffe_in})[self.outputs[0]]
        if oversample:
            predictions = predictions.reshape((len(predictions) // 10, 10, -1)).mean(1)
        return predictions
