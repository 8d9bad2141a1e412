"""Fork fields in the schema: the forks' numbers, aliases, binary remapping, errors."""
from __future__ import annotations

import pytest

from protonet.errors import ParseError
from protonet.io.binary import parse_binary
from protonet.io.forks import ALIAS_BASE, _encode_varint
from protonet.io.text import parse_text
from protonet.proto import caffe_pb2


@pytest.mark.parametrize("message, field, number", [
    # SSD (weiliu89/caffe ssd)
    ("LayerParameter", "annotated_data_param", 200),
    ("LayerParameter", "multibox_loss_param", 201),
    ("LayerParameter", "permute_param", 202), ("LayerParameter", "prior_box_param", 203),
    ("LayerParameter", "detection_output_param", 204),
    ("LayerParameter", "detection_evaluate_param", 205),
    ("LayerParameter", "norm_param", 206), ("TransformationParameter", "expand_param", 14),
    ("TransformationParameter", "distort_param", 13), ("AnnotatedDatum", "annotation_group", 3),
    ("MultiBoxLossParameter", "use_prior_for_nms", 23), ("SolverState", "minimum_loss", 5),
    # SegNet / ENet / PSPNet
    ("LayerParameter", "bn_param", 45), ("LayerParameter", "dense_image_data_param", 46),
    ("LayerParameter", "upsample_param", ALIAS_BASE + 137),
    ("LayerParameter", "interp_param", ALIAS_BASE + 143),
    ("BNParameter", "bn_mode", 3), ("BNParameter", "momentum", ALIAS_BASE + 3),
    ("BNParameter", "frozen", 5), ("LossParameter", "class_weighting", 4),
    # R-CNN family, ShuffleNet, NVCaffe/OpenCV blobs
    ("LayerParameter", "roi_pooling_param", 8266711),
    ("LayerParameter", "smooth_l1_loss_param", 8266712),
    ("LayerParameter", "psroi_pooling_param", 10001),
    ("LayerParameter", "shuffle_channel_param", 164),
    ("BlobProto", "raw_data_type", 10), ("BlobProto", "raw_data", 12),
    ("DropoutParameter", "scale_train", 2),
])
def test_fork_field_numbers(message, field, number):
    assert getattr(caffe_pb2, message).DESCRIPTOR.fields_by_name[field].number == number


def test_fork_defaults():
    assert caffe_pb2.PriorBoxParameter().clip is False          # SSD's, not OpenCV's
    assert caffe_pb2.PriorBoxParameter().offset == pytest.approx(0.5)
    assert caffe_pb2.DetectionOutputParameter().keep_top_k == -1
    assert caffe_pb2.NonMaximumSuppressionParameter().nms_threshold == pytest.approx(0.3)
    assert caffe_pb2.NormalizeParameter().eps == pytest.approx(1e-10)
    assert caffe_pb2.UpsampleParameter().scale == 2
    assert caffe_pb2.InterpParameter().zoom_factor == 1
    assert caffe_pb2.ROIPoolingParameter().spatial_scale == 1.0
    assert caffe_pb2.SmoothL1LossParameter().sigma == 1.0
    assert caffe_pb2.ShuffleChannelParameter().group == 1
    assert caffe_pb2.BNParameter().momentum == pytest.approx(0.9)
    assert caffe_pb2.MultiBoxLossParameter().mining_type == \
        caffe_pb2.MultiBoxLossParameter.MAX_NEGATIVE
    assert caffe_pb2.SolverParameter().ap_version == "Integral"


def test_fork_prototxt_fields_parse_by_name():
    net = parse_text("""
      layer { name: "bn" type: "BN" bn_param { bn_mode: INFERENCE scale_filler { value: 1 } } }
      layer { name: "bnp" type: "BN" bn_param { slope_filler { value: 1 } momentum: 0.95 frozen: true } }
      layer { name: "up" type: "Upsample" upsample_param { scale: 2 upsample_h: 45 } }
      layer { name: "i" type: "Interp" interp_param { zoom_factor: 8 } }
      layer { name: "p" type: "PriorBox" prior_box_param { min_size: 30 aspect_ratio: 2
              flip: true variance: 0.1 variance: 0.1 } }
      layer { name: "d" type: "DetectionOutput" detection_output_param { num_classes: 21
              nms_param { nms_threshold: 0.45 top_k: 400 } code_type: CENTER_SIZE } }
      layer { name: "r" type: "ROIPooling" roi_pooling_param { pooled_w: 7 pooled_h: 7
              spatial_scale: 0.0625 } }
      layer { name: "s" type: "ShuffleChannel" shuffle_channel_param { group: 3 } }
    """, caffe_pb2.NetParameter())
    assert net.layer[0].bn_param.bn_mode == caffe_pb2.BNParameter.INFERENCE
    assert net.layer[1].bn_param.momentum == pytest.approx(0.95)
    assert net.layer[2].upsample_param.upsample_h == 45
    assert net.layer[4].prior_box_param.min_size == [30.0]
    assert net.layer[5].detection_output_param.nms_param.top_k == 400
    assert net.layer[6].roi_pooling_param.spatial_scale == pytest.approx(0.0625)
    assert net.layer[7].shuffle_channel_param.group == 3


