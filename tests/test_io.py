"""Prototxt and binary proto I/O: located errors, fork fields, round trips, atomicity."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest

import protonet
from protonet.io.atomic import atomic_call, atomic_path, atomic_write
from protonet.io.binary import parse_binary, read_binary, write_binary
from protonet.io.text import parse_text, read_text, to_text, write_text
from protonet.io.weights import read_weights
from protonet.proto import caffe_pb2


def parse_error(text: str, path: str = "model.prototxt") -> protonet.ParseError:
    with pytest.raises(protonet.ParseError) as info:
        parse_text(text, caffe_pb2.NetParameter(), path)
    return info.value


def located(error: protonet.ParseError, path: str, line: int, column: int) -> None:
    assert (error.path, error.line, error.column) == (path, line, column)
    assert str(error).startswith(f"{path}:{line}:{column}: ")


# --- prototxt errors -------------------------------------------------------------

def test_unknown_field_names_closest_valid_field():
    text = 'name: "n"\nlayer {\n  name: "a"\n  typ: "ReLU"\n}\n'
    error = parse_error(text)
    located(error, "model.prototxt", 4, 3)
    assert '"typ"' in str(error)
    assert "did you mean 'type'" in str(error)


def test_unknown_field_in_nested_message_uses_that_messages_fields():
    text = ('layer { name: "p" type: "Pooling"\n'
            '  pooling_param { kernel_sze: 3 } }\n')
    error = parse_error(text)
    located(error, "model.prototxt", 2, 19)
    assert "caffe.PoolingParameter" in str(error)
    assert "did you mean 'kernel_size'" in str(error)


def test_unknown_field_with_nothing_close_lists_valid_fields():
    error = parse_error('layer { name: "a" zzzzzz: 1 }')
    assert "valid fields:" in str(error)
    assert "bottom" in str(error) and "top" in str(error)


def test_wrong_enum_value_lists_valid_values():
    text = 'layer {\n  name: "p" type: "Pooling"\n  pooling_param { pool: MAXX }\n}\n'
    error = parse_error(text)
    located(error, "model.prototxt", 3, 25)
    assert "MAXX" in str(error)
    assert "valid values: MAX, AVE, STOCHASTIC" in str(error)


def test_enum_number_out_of_range_lists_valid_values():
    error = parse_error('layer { name: "a" include { phase: 3 } }')
    assert error.line == 1
    assert "valid values: TRAIN, TEST" in str(error)


@pytest.mark.parametrize("text, field, expects, column", [
    ('layer { name: "p" pooling_param { kernel_size: "three" } }',
     "kernel_size", "a uint32", 48),
    ('layer { name: "p" pooling_param { kernel_size: -3 } }', "kernel_size", "a uint32", 48),
    ('layer { name: "a" loss_weight: "heavy" }', "loss_weight", "a float", 32),
    ("force_backward: 7", "force_backward", "true or false", 17),
    ("name: 3", "name", "a quoted string", 7),
    ('layer { name: "a" top { } }', "top", "a quoted string", 23),
])
def test_wrong_value_type_names_field_and_expected_type(text, field, expects, column):
    error = parse_error(text)
    located(error, "model.prototxt", 1, column)
    assert f"field '{field}', which takes {expects}" in str(error)


def test_unterminated_message_names_the_open_block():
    text = 'name: "n"\nlayer {\n  name: "a"\n  pooling_param {\n    pool: MAX\n'
    error = parse_error(text)
    assert error.path == "model.prototxt" and error.line is not None
    assert 'Expected "}"' in str(error)
    assert "'pooling_param', opened at 4:17" in str(error)


def test_braces_inside_strings_and_comments_do_not_count_as_blocks():
    text = 'layer { name: "a{" # {{ {\n  top: "}" \n'
    error = parse_error(text)
    assert "'layer', opened at 1:7" in str(error)


def test_unterminated_string_is_located():
    error = parse_error('layer {\n  name: "abc\n}\n')
    located(error, "model.prototxt", 2, 9)
    assert "quote" in str(error)


def test_string_parse_without_path_says_string():
    with pytest.raises(protonet.ParseError) as info:
        parse_text("nme: 'x'", caffe_pb2.NetParameter())
    assert str(info.value).startswith("<string>:1:1: ")
    assert "did you mean 'name'" in str(info.value)


def test_read_text_locates_errors_in_the_file(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text('name: "n"\n\nlayer { name: "a" type: "ReLU" bottom: "x" tpo: "y" }\n')
    with pytest.raises(protonet.ParseError) as info:
        read_text(str(path), caffe_pb2.NetParameter())
    assert info.value.path == str(path)
    assert str(info.value).startswith(f"{path}:3:")
    assert "did you mean 'top'" in str(info.value)


def test_parse_error_is_a_protonet_error():
    assert issubclass(protonet.ParseError, protonet.ProtonetError)


# --- text files that are not text ------------------------------------------------

def _binary_net() -> caffe_pb2.NetParameter:
    net = caffe_pb2.NetParameter(name="bin")
    layer = net.layer.add(name="ip", type="InnerProduct")
    blob = layer.blobs.add()
    blob.shape.dim.extend([4, 8])
    blob.data.extend(np.random.RandomState(0).randn(32).astype(np.float32).tolist())
    return net


def test_binary_caffemodel_given_as_text(tmp_path):
    path = str(tmp_path / "weights.caffemodel")
    write_binary(path, _binary_net())
    with pytest.raises(protonet.ParseError) as info:
        read_text(path, caffe_pb2.NetParameter())
    message = str(info.value)
    assert message.startswith(path + ": ")
    assert "not UTF-8" in message and "binary" in message


def test_binary_file_that_happens_to_be_valid_utf8_given_as_text(tmp_path):
    # Small V1 binary nets are all bytes < 0x80: valid UTF-8, but full of control bytes.
    net = caffe_pb2.NetParameter(name="v1")
    net.layers.add(name="conv", type=caffe_pb2.V1LayerParameter.CONVOLUTION)
    data = net.SerializeToString()
    data.decode("utf-8")
    path = tmp_path / "v1.caffemodel"
    path.write_bytes(data)
    with pytest.raises(protonet.ParseError) as info:
        read_text(str(path), caffe_pb2.NetParameter())
    assert str(info.value).startswith(str(path) + ": ")
    assert "binary" in str(info.value)


def test_text_with_tabs_and_crlf_still_reads(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_bytes(b'name: "n"\r\n\tlayer {\tname: "a"\r\n type: "ReLU" }\r\n')
    net = read_text(str(path), caffe_pb2.NetParameter())
    assert net.layer[0].type == "ReLU"


def test_missing_text_file(tmp_path):
    path = str(tmp_path / "absent.prototxt")
    with pytest.raises(protonet.ParseError) as info:
        read_text(path, caffe_pb2.NetParameter())
    assert str(info.value) == f"{path}: file not found"


def test_directory_given_as_text_file(tmp_path):
    with pytest.raises(protonet.ParseError) as info:
        read_text(str(tmp_path), caffe_pb2.NetParameter())
    assert str(info.value).startswith(f"{tmp_path}: ")


# --- fork fields -----------------------------------------------------------------

@pytest.mark.parametrize("value, mode", [("false", caffe_pb2.PoolingParameter.FLOOR),
                                         ("true", caffe_pb2.PoolingParameter.CEIL)])
def test_fork_ceil_mode_reads_as_round_mode(value, mode):
    text = ('layer { name: "pool" type: "Pooling"\n'
            f'  pooling_param {{ pool: MAX kernel_size: 3 ceil_mode: {value} stride: 2 }} }}\n')
    with pytest.warns(UserWarning, match=r"fork\.prototxt:2:.*ceil_mode.*round_mode"):
        net = parse_text(text, caffe_pb2.NetParameter(), "fork.prototxt")
    p = net.layer[0].pooling_param
    assert p.round_mode == mode and p.HasField("round_mode")
    assert (p.pool, p.kernel_size, p.stride) == (caffe_pb2.PoolingParameter.MAX, 3, 2)


def test_fork_ceil_mode_in_several_layers_and_from_file(tmp_path):
    path = tmp_path / "fork.prototxt"
    path.write_text('layer { name: "a" type: "Pooling" pooling_param { ceil_mode: false } }\n'
                    'layer { name: "b" type: "Pooling" pooling_param { ceil_mode: true } }\n')
    with pytest.warns(UserWarning) as record:
        net = read_text(str(path), caffe_pb2.NetParameter())
    assert len(record) == 2
    assert [l.pooling_param.round_mode for l in net.layer] == [
        caffe_pb2.PoolingParameter.FLOOR, caffe_pb2.PoolingParameter.CEIL]


def test_fork_ceil_mode_builds_a_floor_pooling_net():
    text = """
    layer { name: "data" type: "Input" top: "data"
            input_param { shape { dim: 1 dim: 1 dim: 6 dim: 6 } } }
    layer { name: "pool" type: "Pooling" bottom: "data" top: "pool"
            pooling_param { pool: MAX kernel_size: 3 stride: 2 ceil_mode: false } }
    """
    with pytest.warns(UserWarning):
        param = parse_text(text, caffe_pb2.NetParameter())
    net = protonet.Net(param, protonet.TEST)
    assert net.blobs["pool"].shape == (1, 1, 2, 2)     # CEIL would give 3x3


def test_fork_ceil_mode_with_tabs_crlf_and_unicode_before_it():
    text = ('name: "réseau"\r\n# é ceil_mode: true\r\n'
            'layer {\tname: "é"\ttype: "Pooling" pooling_param {\tpool: AVE\t'
            'ceil_mode:\r\n  false\tkernel_size: 2 } }\r\n')
    with pytest.warns(UserWarning, match=r"<string>:3:"):
        net = parse_text(text, caffe_pb2.NetParameter())
    p = net.layer[0].pooling_param
    assert (p.pool, p.kernel_size, p.round_mode) == (
        caffe_pb2.PoolingParameter.AVE, 2, caffe_pb2.PoolingParameter.FLOOR)
    assert net.name == "réseau" and net.layer[0].name == "é"


def test_fork_ceil_mode_with_a_bad_value_is_located():
    with pytest.raises(protonet.ParseError) as info:
        parse_text('layer {\n pooling_param { ceil_mode: maybe } }', caffe_pb2.NetParameter(),
                   "f.prototxt")
    assert str(info.value).startswith("f.prototxt:2:")
    assert "ceil_mode" in str(info.value)


def test_ceil_mode_outside_pooling_param_is_still_an_error():
    error = parse_error('layer { name: "c" convolution_param { ceil_mode: true } }')
    assert "ceil_mode" in str(error) and error.line == 1


# --- binary ----------------------------------------------------------------------

def test_binary_round_trip_with_blobs(tmp_path):
    net = _binary_net()
    v1 = net.layers.add(name="old", type=caffe_pb2.V1LayerParameter.INNER_PRODUCT)
    blob = v1.blobs.add(num=1, channels=1, height=2, width=3)
    blob.data.extend([1, 2, 3, 4, 5, 6])
    blob.double_diff.extend([0.5] * 6)
    path = str(tmp_path / "model.caffemodel")
    write_binary(path, net)
    back = read_binary(path, caffe_pb2.NetParameter())
    assert back == net
    assert np.array_equal(np.asarray(back.layer[0].blobs[0].data, np.float32),
                          np.asarray(net.layer[0].blobs[0].data, np.float32))


def test_truncated_caffemodel(tmp_path):
    full = _binary_net().SerializeToString()
    path = tmp_path / "cut.caffemodel"
    for cut in (len(full) - 1, len(full) // 2, 3):
        path.write_bytes(full[:cut])
        with pytest.raises(protonet.ParseError) as info:
            read_binary(str(path), caffe_pb2.NetParameter())
        assert str(info.value).startswith(f"{path}: ")
        assert "truncated" in str(info.value)


def test_random_bytes_as_caffemodel(tmp_path):
    path = tmp_path / "noise.caffemodel"
    path.write_bytes(np.random.RandomState(1234).bytes(512))
    with pytest.raises(protonet.ParseError) as info:
        read_binary(str(path), caffe_pb2.NetParameter())
    assert str(path) in str(info.value)
    assert "caffe.NetParameter" in str(info.value)


def test_prototxt_given_as_binary(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text('name: "n"\nlayer { name: "a" type: "ReLU" }\n')
    with pytest.raises(protonet.ParseError) as info:
        read_weights(str(path))
    assert str(path) in str(info.value)


def test_directory_as_caffemodel(tmp_path):
    with pytest.raises(protonet.ParseError) as info:
        read_binary(str(tmp_path), caffe_pb2.NetParameter())
    assert str(info.value) == f"{tmp_path}: is a directory, expected a file"
    with pytest.raises(protonet.ParseError):
        read_weights(str(tmp_path))


def test_missing_caffemodel(tmp_path):
    path = str(tmp_path / "absent.caffemodel")
    for read in (lambda: read_binary(path, caffe_pb2.NetParameter()),
                 lambda: read_weights(path)):
        with pytest.raises(protonet.ParseError) as info:
            read()
        assert str(info.value) == f"{path}: file not found"


def test_parse_binary_without_path():
    with pytest.raises(protonet.ParseError) as info:
        parse_binary(b"\xff\xff\xff", caffe_pb2.NetParameter())
    assert str(info.value).startswith("<string>: ")


def test_empty_file_is_an_empty_message(tmp_path):
    # As in protobuf itself: zero bytes is a valid (empty) message.
    path = tmp_path / "empty.binaryproto"
    path.write_bytes(b"")
    assert read_binary(str(path), caffe_pb2.BlobProto()) == caffe_pb2.BlobProto()


# --- text round trip ---------------------------------------------------------------

NET_TEXT = """
name: "round"
force_backward: true
state { phase: TRAIN level: 2 stage: "s" }
layer {
  name: "data" type: "Input" top: "data"
  input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } }
}
layer {
  name: "conv" type: "Convolution" bottom: "data" top: "conv"
  param { lr_mult: 1 decay_mult: 1 name: "w" share_mode: PERMISSIVE }
  param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 5 kernel_size: 3 pad: 1
    weight_filler { type: "gaussian" std: 0.01 } bias_filler { type: "constant" value: 0.1 } }
  include { phase: TRAIN min_level: 1 not_stage: "deploy" }
}
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
        pooling_param { pool: AVE kernel_size: 2 round_mode: FLOOR } }
