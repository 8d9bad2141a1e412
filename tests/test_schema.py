"""The schema is Caffe's: committed generated code is current, and key facts hold."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from protonet.proto import caffe_pb2

ROOT = Path(__file__).resolve().parents[1]


def test_generated_module_is_current():
    pytest.importorskip("grpc_tools")
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_proto.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, ("protonet/proto/caffe_pb2.py is stale; run "
                                    "tools/gen_proto.py\n" + result.stdout + result.stderr)


@pytest.mark.parametrize("message, field, number", [
    ("NetParameter", "layer", 100), ("NetParameter", "layers", 2),
    ("LayerParameter", "convolution_param", 106), ("LayerParameter", "clip_param", 148),
    ("SolverParameter", "layer_wise_reduce", 41), ("SolverParameter", "weights", 42),
    ("SolverState", "current_step", 4), ("BlobProto", "double_data", 8),
    ("Datum", "encoded", 7), ("V1LayerParameter", "blobs_lr", 7),
])
def test_field_numbers_match_caffe(message, field, number):
    assert getattr(caffe_pb2, message).DESCRIPTOR.fields_by_name[field].number == number


def test_defaults_match_caffe():
    assert caffe_pb2.PoolingParameter().round_mode == caffe_pb2.PoolingParameter.CEIL
    assert caffe_pb2.LRNParameter().k == 1.0 and caffe_pb2.LRNParameter().local_size == 5
    assert caffe_pb2.SolverParameter().type == "SGD"
    assert caffe_pb2.SolverParameter().lr_policy == ""
    assert caffe_pb2.ConvolutionParameter().bias_term is True
    assert caffe_pb2.BatchNormParameter().moving_average_fraction == pytest.approx(0.999)
    assert caffe_pb2.FillerParameter().type == "constant"
    assert caffe_pb2.LossParameter().normalization == caffe_pb2.LossParameter.VALID
    assert caffe_pb2.BlobShape.DESCRIPTOR.fields_by_name["dim"].GetOptions().packed


def test_every_bvlc_field_and_enum_value_is_unchanged():
    """tests/data/bvlc_caffe_schema.txt summarises BVLC master's caffe.proto; fork
    fields may only add lines (tools/schema_summary.py makes both summaries)."""
    sys.path.insert(0, str(ROOT / "tools"))
    from schema_summary import summary
    ours = set(summary(caffe_pb2))
    bvlc = [line for line in (ROOT / "tests" / "data" / "bvlc_caffe_schema.txt")
            .read_text().splitlines() if line and not line.startswith("#")]
    assert len(bvlc) > 500
    assert [line for line in bvlc if line not in ours] == []
