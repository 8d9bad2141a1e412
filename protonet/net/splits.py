"""Caffe's InsertSplits: a blob read by several layers gets an explicit Split layer.

We keep Caffe's split layers and blob names so that blob and layer lists (and the
caffemodels we write) match Caffe's one for one. Gradient accumulation itself is
autograd's; the Split layer is an identity with several tops.
"""
from __future__ import annotations

from collections import defaultdict

from ..errors import NetError
from ..proto import caffe_pb2


def split_layer_name(layer: str, blob: str, top_index: int) -> str:
    return f"{blob}_{layer}_{top_index}_split"


def split_blob_name(layer: str, blob: str, top_index: int, split_index: int) -> str:
    return f"{blob}_{layer}_{top_index}_split_{split_index}"


def insert_splits(net: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    layers = list(net.layer)
    last_top: dict[str, tuple[int, int]] = {}
    source_of: dict[tuple[int, int], tuple[int, int]] = {}
    readers: dict[tuple[int, int], int] = defaultdict(int)
    loss_weight: dict[tuple[int, int], float] = {}
    for i, layer in enumerate(layers):
        for j, blob in enumerate(layer.bottom):
            if blob not in last_top:
                raise NetError(f"unknown bottom blob '{blob}' (bottom index {j}); no "
                               "earlier layer produces it", layer.name or f"#{i} (unnamed)",
                               layer.type)
            source_of[(i, j)] = last_top[blob]
            readers[last_top[blob]] += 1
        for j, blob in enumerate(layer.top):
            last_top[blob] = (i, j)
        for j in range(min(len(layer.loss_weight), len(layer.top))):
            top = last_top[layer.top[j]]
            loss_weight[top] = layer.loss_weight[j]
            if layer.loss_weight[j]:
                readers[top] += 1

    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    del out.layer[:]
    next_split: dict[tuple[int, int], int] = defaultdict(int)
    for i, original in enumerate(layers):
        layer = out.layer.add()
        layer.CopyFrom(original)
        for j, blob in enumerate(layer.bottom):
            top = source_of[(i, j)]
            if readers[top] > 1:
                layer.bottom[j] = split_blob_name(layers[top[0]].name, blob, top[1],
                                                  next_split[top])
                next_split[top] += 1
        for j, blob in enumerate(layer.top):
            count = readers[(i, j)]
            if count <= 1:
                continue
            weight = loss_weight.get((i, j), 0.0)
            split = out.layer.add()
            split.name = split_layer_name(layer.name, blob, j)
            split.type = "Split"
            split.bottom.append(blob)
            for k in range(count):
                split.top.append(split_blob_name(layer.name, blob, j, k))
                if weight:
                    split.loss_weight.append(weight if k == 0 else 0.0)
            if weight:
                layer.ClearField("loss_weight")
                next_split[(i, j)] += 1
    return out