layer { name: "loss" type: "EuclideanLoss" bottom: "pool" bottom: "pool" top: "loss"
        loss_weight: 0.5 propagate_down: true propagate_down: false }
"""


def test_write_text_read_text_round_trip(tmp_path):
    net = parse_text(NET_TEXT, caffe_pb2.NetParameter())
    path = str(tmp_path / "out" / "net.prototxt")       # directory made on demand
    write_text(path, net)
    back = read_text(path, caffe_pb2.NetParameter())
    assert back == net
    assert to_text(back) == to_text(net)
    assert parse_text(to_text(net), caffe_pb2.NetParameter()) == net


def test_text_round_trip_keeps_unicode_and_escapes(tmp_path):
    net = caffe_pb2.NetParameter(name='réseau "quoted" \\ back\nslash')
    path = str(tmp_path / "u.prototxt")
    write_text(path, net)
    assert read_text(path, caffe_pb2.NetParameter()).name == net.name


def test_text_round_trip_of_float_values_is_exact(tmp_path):
    blob = caffe_pb2.BlobProto()
    values = np.random.RandomState(3).randn(50).astype(np.float32)
    blob.data.extend(values.tolist())
    path = str(tmp_path / "blob.prototxt")
    write_text(path, blob)
    back = read_text(path, caffe_pb2.BlobProto())
    assert np.array_equal(np.asarray(back.data, np.float32), values)


# --- atomic writes -------------------------------------------------------------------

def _leftovers(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".tmp"))


def test_atomic_call_keeps_old_file_when_writer_raises(tmp_path):
    path = tmp_path / "model.caffemodel"
    path.write_bytes(b"old contents")

    def writer(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half of the new")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_call(str(path), writer)
    assert path.read_bytes() == b"old contents"
    assert _leftovers(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == ["model.caffemodel"]


def test_atomic_path_keeps_old_file_on_interrupt(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(str(path)) as tmp:
            with open(tmp, "w") as f:
                f.write("partial")
            raise KeyboardInterrupt
    assert path.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_atomic_write_failure_is_a_protonet_error_and_cleans_up(tmp_path):
    path = tmp_path / "weights.caffemodel"
    path.write_bytes(b"old")

    def writer(tmp):
        raise OSError(28, "No space left on device")

    with pytest.raises(protonet.ProtonetError) as info:
        atomic_call(str(path), writer)
    assert str(path) in str(info.value) and "unchanged" in str(info.value)
    assert path.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_write_binary_failure_midway_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "model.caffemodel"
    write_binary(str(path), _binary_net())
    before = path.read_bytes()

    net = _binary_net()
    real_fsync = os.fsync

    def failing_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(protonet.ProtonetError):
        write_binary(str(path), net)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write(str(path), "first")
    atomic_write(str(path), b"second")
    assert path.read_bytes() == b"second"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_write_text_into_a_directory_path_fails_cleanly(tmp_path):
    target = tmp_path / "is_a_dir"
    target.mkdir()
    with pytest.raises(protonet.ProtonetError) as info:
        write_text(str(target), caffe_pb2.NetParameter(name="x"))
    assert re.search(re.escape(str(target)), str(info.value))
    assert target.is_dir()
    assert _leftovers(tmp_path) == []


def test_atomic_write_gives_files_the_usual_permissions(tmp_path):
    # mkstemp makes 0600 files; a written prototxt or caffemodel must not be private.
    old = os.umask(0o022)
    try:
        path = tmp_path / "net.prototxt"
        write_text(str(path), caffe_pb2.NetParameter(name="x"))
        assert path.stat().st_mode & 0o777 == 0o644
        os.umask(0o027)
        model = tmp_path / "w.caffemodel"
        write_binary(str(model), _binary_net())
        assert model.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    path = tmp_path / "solver.prototxt"
    path.write_text("old")
    path.chmod(0o604)
    atomic_write(str(path), "new")
    assert path.read_text() == "new"
    assert path.stat().st_mode & 0o777 == 0o604
