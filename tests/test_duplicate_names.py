"""Duplicate layer names: built as Caffe builds them (HED names five Crop layers
alike), refused only where weights would be copied or saved by an ambiguous name."""
from __future__ import annotations

import logging

import numpy as np
import pytest

import protonet
from protonet import caffe_pb2
from protonet.io.text import parse_text
from protonet.io.weights import save_caffemodel, save_hdf5

HED_LIKE = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 2 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" } } }
layer { name: "up1" type: "Deconvolution" bottom: "conv" top: "up1"
        convolution_param { num_output: 1 kernel_size: 4 stride: 2 bias_term: false } }
layer { name: "crop" type: "Crop" bottom: "up1" bottom: "data" top: "c1" crop_param { offset: 1 } }
layer { name: "up2" type: "Deconvolution" bottom: "conv" top: "up2"
        convolution_param { num_output: 1 kernel_size: 4 stride: 2 bias_term: false } }
layer { name: "crop" type: "Crop" bottom: "up2" bottom: "data" top: "c2" crop_param { offset: 1 } }
"""


def _net(text: str) -> protonet.Net:
    return protonet.Net(parse_text(text, caffe_pb2.NetParameter()), protonet.TEST)


def test_duplicate_names_without_params_build_with_a_warning(caplog, tmp_path):
    with caplog.at_level(logging.WARNING, logger="protonet"):
        net = _net(HED_LIKE)
    assert [r for r in caplog.records if "'crop'" in r.getMessage()
            and r.levelname == "WARNING"]
    out = net.forward(data=np.ones((1, 1, 8, 8), np.float32))
    assert out["c1"].shape == out["c2"].shape == (1, 1, 8, 8)
    # Weights still copy by name: both files round-trip into a fresh net.
    for save, name in ((save_caffemodel, "w.caffemodel"), (save_hdf5, "w.h5")):
        path = str(tmp_path / name)
        save(net.module, path)
        again = _net(HED_LIKE)
        again.copy_from(path)
        np.testing.assert_array_equal(again.params["conv"][0].data,
                                      net.params["conv"][0].data)


def test_duplicate_names_with_params_refuse_weights(tmp_path):
    text = HED_LIKE.replace('name: "up2"', 'name: "up1"')
    net = _net(text)                          # building is fine, as in Caffe
    with pytest.raises(protonet.ProtonetError, match="2 layers named 'up1'"):
        save_caffemodel(net.module, str(tmp_path / "w.caffemodel"))
        net.copy_from(str(tmp_path / "w.caffemodel"))
    with pytest.raises(protonet.ProtonetError, match="'up1'"):
        save_hdf5(net.module, str(tmp_path / "w.h5"))


def test_a_file_with_two_weighted_layers_of_one_name_is_ambiguous(tmp_path):
    net = _net(HED_LIKE)
    model = caffe_pb2.NetParameter()
    for _ in range(2):
        layer = model.layer.add(name="conv", type="Convolution")
        blob = layer.blobs.add()
        blob.shape.dim.extend([2, 1, 3, 3])
        blob.data.extend([0.0] * 18)
    path = tmp_path / "dup.caffemodel"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(protonet.ProtonetError, match="2 layers named 'conv' with weights"):
        net.copy_from(str(path))
