"""pycaffe's `caffe.detector`: Detector, R-CNN style windowed detection: crops
(with optional context padding) warped to the net's input and classified.

Window proposals are the caller's: `detect_windows` takes (image file, windows)
pairs. `detect_selective_search` needs the external selective_search_ijcv_with_python
package (and its MATLAB code), as in pycaffe; without it, it says so.
"""
from __future__ import annotations

import os

import numpy as np

from . import io as caffe_io
from ._caffe import current_device
from .classifier import _transformer
from .pycaffe import Net
from ..errors import ProtonetError
from ..pycaffe import TEST


class Detector(Net):
    """Net(model_file, pretrained_file, TEST) with a Transformer for its first input;
    `context_pad` pixels of each warped window are surrounding context (R-CNN)."""

    def __init__(self, model_file, pretrained_file, mean=None, input_scale=None,
                 raw_scale=None, channel_swap=None, context_pad=None, device=None):
        Net.__init__(self, model_file, TEST, weights=pretrained_file,
                     device=device if device is not None else current_device())
        self.transformer = _transformer(self, mean, input_scale, raw_scale, channel_swap)
        self.configure_crop(context_pad)

    def detect_windows(self, images_windows) -> list[dict]:
        """One {'window', 'prediction', 'filename'} dict per window of each
        (image filename, windows) pair; a window is (ymin, xmin, ymax, xmax)."""
        images_windows = [(name, list(windows)) for name, windows in images_windows]
        crops = []
        for filename, windows in images_windows:
            image = caffe_io.load_image(filename).astype(np.float32)
            crops += [self.crop(image, window) for window in windows]
        if not crops:
            return []
        in_ = self.inputs[0]
        caffe_in = np.zeros((len(crops), crops[0].shape[2]) + self.blobs[in_].data.shape[2:],
                            dtype=np.float32)
        for ix, crop in enumerate(crops):
            caffe_in[ix] = self.transformer.preprocess(in_, crop)
        predictions = self.forward_all(**{in_: caffe_in})[self.outputs[0]]
        detections, ix = [], 0
        for filename, windows in images_windows:
            for window in windows:
                detections.append({"window": window, "prediction": predictions[ix],
                                   "filename": filename})
                ix += 1
        return detections

    def detect_selective_search(self, image_fnames) -> list[dict]:
        """detect_windows over Selective Search proposals of each image."""
        try:
            import selective_search_ijcv_with_python as selective_search
        except ImportError:
            raise ProtonetError(
                "Detector.detect_selective_search needs an external proposal source: the "
                "selective_search_ijcv_with_python package (with MATLAB), which is not "
                "installed. Compute windows (ymin, xmin, ymax, xmax) with any proposal "
                "method and call detect_windows([(image_file, windows), ...])") from None
        image_fnames = [os.path.abspath(f) for f in image_fnames]
        windows = selective_search.get_windows(image_fnames, cmd="selective_search_rcnn")
        return self.detect_windows(zip(image_fnames, windows))

    def crop(self, im, window) -> np.ndarray:
        """The window (ymin, xmin, ymax, xmax) of an H x W x K image; with context_pad,
        the window grown so that context_pad pixels of the warped input are
        context, parts outside the image filled with the mean."""
        window = np.asarray(window)
        crop = im[window[0]:window[2], window[1]:window[3]]
        if not self.context_pad:
            return crop
        box = window.astype(float)
        crop_size = self.blobs[self.inputs[0]].width           # assumes square input
        scale = crop_size / (1.0 * crop_size - self.context_pad * 2)
        half_h = (box[2] - box[0] + 1) / 2.0
        half_w = (box[3] - box[1] + 1) / 2.0
        center = (box[0] + half_h, box[1] + half_w)
        box = np.round(np.tile(center, 2) + scale * np.array((-half_h, -half_w,
                                                               half_h, half_w)))
        scale_h = crop_size / (box[2] - box[0] + 1)
        scale_w = crop_size / (box[3] - box[1] + 1)
        pad_y = int(round(max(0, -box[0]) * scale_h))         # rows outside the image
        pad_x = int(round(max(0, -box[1]) * scale_w))
        im_h, im_w = im.shape[:2]
        box = np.clip(box, 0.0, [im_h, im_w, im_h, im_w])
        clip_h = box[2] - box[0] + 1
        clip_w = box[3] - box[1] + 1
        if not (clip_h > 0 and clip_w > 0):
            raise ProtonetError(f"window {window.tolist()} lies outside the "
                                f"{im_h}x{im_w} image")
        crop_h = min(int(round(clip_h * scale_h)), crop_size - pad_y)
        crop_w = min(int(round(clip_w * scale_w)), crop_size - pad_x)
        box = box.astype(int)
        context = caffe_io.resize_image(im[box[0]:box[2], box[1]:box[3]], (crop_h, crop_w))
        crop = np.ones(self.crop_dims, dtype=np.float32) * self.crop_mean
        crop[pad_y:pad_y + crop_h, pad_x:pad_x + crop_w] = context
        return crop

    def configure_crop(self, context_pad) -> None:
        """Crop dimensions (the input's H x W x K) and, with context padding, the mean
        in raw image space that fills context outside the image."""
        in_ = self.inputs[0]
        tpose = self.transformer.transpose[in_]
        inv_tpose = [tpose[t] for t in tpose]
        self.crop_dims = np.array(self.blobs[in_].data.shape[1:])[inv_tpose]
        self.context_pad = context_pad
        if not self.context_pad:
            return
        channel_order = self.transformer.channel_swap.get(in_)
        raw_scale = self.transformer.raw_scale.get(in_)
        mean = self.transformer.mean.get(in_)
        if mean is None:
            self.crop_mean = np.zeros(self.crop_dims, dtype=np.float32)
            return
        crop_mean = np.array(mean, dtype=np.float32).transpose(inv_tpose)
        if channel_order is not None:
            order = list(channel_order)
            crop_mean = crop_mean[:, :, [order.index(i) for i in range(crop_mean.shape[2])]]
        if raw_scale is not None:
            crop_mean /= raw_scale
        self.crop_mean = crop_mean
