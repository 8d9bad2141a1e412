"""Data layers and the DataTransformer beyond the Caffe fixtures.

Reference values come from numpy re-statements of Caffe's rules (crop offsets,
mean indexing, mirror, window warping); records are written to small LMDBs here.
"""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading
import time

import cv2
import lmdb
import numpy as np
import pytest

import protonet
from protonet.data import layers as data_layers
from protonet.data.datum import decode_datum, encoded_datum, raw_datum
from protonet.data.transformer import DataTransformer
from protonet.errors import DataError, NetError
from protonet.io.binary import write_binary
from protonet.io.text import parse_text
from protonet.proto import caffe_pb2

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST
RNG = np.random.default_rng(0)


# --- helpers -----------------------------------------------------------------------

def image(channels=3, height=6, width=7, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (channels, height, width),
                                                dtype=np.uint8)


def hwc(chw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(chw.transpose(1, 2, 0))


def write_lmdb(path, values: list[bytes]) -> str:
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, value in enumerate(values):
            txn.put(f"{i:08d}".encode(), value)
    env.close()
    return str(path)


def raw_records(path, count=3, shape=(3, 6, 7)) -> tuple[str, list[np.ndarray]]:
    images = [image(*shape, seed=i) for i in range(count)]
    values = [raw_datum(hwc(im), i).SerializeToString() for i, im in enumerate(images)]
    return write_lmdb(path, values), images


def net(text: str, phase=TEST) -> protonet.Net:
    return protonet.Net(parse_text(text, caffe_pb2.NetParameter()), phase)


def data_net(source, phase=TEST, batch=2, transform="", extra="", tops=2, **options):
    top = 'top: "data" top: "label"' if tops == 2 else 'top: "data"'
    result = net(f'''layer {{ name: "d" type: "Data" {top}
        transform_param {{ {transform} }}
        data_param {{ source: "{source}" batch_size: {batch} backend: LMDB {extra} }} }}''',
                 phase)
    data_layers.configure_data_layers(result, **options)
    return result


def transformer(text: str, phase=TEST, **kwargs) -> DataTransformer:
    param = parse_text(text, caffe_pb2.TransformationParameter())
    return DataTransformer(param, phase, **kwargs)


def run(t: DataTransformer, images: list[np.ndarray]):
    """Transform images with `t`; returns the batch and each item's Crop. The torch
    arithmetic (device batches) and the numpy one (the CPU loader thread) must agree
    to the bit."""
    crops = [t.crop(im, d, f"item {i}") for i, (im, d) in
             enumerate(zip(images, t.draw(len(images))))]
    batch = t.collate(crops, None, [str(i) for i in range(len(images))])
    values = t.normalize(batch).numpy()
    np.testing.assert_array_equal(t.normalize_on_host(batch).numpy(), values)
    return values, crops


def reference(im, crop, mean=0.0, scale=1.0, size=None) -> np.ndarray:
    """Caffe's rule: (pixel - mean at the uncropped position) * scale, then mirror."""
    h, w = (crop.h_off, crop.w_off)
    ch, cw = size or im.shape[1:]
    values = (im.astype(np.float32) - np.float32(mean)) * np.float32(scale)
    values = values[:, h:h + ch, w:w + cw]
    return values[:, :, ::-1] if crop.mirror else values


# --- DataTransformer -----------------------------------------------------------------

def test_test_phase_crop_is_the_floor_centre():
    im = image(2, 7, 8)
    out, crops = run(transformer("crop_size: 4"), [im])
    assert (crops[0].h_off, crops[0].w_off) == (1, 2)
    np.testing.assert_array_equal(out[0], im[:, 1:5, 2:6].astype(np.float32))


def test_train_phase_crop_offsets_are_random_and_in_range():
    im = image(1, 10, 9)
    out, crops = run(transformer("crop_size: 4", TRAIN), [im] * 64)
    offsets = {(c.h_off, c.w_off) for c in crops}
    assert len(offsets) > 5
    assert all(0 <= h <= 6 and 0 <= w <= 5 for h, w in offsets)
    for item, crop in zip(out, crops):
        np.testing.assert_array_equal(item, reference(im, crop, size=(4, 4)))


def test_mirror_flips_a_coin_in_the_test_phase_like_caffe():
    im = image()
    out, crops = run(transformer("mirror: true"), [im] * 64)
    flags = [c.mirror for c in crops]
    assert any(flags) and not all(flags)
    for item, crop in zip(out, crops):
        np.testing.assert_array_equal(item, reference(im, crop))


def test_mirror_in_test_false_is_an_explicit_opt_out():
    t = transformer("mirror: true", mirror_in_test=False)
    _, crops = run(t, [image()] * 16)
    assert not any(c.mirror for c in crops)
    _, crops = run(transformer("mirror: true", TRAIN, mirror_in_test=False), [image()] * 16)
    assert any(c.mirror for c in crops)      # TRAIN always mirrors


def write_mean(path, mean: np.ndarray) -> str:
    blob = caffe_pb2.BlobProto(num=1, channels=mean.shape[0], height=mean.shape[1],
                               width=mean.shape[2])
    blob.data.extend(mean.ravel().tolist())
    write_binary(str(path), blob)
    return str(path)


def test_mean_file_is_indexed_at_the_uncropped_position(tmp_path):
    mean = RNG.uniform(0, 255, (3, 9, 10)).astype(np.float32)
    path = write_mean(tmp_path / "mean.binaryproto", mean)
    t = transformer(f'mean_file: "{path}" crop_size: 5 mirror: true scale: 0.3', TRAIN)
    images = [image(3, 9, 10, seed=i) for i in range(16)]
    out, crops = run(t, images)
    assert len({(c.h_off, c.w_off) for c in crops}) > 1     # the gathered-mean path
    for item, im, crop in zip(out, images, crops):
        np.testing.assert_array_equal(item, reference(im, crop, mean, 0.3, (5, 5)))


def test_mean_file_must_have_the_full_image_size(tmp_path):
    path = write_mean(tmp_path / "mean.binaryproto", np.zeros((3, 5, 5), np.float32))
    with pytest.raises(DataError, match="mean_file"):
        run(transformer(f'mean_file: "{path}" crop_size: 5'), [image(3, 9, 10)])


@pytest.mark.parametrize("values", [[20.0], [10.0, 20.0, 30.0]])
def test_mean_values_one_or_per_channel(values):
    text = " ".join(f"mean_value: {v}" for v in values) + " scale: 0.017"
    im = image()
    out, crops = run(transformer(text), [im])
    mean = np.asarray(values, np.float32).reshape(-1, 1, 1)
    np.testing.assert_array_equal(out[0], reference(im, crops[0], mean, 0.017))


def test_transform_param_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="2 mean_value entries for a 3-channel"):
        run(transformer("mean_value: 1 mean_value: 2"), [image()])
    with pytest.raises(DataError, match="not both"):
        transformer('mean_file: "m" mean_value: 1')
    with pytest.raises(DataError, match="exclusive"):
        transformer("force_color: true force_gray: true")
    with pytest.raises(DataError, match="smaller than crop_size"):
        run(transformer("crop_size: 9"), [image()])
    with pytest.raises(DataError, match="mean_file.*not found"):
        transformer(f'mean_file: "{tmp_path / "missing"}"')


