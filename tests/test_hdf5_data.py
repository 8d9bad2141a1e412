"""HDF5Data and HDF5Output: Caffe's row order, file wrapping, shuffling and errors."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

import protonet
import protonet.data  # noqa: F401  (registers the HDF5 layers)
from protonet.errors import DataError, NetError
from protonet.io.text import parse_text
from protonet.proto import caffe_pb2
from protonet.rng import set_random_seed


def _write_h5(path, rows: int, start: int = 0, **extra) -> None:
    with h5py.File(path, "w") as f:
        values = np.arange(start, start + rows, dtype=np.float64).reshape(-1, 1, 1, 1)
        f["data"] = values * np.ones((1, 1, 2, 3))
        f["label"] = np.arange(start, start + rows, dtype=np.int32)
        for name, value in extra.items():
            f[name] = value


def _net(source: str, batch: int, shuffle: bool = False, tops=("data", "label"),
         extra: str = "") -> protonet.Net:
    top_lines = " ".join(f'top: "{t}"' for t in tops)
    text = f"""layer {{ name: "h5" type: "HDF5Data" {top_lines} {extra}
      hdf5_data_param {{ source: "{source}" batch_size: {batch}
                         shuffle: {"true" if shuffle else "false"} }} }}"""
    return protonet.Net(parse_text(text, caffe_pb2.NetParameter()), protonet.TEST)


def _labels(net: protonet.Net, batches: int) -> list[list[int]]:
    out = []
    for _ in range(batches):
        out.append(net.forward()["label"].astype(int).tolist())
    return out


@pytest.fixture
def two_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_h5("a.h5", 4, start=0)
    _write_h5("b.h5", 3, start=100)
    (tmp_path / "list.txt").write_text("a.h5\n  b.h5\n")
    return tmp_path


def test_rows_in_order_and_wrap_within_one_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_h5("only.h5", 5)
    (tmp_path / "list.txt").write_text("only.h5\n")
    net = _net("list.txt", 3)
    assert _labels(net, 3) == [[0, 1, 2], [3, 4, 0], [1, 2, 3]]


def test_batches_cross_file_boundaries_and_wrap_to_the_first_file(two_files):
    net = _net("list.txt", 3)
    assert _labels(net, 4) == [[0, 1, 2], [3, 100, 101], [102, 0, 1], [2, 3, 100]]


def test_tops_are_float32_with_dataset_shapes(two_files):
    net = _net("list.txt", 2)
    out = net.forward()
    assert net.blobs["data"].shape == (2, 1, 2, 3)
    assert net.blobs["label"].shape == (2,)
    assert out["data"].dtype == np.float32 and out["label"].dtype == np.float32
    np.testing.assert_array_equal(out["data"][1], np.ones((1, 2, 3)))


def test_top_order_follows_the_prototxt(two_files):
    net = _net("list.txt", 2, tops=("label", "data"))
    assert net.blobs["label"].shape == (2,)
    assert net.blobs["data"].shape == (2, 1, 2, 3)


def test_shuffle_is_seeded_and_keeps_files_whole(two_files):
    set_random_seed(3)
    first = _labels(_net("list.txt", 7, shuffle=True), 3)
    set_random_seed(3)
    second = _labels(_net("list.txt", 7, shuffle=True), 3)
    assert first == second
    for batch in first:          # 7 rows = one pass over both files
        assert sorted(batch) == [0, 1, 2, 3, 100, 101, 102]
        in_a = [i < 100 for i in batch]
        assert in_a in ([True] * 4 + [False] * 3, [False] * 3 + [True] * 4)


def test_missing_source_list_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="nope.txt"):
        _net("nope.txt", 2)


def test_empty_list_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "list.txt").write_text("\n")
    with pytest.raises(DataError, match="lists no HDF5 files"):
        _net("list.txt", 2)


def test_missing_file_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "list.txt").write_text("gone.h5\n")
    with pytest.raises(DataError, match=r"gone\.h5: file not found"):
        _net("list.txt", 2)


def test_missing_dataset_names_file_and_dataset(two_files):
    with pytest.raises(DataError, match=r"a\.h5: no dataset 'weight'.*data, label"):
        _net("list.txt", 2, tops=("data", "weight"))


def test_row_count_mismatch_names_both_datasets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_h5("bad.h5", 4, other=np.zeros(3))
    (tmp_path / "list.txt").write_text("bad.h5\n")
    with pytest.raises(DataError, match=r"bad\.h5: dataset 'other' has 3 rows but 'data' has 4"):
        _net("list.txt", 2, tops=("data", "other"))


def test_later_file_with_other_row_shape_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_h5("a.h5", 2)
    with h5py.File("b.h5", "w") as f:
        f["data"] = np.zeros((2, 1, 3, 3))
        f["label"] = np.zeros(2)
    (tmp_path / "list.txt").write_text("a.h5 b.h5")
    net = _net("list.txt", 2)
    with pytest.raises(DataError, match=r"b\.h5: dataset 'data' has rows of shape"):
        net.forward()


def test_string_dataset_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with h5py.File("s.h5", "w") as f:
        f["data"] = np.array([b"x", b"y"])
    (tmp_path / "list.txt").write_text("s.h5")
    with pytest.raises(DataError, match="expected floating point or integer"):
        _net("list.txt", 1, tops=("data",))


def test_transform_param_is_refused(two_files):
    with pytest.raises(NetError, match="does not transform data"):
        _net("list.txt", 2, extra="transform_param { scale: 0.5 }")


def test_hdf5_output_writes_data_and_label(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = """
    layer { name: "in" type: "Input" top: "x" top: "y"
            input_param { shape { dim: 3 dim: 2 } shape { dim: 3 } } }
    layer { name: "out" type: "HDF5Output" bottom: "x" bottom: "y"
            hdf5_output_param { file_name: "out.h5" } }"""
    net = protonet.Net(parse_text(text, caffe_pb2.NetParameter()), protonet.TEST)
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    net.forward(x=x, y=np.array([7, 8, 9], dtype=np.float32))
    with h5py.File("out.h5", "r") as f:
        np.testing.assert_array_equal(f["data"][()], x.reshape(3, 2, 1, 1))
        np.testing.assert_array_equal(f["label"][()].ravel(), [7, 8, 9])
        assert f["label"].shape == (3, 1, 1, 1)


def test_hdf5_output_needs_equal_batch_sizes(tmp_path):
    text = f"""
    layer {{ name: "in" type: "Input" top: "x" top: "y"
            input_param {{ shape {{ dim: 3 dim: 2 }} shape {{ dim: 4 }} }} }}
    layer {{ name: "out" type: "HDF5Output" bottom: "x" bottom: "y"
            hdf5_output_param {{ file_name: "{tmp_path / 'o.h5'}" }} }}"""
    with pytest.raises(NetError, match="'out'.*same batch size"):
        protonet.Net(parse_text(text, caffe_pb2.NetParameter()), protonet.TEST)
