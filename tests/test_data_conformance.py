"""Data layers and data tools against the real Caffe's output.

Fixtures in ../shared/conformance/data (see its README): LMDBs written by Caffe's
convert_imageset, the mean compute_image_mean made, and the first batches Caffe's
Data and ImageData layers produced in the TEST phase. JPEG decoders may differ by a
few levels between libjpeg builds, so pixels that went through a JPEG decode are
compared with a tolerance; everything else must match exactly.
"""
from __future__ import annotations

import json
from pathlib import Path

import lmdb
import numpy as np
import pytest

import protonet
import protonet.data.layers  # noqa: F401  (registers the data layer types)
from protonet.data.imageset import compute_image_mean, convert_imageset
from protonet.data.layers import close_data_layers, configure_data_layers
from protonet.proto import caffe_pb2

DATA = Path(__file__).resolve().parents[2] / "shared" / "conformance" / "data"
JPEG_TOLERANCE = 4          # grey levels
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="no conformance fixtures")

GOLDEN = np.load(DATA / "golden.npz") if DATA.is_dir() else {}
SPECS = json.loads((DATA / "golden.json").read_text()) if DATA.is_dir() else {}
NETS = sorted(p.stem for p in DATA.glob("*.prototxt"))


def golden_batches(net: str) -> list[tuple[np.ndarray, np.ndarray]]:
    batches = []
    while f"{net}/batch{len(batches)}/data" in GOLDEN:
        k = len(batches)
        batches.append((GOLDEN[f"{net}/batch{k}/data"], GOLDEN[f"{net}/batch{k}/label"]))
    return batches


def source_is_jpeg(net: str) -> bool:
    """Whether the net's pixels went through a JPEG decode (ImageData reads .jpg)."""
    return "imagedata" in net


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "sync"])
@pytest.mark.parametrize("name", NETS)
def test_data_net_reproduces_caffe_batches(name, prefetch, monkeypatch):
    monkeypatch.chdir(DATA)
    net = protonet.Net(f"{name}.prototxt", protonet.TEST)
    configure_data_layers(net, prefetch=prefetch)
    try:
        expected = golden_batches(name)
        assert len(expected) >= 2
        for k, (data, label) in enumerate(expected):
            out = net.forward()
            assert out["data"].shape == data.shape, f"batch {k}"
            np.testing.assert_array_equal(out["label"], label, err_msg=f"batch {k}")
            if source_is_jpeg(name):
                scale = net.layers[0].module.source.transformer.scale
                tolerance = JPEG_TOLERANCE * scale
                np.testing.assert_allclose(out["data"], data, rtol=0, atol=tolerance)
            else:
                np.testing.assert_array_equal(out["data"], data, err_msg=f"batch {k}")
    finally:
        close_data_layers(net)


def read_records(path) -> list[tuple[bytes, caffe_pb2.Datum]]:
    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return [(k, caffe_pb2.Datum.FromString(v)) for k, v in txn.cursor()]
    finally:
        env.close()


def flags_to_kwargs(flags: list[str]) -> dict:
    kwargs = {}
    for flag in flags:
        name, _, value = flag[2:].partition("=")
        kwargs[name] = int(value) if name.startswith("resize") else (value or True)
    return kwargs


def pixels(datum: caffe_pb2.Datum) -> np.ndarray:
    from protonet.data.datum import decode_datum
    return decode_datum(datum, "record")


@pytest.mark.parametrize("db", sorted(SPECS))
def test_convert_imageset_writes_caffes_records(db, tmp_path, monkeypatch):
    monkeypatch.chdir(DATA)
    spec = SPECS[db]
    result = convert_imageset("images/", "images/list.txt", str(tmp_path / db),
                              progress=False, **flags_to_kwargs(spec["flags"]))
    assert result.written == len(spec["records"]) and not result.skipped
    ours, caffes = read_records(tmp_path / db), read_records(DATA / db)
    assert [k for k, _ in ours] == [k for k, _ in caffes]
    assert [r["key"].encode() for r in spec["records"]] == [k for k, _ in ours]
    for (key, mine), (_, theirs), record in zip(ours, caffes, spec["records"]):
        assert mine.label == theirs.label == record["label"], key
        assert mine.encoded == record["encoded"], key
        # The same fields are present, so the serialized layout is Caffe's.
        assert [f.name for f, _ in mine.ListFields()] == \
            [f.name for f, _ in theirs.ListFields()], key
        if "shape" in record:
            assert [mine.channels, mine.height, mine.width] == record["shape"], key
        from_jpeg = key.endswith(b".jpg")
        if not mine.encoded or "--encode_type=png" in spec["flags"]:
            a, b = pixels(mine).astype(int), pixels(theirs).astype(int)
            assert a.shape == b.shape, key
            assert np.abs(a - b).max() <= (JPEG_TOLERANCE if from_jpeg else 0), key
            if not mine.encoded and not from_jpeg:
                assert mine.SerializeToString() == theirs.SerializeToString(), key
        else:   # the image file itself, byte for byte
            assert mine.data == theirs.data and len(mine.data) == record["nbytes"], key


def test_compute_image_mean_equals_caffes(tmp_path):
    out = tmp_path / "mean.binaryproto"
    mean = compute_image_mean(str(DATA / "lmdb_raw32"), str(out), progress=False)
    np.testing.assert_array_equal(mean[None], GOLDEN["mean_raw32"].astype(np.float32))
    assert out.read_bytes() == (DATA / "mean_raw32.binaryproto").read_bytes()