def _fork_layer(layer_type: str, number: int, param) -> bytes:
    """A LayerParameter's bytes as a fork writes it: `param` under the fork's number."""
    body = param.SerializeToString()
    return (caffe_pb2.LayerParameter(name="l", type=layer_type).SerializeToString()
            + _encode_varint(number << 3 | 2) + _encode_varint(len(body)) + body)


def _net(*layers: bytes) -> bytes:
    return b"".join(_encode_varint(100 << 3 | 2) + _encode_varint(len(l)) + l
                    for l in layers)


def test_fork_binary_numbers_are_remapped_by_layer_type():
    data = _net(
        _fork_layer("Interp", 143, caffe_pb2.InterpParameter(height=9, width=11)),  # PSPNet
        _fork_layer("Upsample", 137, caffe_pb2.UpsampleParameter(scale=4)),       # SegNet
        _fork_layer("Upsample", 147, caffe_pb2.UpsampleParameter(upsample_h=7)),  # ENet
        _fork_layer("BN", 152, caffe_pb2.BNParameter(frozen=True)),               # PSPNet
        _fork_layer("PriorBox", 150, caffe_pb2.PriorBoxParameter(min_size=[30])), # OpenCV
        _fork_layer("Embed", 137, caffe_pb2.EmbedParameter(num_output=3)),        # BVLC
    )
    net = parse_binary(data, caffe_pb2.NetParameter())
    assert (net.layer[0].interp_param.height, net.layer[0].interp_param.width) == (9, 11)
    assert not net.layer[0].HasField("input_param")
    assert net.layer[1].upsample_param.scale == 4
    assert net.layer[2].upsample_param.upsample_h == 7
    assert not net.layer[2].HasField("swish_param")
    assert net.layer[3].bn_param.frozen
    assert net.layer[4].prior_box_param.min_size == [30.0]
    assert net.layer[5].embed_param.num_output == 3          # BVLC's field stays


def test_fork_only_field_names_its_fork():
    with pytest.raises(ParseError, match=r"seg_accuracy_param.*PSPNet \(hszhao/PSPNet\)"):
        parse_text('layer { name: "a" seg_accuracy_param { } }', caffe_pb2.NetParameter())
    with pytest.raises(ParseError, match=r"PRE_FIXED.*R-FCN"):
        parse_text('layer { loss_param { normalization: PRE_FIXED } }',
                   caffe_pb2.NetParameter())


def test_unknown_field_of_no_fork_keeps_the_plain_error():
    with pytest.raises(ParseError, match=r'no field named "foo_param"') as e:
        parse_text('layer { foo_param { } }', caffe_pb2.NetParameter())
    assert "fork" not in str(e.value)


def test_other_forks_fields_under_fork_numbers_are_parked_not_misread():
    """open_nsfw's caffemodel (Yahoo's CaffeOnSpark) holds a string at LayerParameter
    10001 in its MemoryData layer, R-FCN's psroi_pooling_param number; that layer type
    does not read it, so it is kept as an unknown field instead of failing to decode.
    A PSROIPooling layer still reads 10001 as its param."""
    spark = (caffe_pb2.LayerParameter(name="data", type="MemoryData").SerializeToString()
             + _encode_varint(10001 << 3 | 2) + bytes([33])
             + b"com.yahoo.ml.caffe.ImageDataFrame")
    with pytest.raises(Exception):      # what the schema alone makes of it
        caffe_pb2.LayerParameter().ParseFromString(spark)
    psroi = _fork_layer("PSROIPooling", 10001,
                        caffe_pb2.PSROIPoolingParameter(output_dim=21, group_size=7))
    net = parse_binary(_net(spark, psroi), caffe_pb2.NetParameter())
    assert net.layer[0].type == "MemoryData"
    assert not net.layer[0].HasField("psroi_pooling_param")
    assert net.layer[1].psroi_pooling_param.output_dim == 21


def test_a_truncated_net_still_says_so():
    data = _net(_fork_layer("Interp", 143, caffe_pb2.InterpParameter(height=9)))
    with pytest.raises(ParseError, match="not a valid binary caffe.NetParameter"):
        parse_binary(data[:-3], caffe_pb2.NetParameter())
