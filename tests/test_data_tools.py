"""`protonet convert-imageset` and `protonet compute-image-mean` from the command line.

Caffe-equality of the records is in test_data_conformance.py; here: skipping bad
images, crash safety, flags, map growth, and the mean's float32 arithmetic.
"""
from __future__ import annotations

import logging

import cv2
import lmdb
import numpy as np
import pytest

from protonet.cli import build_parser, main
from protonet.data import imageset
from protonet.data.imageset import compute_image_mean, read_image_list
from protonet.errors import DataError
from protonet.io.binary import read_binary
from protonet.proto import caffe_pb2


def make_images(tmp_path, sizes=((6, 7), (6, 7), (6, 7)), extra_lines=()):
    root = tmp_path / "img"
    root.mkdir()
    lines = []
    for i, (h, w) in enumerate(sizes):
        pixels = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        cv2.imwrite(str(root / f"p{i}.png"), pixels)
        lines.append(f"p{i}.png {i}")
    (root / "list.txt").write_text("\n".join(lines + list(extra_lines)) + "\n")
    return f"{root}/", str(root / "list.txt")


def records(path) -> list[tuple[str, caffe_pb2.Datum]]:
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        out = [(k.decode(), caffe_pb2.Datum.FromString(v)) for k, v in txn.cursor()]
    env.close()
    return out


def convert(*args) -> int:
    return main(["convert-imageset", "--no-progress", *map(str, args)])


def test_bad_and_missing_images_are_skipped_and_counted(tmp_path, caplog, capsys):
    root, listing = make_images(tmp_path, extra_lines=["gone.png 7", "broken.png 8"])
    (tmp_path / "img" / "broken.png").write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING, logger="protonet"):
        assert convert("--resize_height=4", "--resize_width=5", root, listing,
                       tmp_path / "db") == 0
    assert "skipped 2" in capsys.readouterr().out
    assert "gone.png" in caplog.text and "broken.png" in caplog.text
    written = records(tmp_path / "db")
    assert [k for k, _ in written] == ["00000000_p0.png", "00000001_p1.png",
                                       "00000002_p2.png"]
    assert [(d.channels, d.height, d.width, d.label) for _, d in written] == \
        [(3, 4, 5, 0), (3, 4, 5, 1), (3, 4, 5, 2)]


def test_skipped_lines_leave_gaps_in_the_keys(tmp_path):
    root, listing = make_images(tmp_path)
    lines = (tmp_path / "img" / "list.txt").read_text().splitlines()
    (tmp_path / "img" / "list.txt").write_text("\n".join([lines[0], "x.png 1", lines[2]]))
    assert convert(root, listing, tmp_path / "db") == 0
    assert [k for k, _ in records(tmp_path / "db")] == ["00000000_p0.png",
                                                       "00000002_p2.png"]


def test_an_existing_database_is_refused(tmp_path, capsys):
    root, listing = make_images(tmp_path)
    (tmp_path / "db").mkdir()
    assert convert(root, listing, tmp_path / "db") == 1
    assert "already exists" in capsys.readouterr().err


def test_a_failed_conversion_leaves_nothing_behind(tmp_path, capsys):
    root, listing = make_images(tmp_path, sizes=((6, 7), (5, 7)))
    assert convert("--check_size", root, listing, tmp_path / "out" / "db") == 1
    assert "--check_size" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []     # no DB, no temporary dir


def test_check_size_cannot_be_combined_with_encoded(tmp_path):
    root, listing = make_images(tmp_path)
    with pytest.raises(DataError, match="cannot be combined"):
        imageset.convert_imageset(root, listing, str(tmp_path / "db"), check_size=True,
                                  encoded=True, progress=False)


def test_shuffle_with_a_seed_is_repeatable(tmp_path):
    root, listing = make_images(tmp_path, sizes=[(4, 4)] * 8)
    keys = []
    for name in ("a", "b"):
        assert convert("--shuffle", "--seed", 5, root, listing, tmp_path / name) == 0
        keys.append([k for k, _ in records(tmp_path / name)])
    assert keys[0] == keys[1]
    names = [k.split("_", 1)[1] for k in keys[0]]
    assert sorted(names) == [f"p{i}.png" for i in range(8)] and names != sorted(names)
    assert [k[:8] for k in keys[0]] == [f"{i:08d}" for i in range(8)]


def test_gflags_style_booleans_never_swallow_positionals():
    parser = build_parser()
    for argv, gray in ((["--gray", "r/", "l", "d"], True),
                       (["--gray=false", "r/", "l", "d"], False),
                       (["--gray=True", "r/", "l", "d"], True),
                       (["--nogray", "r/", "l", "d"], False)):
        args = parser.parse_args(["convert-imageset", *argv])
        assert (args.gray, args.root, args.list_file, args.db) == (gray, "r/", "l", "d")
    args = parser.parse_args(["convert-imageset", "--check-size=1", "--encode-type", "png",
                              "r/", "l", "d"])
    assert args.check_size and args.encode_type == "png"