def test_float_data_datum_is_transformed_like_bytes():
    values = RNG.normal(size=(2, 3, 4)).astype(np.float32)
    datum = caffe_pb2.Datum(channels=2, height=3, width=4, label=1)
    datum.float_data.extend(values.ravel().tolist())
    decoded = decode_datum(datum, "r")
    assert decoded.dtype == np.float32
    out, crops = run(transformer("mean_value: 0.5 scale: 2"), [decoded])
    np.testing.assert_array_equal(out[0], reference(values, crops[0], 0.5, 2.0))


def test_encoded_datum_honours_force_color_and_force_gray():
    color = hwc(image(3, 5, 6))
    gray = np.ascontiguousarray(color[:, :, 0])
    png_color = encoded_datum(cv2.imencode(".png", color)[1].tobytes(), 0)
    png_gray = encoded_datum(cv2.imencode(".png", gray)[1].tobytes(), 0)
    assert decode_datum(png_gray, "r").shape == (1, 5, 6)
    np.testing.assert_array_equal(decode_datum(png_gray, "r", force_color=True),
                                  np.repeat(gray[None], 3, axis=0))
    expected = cv2.imdecode(np.frombuffer(png_color.data, np.uint8), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(decode_datum(png_color, "r", force_gray=True)[0],
                                  expected)
    np.testing.assert_array_equal(decode_datum(png_color, "r"), color.transpose(2, 0, 1))


# --- Data --------------------------------------------------------------------------

@pytest.mark.parametrize("prefetch", [True, False])
def test_data_wraps_around_in_cursor_order(tmp_path, prefetch):
    source, images = raw_records(tmp_path / "db", count=3)
    n = data_net(source, batch=5, prefetch=prefetch)
    assert n.blobs["data"].shape == (5, 3, 6, 7) and n.blobs["label"].shape == (5,)
    first = {k: v.copy() for k, v in n.forward().items()}   # pycaffe returns views
    second = n.forward()
    np.testing.assert_array_equal(first["label"], [0, 1, 2, 0, 1])
    np.testing.assert_array_equal(second["label"], [2, 0, 1, 2, 0])
    np.testing.assert_array_equal(second["data"][0], images[2].astype(np.float32))
    data_layers.close_data_layers(n)


PARALLEL_BATCH_SCRIPT = """
import os, sys, torch, protonet
from protonet.data import layers as data_layers
from protonet.io.text import parse_text
from protonet.proto import caffe_pb2
torch.ones(1 << 20).sum()                      # the main thread's team exists
before = len(os.listdir("/proc/self/task"))
layer = ('layer { name: "d" type: "Data" top: "data" top: "label" '
         'transform_param { scale: 0.5 mean_value: 10 } data_param { source: "%s" '
         'batch_size: 64 backend: LMDB prefetch: 2 } }' % sys.argv[1])
net = protonet.Net(parse_text(layer, caffe_pb2.NetParameter()), protonet.TEST)
for _ in range(6):
    out = net.forward()
assert out["data"].shape == (64, 3, 16, 16)
print(len(os.listdir("/proc/self/task")) - before)
data_layers.close_data_layers(net)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc threads")
def test_prefetch_thread_runs_no_parallel_torch_op(tmp_path):
    """A torch op big enough to run in parallel on the loader thread would start a
    second OpenMP thread team, which slows every later step of the net (LeNet
    training: 30%). Batches of 64 x 3 x 16 x 16 normalize with a parallel op, so
    they must be normalized on the thread that takes them."""
    source, _ = raw_records(tmp_path / "db", count=64, shape=(3, 16, 16))
    done = subprocess.run([sys.executable, "-c", PARALLEL_BATCH_SCRIPT, source],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) == 1     # the loader thread, and no team of its own


def test_data_with_one_top_gives_only_data(tmp_path):
    source, _ = raw_records(tmp_path / "db")
    n = data_net(source, tops=1, transform="crop_size: 4")
    assert n.forward()["data"].shape == (2, 3, 4, 4)
    data_layers.close_data_layers(n)


def test_rand_skip_skips_fewer_than_rand_skip_records_once(tmp_path):
    source, _ = raw_records(tmp_path / "db", count=8)
    starts = set()
    for seed in range(12):
        protonet.set_random_seed(seed)
        n = data_net(source, batch=2, extra="rand_skip: 4", prefetch=False)
        labels = np.concatenate([n.forward()["label"].copy() for _ in range(2)])
        assert np.array_equal(labels, (labels[0] + np.arange(4)) % 8)   # then in order
        starts.add(int(labels[0]))
        data_layers.close_data_layers(n)
    assert starts <= {0, 1, 2, 3} and len(starts) > 1


def test_records_may_differ_in_size_when_cropped(tmp_path):
    images = [image(3, 6, 7), image(3, 9, 8, seed=1)]
    source = write_lmdb(tmp_path / "db", [raw_datum(hwc(im), 0).SerializeToString()
                                          for im in images])
    n = data_net(source, transform="crop_size: 5", prefetch=False)
    out = n.forward()["data"]
    np.testing.assert_array_equal(out[1], images[1][:, 2:7, 1:6].astype(np.float32))
    data_layers.close_data_layers(n)
    n = data_net(source, prefetch=False)
    with pytest.raises(DataError, match=r"layer 'd' \(Data\).*00000001.*differs"):
        n.forward()
    data_layers.close_data_layers(n)


def test_train_batches_are_the_same_with_and_without_prefetch(tmp_path):
    source, _ = raw_records(tmp_path / "db", count=5, shape=(3, 12, 12))
    runs = []
    for prefetch, workers in ((True, 4), (False, 0)):
        protonet.set_random_seed(7)
        n = data_net(source, TRAIN, batch=4, transform="crop_size: 7 mirror: true",
                     prefetch=prefetch, workers=workers)
        runs.append([n.forward()["data"] for _ in range(4)])
        data_layers.close_data_layers(n)
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_data_errors_name_the_path_and_the_layer(tmp_path):
    with pytest.raises(DataError, match=r"layer 'd' \(Data\).*missing.*not found"):
        data_net(tmp_path / "missing")
    empty = write_lmdb(tmp_path / "empty", [])
    with pytest.raises(DataError, match="holds no records"):
        data_net(empty)
    bad = write_lmdb(tmp_path / "bad", [b"\xff\xff\xff not a datum"])
    with pytest.raises(DataError, match=r"bad record '00000000'.*not a Caffe Datum"):
        data_net(bad)
    short = caffe_pb2.Datum(channels=3, height=2, width=2, data=b"\0" * 5)
    with pytest.raises(DataError, match="holds 5 data bytes.*needs 12"):
        data_net(write_lmdb(tmp_path / "short", [short.SerializeToString()]))


def test_many_readers_share_one_database(tmp_path):
    from protonet.data.imageset import compute_image_mean
    source, images = raw_records(tmp_path / "db", count=3)
    first, second = data_net(source), data_net(source, batch=3)
    np.testing.assert_array_equal(first.forward()["label"], [0, 1])
    np.testing.assert_array_equal(second.forward()["label"], [0, 1, 2])
    mean = compute_image_mean(source, progress=False)
    np.testing.assert_array_equal(mean, np.mean(images, axis=0, dtype=np.float32))
    data_layers.close_data_layers(first)
    np.testing.assert_array_equal(second.forward()["label"], [0, 1, 2])
    data_layers.close_data_layers(second)


def test_leveldb_default_backend_on_an_lmdb_says_so(tmp_path):
    source, _ = raw_records(tmp_path / "db")
    with pytest.raises(DataError, match="this is an LMDB but data_param.backend is LEVELDB"):
        net(f'''layer {{ name: "d" type: "Data" top: "data"
            data_param {{ source: "{source}" batch_size: 1 }} }}''')


def test_a_bad_record_later_in_the_db_surfaces_in_forward(tmp_path):
    good = raw_datum(hwc(image()), 0).SerializeToString()
    source = write_lmdb(tmp_path / "db", [good, good, b"\x08\x03\x10\x02\x18\x02\x22\x01x"])
    n = data_net(source, batch=2)
    n.forward()
    with pytest.raises(DataError, match=r"layer 'd' \(Data\).*record '00000002'"):
        n.forward()
    data_layers.close_data_layers(n)


def test_bad_layer_params_are_net_errors(tmp_path):
    source, _ = raw_records(tmp_path / "db")
    with pytest.raises(NetError, match="batch_size must be positive"):
        data_net(source, batch=0)
    with pytest.raises(NetError, match="prefetch must be at least 1"):
        data_net(source, extra="prefetch: 0")


def test_configure_after_the_first_forward_is_refused(tmp_path):
    source, _ = raw_records(tmp_path / "db")
    n = data_net(source)
    n.forward()
    with pytest.raises(NetError, match="before their first forward"):
        data_layers.configure_data_layers(n, prefetch=False)
    data_layers.close_data_layers(n)


def test_close_stops_the_loading_threads(tmp_path):
    source, _ = raw_records(tmp_path / "db")
    before = set(threading.enumerate())
    n = data_net(source)
    n.forward()
    assert any(t.name.startswith("protonet-prefetch") for t in threading.enumerate())
    data_layers.close_data_layers(n)
    leftover = [t for t in set(threading.enumerate()) - before
                if t.name.startswith("protonet")]
    assert not leftover
    with pytest.raises(NetError, match="is closed"):
        n.forward()


def test_a_collected_net_stops_its_threads(tmp_path):
    source, _ = raw_records(tmp_path / "db")
    before = set(threading.enumerate())
    n = data_net(source)
    n.forward()
    del n
    gc.collect()
    assert not [t for t in set(threading.enumerate()) - before
                if t.name.startswith("protonet")]


def test_a_program_that_never_closes_still_exits(tmp_path):
    source, _ = raw_records(tmp_path / "db", count=40, shape=(3, 96, 96))
    script = textwrap.dedent(f"""
        import protonet, protonet.data.layers
        from protonet.io.text import parse_text
        text = '''layer {{ name: "d" type: "Data" top: "data" top: "label"
            transform_param {{ mirror: true mean_value: 9 scale: 0.5 }}
            data_param {{ source: "{source}" batch_size: 32 backend: LMDB }} }}'''
        net = protonet.Net(parse_text(text, protonet.caffe_pb2.NetParameter()), protonet.TEST)
        net.forward()
    """)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60,
                          text=True)
    assert done.returncode == 0, done.stderr     # no abort from a thread inside torch
    assert time.monotonic() - start < 30


def test_leveldb_without_plyvel_points_to_lmdb(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "plyvel", None)
    (tmp_path / "ldb").mkdir()
    (tmp_path / "ldb" / "CURRENT").write_text("")
    with pytest.raises(DataError, match="plyvel.*LMDB"):
        net(f'''layer {{ name: "d" type: "Data" top: "data"
            data_param {{ source: "{tmp_path / 'ldb'}" batch_size: 1 }} }}''')


def test_leveldb_batches_equal_lmdb_batches(tmp_path):
    pytest.importorskip("plyvel")
    from protonet.data.imageset import _LevelDbWriter
    images = [image(seed=i) for i in range(3)]
    values = [raw_datum(hwc(im), i).SerializeToString() for i, im in enumerate(images)]
    with _LevelDbWriter(str(tmp_path / "ldb")) as writer:
        for i, value in enumerate(values):
            writer.put(f"{i:08d}".encode(), value)
    n = net(f'''layer {{ name: "d" type: "Data" top: "data" top: "label"
        data_param {{ source: "{tmp_path / 'ldb'}" batch_size: 4 backend: LEVELDB }} }}''')
    out = n.forward()
    np.testing.assert_array_equal(out["label"], [0, 1, 2, 0])
    np.testing.assert_array_equal(out["data"][1], images[1].astype(np.float32))
    data_layers.close_data_layers(n)


# --- ImageData -----------------------------------------------------------------------

def image_folder(tmp_path, count=5, lines=None):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(count):
        cv2.imwrite(str(folder / f"{i}.png"), hwc(image(3, 8 + i, 9, seed=i)))
    listing = lines or [f"{i}.png {i * 10}" for i in range(count)]
    (folder / "list.txt").write_text("\n".join(listing) + "\n")
    return folder


def image_net(folder, phase=TEST, batch=3, params="", transform=""):
    return net(f'''layer {{ name: "img" type: "ImageData" top: "data" top: "label"
        transform_param {{ {transform} }}
        image_data_param {{ source: "{folder / 'list.txt'}" root_folder: "{folder}/"
                            batch_size: {batch} {params} }} }}''', phase)


def test_image_data_resizes_bilinear_and_reads_gray(tmp_path):
    folder = image_folder(tmp_path)
    n = image_net(folder, params="new_height: 5 new_width: 4 is_color: false")
    out = n.forward()
    expected = cv2.resize(cv2.imread(str(folder / "1.png"), cv2.IMREAD_GRAYSCALE), (4, 5))
    assert out["data"].shape == (3, 1, 5, 4)
    np.testing.assert_array_equal(out["data"][1, 0], expected.astype(np.float32))
    np.testing.assert_array_equal(out["label"], [0, 10, 20])
    data_layers.close_data_layers(n)


def test_image_data_shuffle_is_seeded_and_reshuffles_each_epoch(tmp_path):
    folder = image_folder(tmp_path)
    epochs = []
    for _ in range(2):
        protonet.set_random_seed(3)
        n = image_net(folder, batch=5, params="shuffle: true", transform="crop_size: 8")
        epochs.append([n.forward()["label"] for _ in range(3)])
        data_layers.close_data_layers(n)
    for a, b in zip(*epochs):
        np.testing.assert_array_equal(a, b)
    first, second, _ = epochs[0]
    assert sorted(first) == sorted(second) == [0, 10, 20, 30, 40]
    assert not (np.array_equal(first, second) and np.array_equal(first, [0, 10, 20, 30, 40]))


def test_image_data_missing_image_names_the_path(tmp_path):
    folder = image_folder(tmp_path, lines=["0.png 0", "nothere.png 1"])
    n = image_net(folder, batch=2)
    with pytest.raises(DataError, match=r"layer 'img' \(ImageData\).*nothere.png.*not found"):
        n.forward()
    data_layers.close_data_layers(n)


def test_image_data_param_errors(tmp_path):
    folder = image_folder(tmp_path)
    with pytest.raises(NetError, match="new_height and new_width together"):
        image_net(folder, params="new_height: 5")
    with pytest.raises(DataError, match="image list not found"):
        net(f'''layer {{ name: "img" type: "ImageData" top: "data" top: "label"
            image_data_param {{ source: "{tmp_path / 'none.txt'}" }} }}''')


# --- MemoryData ----------------------------------------------------------------------

MEMORY = '''layer { name: "mem" type: "MemoryData" top: "data" top: "label"
    memory_data_param { batch_size: 2 channels: 1 height: 2 width: 3 } }'''


def test_memory_data_serves_batches_in_place_and_wraps():
    n = net(MEMORY)
    data = RNG.normal(size=(4, 1, 2, 3)).astype(np.float32)
    labels = np.arange(4, dtype=np.float32)
    data_layers.set_input_arrays(n, data, labels)
    out = n.forward()
    np.testing.assert_array_equal(out["data"], data[:2])
    assert out["label"].shape == (2, 1, 1, 1)            # Caffe's label shape in forward
    data[2] = 5.0                                        # used in place, as in Caffe
    np.testing.assert_array_equal(n.forward()["data"], data[2:])
    np.testing.assert_array_equal(n.forward()["label"].ravel(), [0, 1])


def test_memory_data_checks_its_arrays():
    n = net(MEMORY)
    good = np.zeros((2, 1, 2, 3), np.float32)
    with pytest.raises(DataError, match="call set_input_arrays first"):
        n.forward()
    with pytest.raises(DataError, match="float32"):
        data_layers.set_input_arrays(n, good.astype(np.float64), np.zeros(2, np.float32))
    with pytest.raises(DataError, match=r"expected \(N, 1, 2, 3\)"):
        data_layers.set_input_arrays(n, np.zeros((2, 1, 3, 2), np.float32),
                                     np.zeros(2, np.float32))
    with pytest.raises(DataError, match="multiple of batch_size 2"):
        data_layers.set_input_arrays(n, good[:1], np.zeros(1, np.float32))
    with pytest.raises(DataError, match="first layer is MemoryData"):
        data_layers.set_input_arrays(net('''layer { name: "i" type: "Input" top: "x"
            input_param { shape { dim: 1 } } }'''), good, np.zeros(2, np.float32))
    with pytest.raises(NetError, match="must be given and positive"):
        net(MEMORY.replace("channels: 1", "channels: 0"))


# --- WindowData ----------------------------------------------------------------------

def window_setup(tmp_path, windows, mean="mean_value: 10", params="", crop=8):
    picture = hwc(image(3, 30, 40))
    cv2.imwrite(str(tmp_path / "a.png"), picture)
    lines = ["# 0", "a.png", "3", "30", "40", str(len(windows))] + windows
    (tmp_path / "windows.txt").write_text("\n".join(lines) + "\n")
    text = f'''layer {{ name: "win" type: "WindowData" top: "data" top: "label"
        transform_param {{ crop_size: {crop} {mean} }}
        window_data_param {{ source: "{tmp_path / 'windows.txt'}" root_folder: "{tmp_path}/"
                             batch_size: 4 fg_fraction: 0.5 scale: 0.5 {params} }} }}'''
    return net(text, TRAIN), picture


def test_window_data_warps_background_then_foreground(tmp_path):
    n, picture = window_setup(tmp_path, ["2 0.9 3 4 20 15", "5 0.1 10 2 30 25"])
    out = n.forward()
    np.testing.assert_array_equal(out["label"], [0, 0, 2, 2])

    def warp(x1, y1, x2, y2):
        resized = cv2.resize(picture[y1:y2 + 1, x1:x2 + 1], (8, 8))
        return (resized.transpose(2, 0, 1).astype(np.float32) - 10) * np.float32(0.5)
    np.testing.assert_array_equal(out["data"][0], warp(10, 2, 30, 25))
    np.testing.assert_array_equal(out["data"][3], warp(3, 4, 20, 15))
    data_layers.close_data_layers(n)


def test_window_context_padding_leaves_zeros_outside_the_image(tmp_path):
    n, _ = window_setup(tmp_path, ["1 0.9 0 0 9 9", "1 0.0 20 10 35 25"],
                        mean="", params="context_pad: 2", crop=12)
    out = n.forward()["data"]
    fg = out[2]                        # the window at the image corner, grown by context
    assert out.shape == (4, 3, 12, 12)
    assert np.all(fg[:, 0, :] == 0) and np.all(fg[:, :, 0] == 0)
    assert np.any(fg[:, 6, 6] != 0)
    data_layers.close_data_layers(n)


def test_window_data_errors(tmp_path):
    with pytest.raises(DataError, match="label 0; it must be > 0"):
        window_setup(tmp_path, ["0 0.9 0 0 5 5", "1 0.1 0 0 5 5"])
    with pytest.raises(DataError, match="needs foreground and background"):
        window_setup(tmp_path, ["1 0.9 0 0 5 5"])
    with pytest.raises(NetError, match="crop_size > 0"):
        window_setup(tmp_path, ["1 0.9 0 0 5 5", "1 0.1 0 0 5 5"], crop=0)


def test_a_relative_database_path_closes_after_a_chdir(tmp_path, monkeypatch):
    """A reader opened by a relative path releases the handle it opened, even when the
    working directory changed in between (a solver run from its folder, then left)."""
    from protonet.data.lmdb_source import RecordCursor
    write_lmdb(tmp_path / "db", [raw_datum(np.zeros((1, 2, 2), np.uint8), 0)
                                 .SerializeToString()])
    monkeypatch.chdir(tmp_path)
    cursor = RecordCursor("db")
    monkeypatch.chdir(tmp_path.parent)
    cursor.close()                      # raised KeyError when it re-resolved "db" here
    monkeypatch.chdir(tmp_path)
    RecordCursor("db").close()          # and the handle is gone: a fresh open works


def test_raw_records_never_load_opencv_and_encoded_ones_do(tmp_path):
    """OpenCV (~12 MB resident, 18 ms to import) loads on the first encoded image, so
    a net on raw Datums (MNIST's LMDBs) trains without it."""
    raw, _ = raw_records(tmp_path / "raw")
    ok, png = cv2.imencode(".png", hwc(image()))
    encoded = write_lmdb(tmp_path / "png", [encoded_datum(png.tobytes(), 0).SerializeToString()] * 2)
    script = textwrap.dedent('''
        import sys
        import protonet
        from protonet.io.text import parse_text
        text = ('layer { name: "d" type: "Data" top: "data" top: "label" data_param { '
                'source: "%s" batch_size: 2 backend: LMDB } }' % sys.argv[1])
        net = protonet.Net(parse_text(text, protonet.caffe_pb2.NetParameter()), protonet.TEST)
        net.forward()
        print("cv2" in sys.modules, float(net.blobs["data"].data.sum()) > 0)
    ''')
    for source, loads in ((raw, "False"), (encoded, "True")):
        done = subprocess.run([sys.executable, "-c", script, source], capture_output=True,
                              text=True, timeout=120, cwd=str(tmp_path),
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert done.stdout.split() == [loads, "True"], done.stderr[-2000:]
