"""NetState filtering: which layers exist for a phase, level and set of stages.

Same rules as Caffe's Net::FilterNet and Net::StateMeetsRule.
"""
from __future__ import annotations

from ..errors import NetError
from ..proto import caffe_pb2


def state_meets_rule(state: caffe_pb2.NetState, rule: caffe_pb2.NetStateRule) -> bool:
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(s not in stages for s in rule.stage):
        return False
    if any(s in stages for s in rule.not_stage):
        return False
    return True


def layer_included(layer: caffe_pb2.LayerParameter, state: caffe_pb2.NetState,
                   index: int = 0) -> bool:
    if layer.include and layer.exclude:
        raise NetError("specify either include rules or exclude rules, not both",
                       layer.name or f"#{index} (unnamed)", layer.type)
    if layer.include:
        return any(state_meets_rule(state, r) for r in layer.include)
    return not any(state_meets_rule(state, r) for r in layer.exclude)


def filter_net(net: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    """A copy of `net` holding only the layers its `state` includes."""
    filtered = caffe_pb2.NetParameter()
    filtered.CopyFrom(net)
    del filtered.layer[:]
    filtered.layer.extend(l for i, l in enumerate(net.layer)
                          if layer_included(l, net.state, i))
    return filtered