def test_encoded_gray_keeps_the_color_file_like_caffe(tmp_path):
    root, listing = make_images(tmp_path, sizes=[(5, 6)])
    assert convert("--encoded", "--gray", root, listing, tmp_path / "db") == 0
    (_, datum), = records(tmp_path / "db")
    assert datum.encoded and datum.data == (tmp_path / "img" / "p0.png").read_bytes()
    assert not datum.HasField("channels")


def test_an_unknown_encode_type_skips_with_a_reason(tmp_path, caplog):
    root, listing = make_images(tmp_path, sizes=[(5, 6)])
    with caplog.at_level(logging.WARNING, logger="protonet"):
        result = imageset.convert_imageset(root, listing, str(tmp_path / "db"),
                                           encode_type="nosuchtype", progress=False)
    assert result.written == 0 and "cannot encode" in result.skipped[0][1]
    assert "trailing" not in caplog.text        # ROOT already ends with '/'


def test_the_lmdb_map_doubles_when_full(tmp_path, monkeypatch):
    monkeypatch.setattr(imageset, "LMDB_START_MAP_SIZE", 64 << 10)
    monkeypatch.setattr(imageset, "COMMIT_EVERY", 7)
    root, listing = make_images(tmp_path, sizes=[(40, 40)] * 20)
    assert convert(root, listing, tmp_path / "db") == 0
    assert len(records(tmp_path / "db")) == 20
    env = lmdb.open(str(tmp_path / "db"), readonly=True, lock=False)
    assert env.info()["map_size"] > 64 << 10
    env.close()


def test_list_lines_split_at_the_last_space_with_atoi_labels(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"a dir/x.png 7abc\r\nnolabel\ny.png -3\n")
    assert read_image_list(str(listing)) == [("a dir/x.png", 7), ("nolabel", 0),
                                             ("y.png", -3)]


def write_lmdb(path, datums) -> str:
    env = lmdb.open(str(path), map_size=1 << 22)
    with env.begin(write=True) as txn:
        for i, datum in enumerate(datums):
            txn.put(f"{i:08d}".encode(), datum.SerializeToString())
    env.close()
    return str(path)


def test_mean_cli_writes_a_caffe_blobproto(tmp_path, capsys):
    root, listing = make_images(tmp_path)
    assert convert("--encoded", root, listing, tmp_path / "db") == 0
    assert main(["compute-image-mean", "--no-progress", str(tmp_path / "db"),
                 str(tmp_path / "mean.binaryproto")]) == 0
    blob = read_binary(str(tmp_path / "mean.binaryproto"), caffe_pb2.BlobProto())
    assert (blob.num, blob.channels, blob.height, blob.width) == (1, 3, 6, 7)
    assert not blob.HasField("shape")
    images = [cv2.imread(str(tmp_path / "img" / f"p{i}.png")).transpose(2, 0, 1)
              for i in range(3)]
    expected = np.sum(images, axis=0, dtype=np.float32) / np.float32(3)
    np.testing.assert_array_equal(np.asarray(blob.data, np.float32).reshape(3, 6, 7),
                                  expected)


def test_mean_of_float_data_accumulates_in_float32(tmp_path):
    rng = np.random.default_rng(1)
    values = [rng.normal(size=(1, 2, 3)).astype(np.float32) * 1e3 for _ in range(5)]
    datums = []
    for v in values:
        datum = caffe_pb2.Datum(channels=1, height=2, width=3)
        datum.float_data.extend(v.ravel().tolist())
        datums.append(datum)
    total = np.zeros((1, 2, 3), np.float32)
    for v in values:
        total = total + v                   # float32, in record order, as Caffe
    mean = compute_image_mean(write_lmdb(tmp_path / "db", datums), progress=False)
    np.testing.assert_array_equal(mean, total / np.float32(5))


def test_mean_errors_name_the_database_and_record(tmp_path, capsys):
    small = caffe_pb2.Datum(channels=1, height=1, width=2, data=b"\1\2")
    large = caffe_pb2.Datum(channels=1, height=1, width=3, data=b"\1\2\3")
    with pytest.raises(DataError, match=r"db record '00000001': 3 values.*has 2"):
        compute_image_mean(write_lmdb(tmp_path / "db", [small, large]), progress=False)
    assert main(["compute-image-mean", str(tmp_path / "none")]) == 1
    assert "none: no such LMDB" in capsys.readouterr().err
