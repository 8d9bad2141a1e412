"""What protonet knows about Caffe forks' schema fields (see docs/forks.md).

protos/caffe.proto reads the fork fields that published models use, with each
fork's own numbers where they are free. Two things live here:

* FORK_ONLY_FIELDS names fork fields protonet does *not* read, so that the
  ParseError for one also says which fork the file was written for (an unknown
  field that belongs to no known fork keeps the plain error).
* ALIASED: fork fields whose fork number is taken (by BVLC or by another fork)
  and that protonet's schema therefore carries under 9000000 + that number.
  Text files name fields, so they need nothing; `remap_layer_fields` moves
  such a field of a fork-written *binary* layer to its alias when the layer's
  type says which fork wrote it (a SegNet caffemodel's field 137 is
  upsample_param in an "Upsample" layer, BVLC's embed_param elsewhere).
"""
from __future__ import annotations

SEGNET = "SegNet (alexgkendall/caffe-segnet)"
ENET = "ENet (TimoSaemann/caffe-enet)"
PSPNET = "PSPNet (hszhao/PSPNet)"
SSD = "SSD (weiliu89/caffe, branch ssd)"
FAST_RCNN = "Fast/Faster R-CNN (rbgirshick/caffe-fast-rcnn)"
RFCN = "R-FCN (daijifeng001/caffe-rfcn)"
OPENCV = "OpenCV's opencv-caffe.proto"

# (message full name, field name) -> the fork that defines it; fields the schema
# does not carry because no layer protonet runs reads them.
FORK_ONLY_FIELDS: dict[tuple[str, str], str] = {
    ("caffe.LayerParameter", "seg_accuracy_param"): PSPNET,
    ("caffe.LayerParameter", "mat_write_param"): PSPNET,
    ("caffe.LayerParameter", "mat_read_param"): PSPNET,
    ("caffe.LayerParameter", "dense_crf_param"): PSPNET,
    ("caffe.LayerParameter", "domain_transform_param"): PSPNET,
    ("caffe.LayerParameter", "adaptive_bias_channel_param"): PSPNET,
    ("caffe.LayerParameter", "bias_channel_param"): PSPNET,
    ("caffe.LayerParameter", "unique_label_param"): PSPNET,
    ("caffe.LayerParameter", "proposal_param"): OPENCV,
    ("caffe.DetectionOutputParameter", "normalized_bbox"): OPENCV,
}

# Enum values a fork adds that collide with BVLC's: (enum full name, value) -> fork.
FORK_ONLY_ENUM_VALUES: dict[tuple[str, str], str] = {
    ("caffe.LossParameter.NormalizationMode", "PRE_FIXED"): RFCN,
}


def fork_of_field(message: str, field: str) -> str | None:
    """The fork that defines `field` in `message` (full name), if known."""
    return FORK_ONLY_FIELDS.get((message, field))


def fork_of_enum_value(enum: str, value: str) -> str | None:
    return FORK_ONLY_ENUM_VALUES.get((enum, value))


ALIAS_BASE = 9_000_000

# Layer type -> {fork field number in LayerParameter: protonet's number}.
# Only numbers that BVLC also uses need this; the rest decode as they are.
LAYER_FIELD_REMAP: dict[str, dict[int, int]] = {
    "Upsample": {137: ALIAS_BASE + 137,     # SegNet
                 147: ALIAS_BASE + 137},    # ENet
    "Interp": {143: ALIAS_BASE + 143},      # PSPNet
    "DenseImageData": {138: 46},            # SegNet's number -> ENet's
    "BN": {152: 45},                        # PSPNet's number -> SegNet/ENet's
    # opencv-caffe.proto's numbers for SSD's layers (written by
    # cv2.dnn.shrinkCaffeModel) -> weiliu89/caffe's.
    "DetectionOutput": {147: 204},
    "Permute": {148: 202},
    "Normalize": {149: 206},
    "PriorBox": {150: 203},
}


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data):
            raise ValueError("truncated varint")
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _renumber(data: bytes, mapping: dict[int, int]) -> bytes:
    """`data` (one message's wire bytes) with top-level fields renumbered."""
    out = bytearray()
    i = 0
    while i < len(data):
        start = i
        tag, i = _varint(data, i)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, i = _varint(data, i)
        elif wire == 1:
            i += 8
        elif wire == 2:
            size, i = _varint(data, i)
            i += size
        elif wire == 5:
            i += 4
        else:                       # groups: Caffe never writes them
            raise ValueError(f"wire type {wire}")
        if i > len(data):
            raise ValueError("truncated field")
        if number in mapping:
            out += _encode_varint(mapping[number] << 3 | wire)
            out += data[start + len(_encode_varint(tag)):i]
        else:
            out += data[start:i]
    return bytes(out)


def remap_layer_fields(net) -> int:
    """Move fork-numbered fields of `net`'s layers (a binary NetParameter read
    with protonet's schema) to protonet's numbers, by layer type. Returns how
    many layers changed."""
    changed = 0
    for layer in net.layer:
        mapping = LAYER_FIELD_REMAP.get(layer.type)
        if not mapping:
            continue
        data = layer.SerializeToString()
        renumbered = _renumber(data, mapping)
        if renumbered != data:
            layer.Clear()
            layer.ParseFromString(renumbered)
            changed += 1
    return changed


# LayerParameter numbers this schema gives to fork params -> the layer types that
# read them. Other forks use some of these numbers for other things (Yahoo's
# CaffeOnSpark writes a string at 10001, R-FCN's psroi_pooling_param, into the data
# layer of open_nsfw's caffemodel), so in a binary file such a field of a layer of
# another type is parked under PARK_BASE + its number: kept, but unknown to the schema.
FORK_LAYER_FIELDS: dict[int, frozenset[str]] = {
    45: frozenset({"BN"}), 46: frozenset({"DenseImageData"}),
    164: frozenset({"ShuffleChannel"}),
    200: frozenset({"AnnotatedData"}), 201: frozenset({"MultiBoxLoss"}),
    202: frozenset({"Permute"}), 203: frozenset({"PriorBox"}),
    204: frozenset({"DetectionOutput"}), 205: frozenset({"DetectionEvaluate"}),
    206: frozenset({"Normalize"}), 207: frozenset({"VideoData"}),
    10000: frozenset({"BoxAnnotatorOHEM"}), 10001: frozenset({"PSROIPooling"}),
    8266711: frozenset({"ROIPooling"}), 8266712: frozenset({"SmoothL1Loss"}),
    ALIAS_BASE + 137: frozenset({"Upsample"}), ALIAS_BASE + 143: frozenset({"Interp"}),
}
PARK_BASE = 500_000_000


def _fields(data, start: int = 0, end: int | None = None):
    """(number, wire type, field start, payload start, field end) of each top-level
    field of the message in data[start:end]."""
    end = len(data) if end is None else end
    i = start
    while i < end:
        begin = i
        tag, i = _varint(data, i)
        number, wire = tag >> 3, tag & 7
        payload = i
        if wire == 0:
            _, i = _varint(data, i)
        elif wire == 1:
            i += 8
        elif wire == 2:
            size, payload = _varint(data, i)
            i = payload + size
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"wire type {wire}")
        if i > end:
            raise ValueError("truncated field")
        yield number, wire, begin, payload, i


def park_foreign_fork_fields(data: bytes) -> bytes | None:
    """A binary NetParameter with fork-numbered fields of layers that do not read
    them parked (see FORK_LAYER_FIELDS), or None when nothing needs parking."""
    view = memoryview(data)
    pieces: list = []
    done = 0
    for number, wire, begin, payload, end in _fields(view):
        if number != 100 or wire != 2:
            continue
        layer_type, foreign = None, []
        for n, w, b, p, e in _fields(view, payload, end):
            if n == 2 and w == 2:
                layer_type = bytes(view[p:e]).decode("utf-8", "replace")
            elif n in FORK_LAYER_FIELDS:
                foreign.append((n, w, b, p, e))
        foreign = [f for f in foreign if layer_type not in FORK_LAYER_FIELDS[f[0]]]
        if not foreign:
            continue
        body, at = [], payload
        for n, w, b, p, e in foreign:
            tag_end = b + len(_encode_varint(n << 3 | w))
            body += [view[at:b], _encode_varint((PARK_BASE + n) << 3 | w), view[tag_end:e]]
            at = e
        body.append(view[at:end])
        layer = b"".join(body)
        pieces += [view[done:begin], _encode_varint(100 << 3 | 2),
                   _encode_varint(len(layer)), layer]
        done = end
    if not pieces:
        return None
    pieces.append(view[done:])
    return b"".join(pieces)
