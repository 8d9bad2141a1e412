"""SSD's data path: `protonet convert-annoset` (images + VOC XML -> AnnotatedDatum LMDB)
and the AnnotatedData layer (resize, crop, mirror, batch sampling), on a small synthetic
set of images whose objects are solid rectangles, so every box can be checked against
the pixels; and an SSD trained from such a database."""
from __future__ import annotations

import numpy as np
import pytest

import cv2
import lmdb

import protonet
from protonet import caffe_pb2
from protonet.errors import DataError

from test_zoo import run_cli

COLOURS = {"red": (0, 0, 255), "green": (0, 255, 0)}
LABELS = {"red": 1, "green": 2}
# Per image: (name, xmin, ymin, xmax, ymax, difficult) in pixels of an 80x60 image.
OBJECTS = [
    [("red", 8, 10, 30, 40, 0), ("green", 40, 5, 70, 25, 0)],
    [("green", 20, 20, 60, 50, 1)],
    [("red", 5, 5, 25, 20, 0), ("red", 50, 30, 75, 55, 0)],
    [],
]


def voc_xml(objects, width=80, height=60) -> str:
    parts = [f"<annotation><size><width>{width}</width><height>{height}</height>"
             "<depth>3</depth></size>"]
    for name, x0, y0, x1, y1, difficult in objects:
        parts.append(f"<object><name>{name}</name><difficult>{difficult}</difficult>"
                     f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
                     f"<ymax>{y1}</ymax></bndbox></object>")
    return "".join(parts) + "</annotation>"


@pytest.fixture
def annoset(tmp_path):
    """Images (rectangles of their objects' colours), XML files, list and label map."""
    root = tmp_path / "voc"
    root.mkdir()
    lines = []
    for i, objects in enumerate(OBJECTS):
        image = np.zeros((60, 80, 3), np.uint8)
        for name, x0, y0, x1, y1, _ in objects:
            image[y0:y1, x0:x1] = COLOURS[name]
        cv2.imwrite(str(root / f"{i}.png"), image)
        (root / f"{i}.xml").write_text(voc_xml(objects))
        lines.append(f"{i}.png {i}.xml")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    (root / "labelmap.prototxt").write_text(
        'item { name: "none_of_the_above" label: 0 }\n'
        'item { name: "red" label: 1 }\nitem { name: "green" label: 2 }\n')
    return root


def convert(root, db, *extra) -> int:
    return run_cli("convert-annoset", "--label_map_file", str(root / "labelmap.prototxt"),
                   "--no-progress", *extra, f"{root}/", str(root / "list.txt"), str(db))


def records(db):
    env = lmdb.open(str(db), readonly=True, lock=False)
    with env.begin() as txn:
        out = []
        for key, value in txn.cursor():
            record = caffe_pb2.AnnotatedDatum()
            record.ParseFromString(value)
            out.append((key.decode(), record))
    env.close()
    return out


def test_convert_annoset_writes_the_forks_records(annoset, tmp_path):
    assert convert(annoset, tmp_path / "db") == 0
    stored = records(tmp_path / "db")
    assert [k for k, _ in stored] == [f"{i:08d}_{i}.png" for i in range(4)]
    for (_, record), objects in zip(stored, OBJECTS):
        assert record.type == caffe_pb2.AnnotatedDatum.BBOX
        datum = record.datum
        assert (datum.channels, datum.height, datum.width, datum.label) == (3, 60, 80, -1)
        rows = [(g.group_label, a.instance_id, a.bbox.xmin, a.bbox.ymin, a.bbox.xmax,
                 a.bbox.ymax, a.bbox.difficult)
                for g in record.annotation_group for a in g.annotation]
        counts: dict[str, int] = {}
        expected = []
        for name in dict.fromkeys(o[0] for o in objects):     # groups by first sight
            for o in (o for o in objects if o[0] == name):
                expected.append((LABELS[name], counts.setdefault(name, 0), o[1] / 80,
                                 o[2] / 60, o[3] / 80, o[4] / 60, bool(o[5])))
                counts[name] += 1
        assert len(rows) == len(expected)
        for got, want in zip(rows, expected):
            assert got[:2] == want[:2] and got[6] == want[6]
            np.testing.assert_allclose(got[2:6], want[2:6], rtol=1e-6)


def test_unknown_names_skip_the_image(annoset, tmp_path, caplog):
    (annoset / "1.xml").write_text(voc_xml([("blue", 1, 1, 5, 5, 0)]))
    assert convert(annoset, tmp_path / "db", "--encoded") == 0
    assert [k for k, _ in records(tmp_path / "db")] == ["00000000_0.png", "00000002_2.png",
                                                         "00000003_3.png"]
    assert "unknown name 'blue'" in caplog.text
    with pytest.raises(DataError, match="already exists"):
        from protonet.data.annoset import convert_annoset
        convert_annoset(f"{annoset}/", str(annoset / "list.txt"), str(tmp_path / "db"),
                        str(annoset / "labelmap.prototxt"), progress=False)


def data_net(db, transform: str = "", samplers: str = "", batch: int = 4,
             phase=protonet.TEST) -> protonet.Net:
    text = (f'layer {{ name: "data" type: "AnnotatedData" top: "data" top: "label" '
            f'data_param {{ source: "{db}" batch_size: {batch} backend: LMDB }} '
            f'transform_param {{ {transform} }} '
            f'annotated_data_param {{ {samplers} }} }}\n')
    path = db.parent / "net.prototxt"
    path.write_text(text)
    net = protonet.Net(str(path), phase)
    net.module.layers[0].configure(prefetch=False)
    return net


def colour_box(image_chw: np.ndarray, colour) -> tuple[float, float, float, float] | None:
    """The normalized extent of the pixels of `colour` (BGR) in a CHW image."""
    mask = np.all(np.abs(image_chw.transpose(1, 2, 0) - colour) < 60, axis=2)
    if not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h)


def test_annotated_data_resizes_and_labels_every_box(annoset, tmp_path):
    convert(annoset, tmp_path / "db")
    net = data_net(tmp_path / "db", "mean_value: 10 mean_value: 20 mean_value: 30 "
                   "resize_param { resize_mode: WARP height: 30 width: 40 }")
    out = net.forward(blobs=["data", "label"])
    data, label = out["data"], out["label"]
    assert data.shape == (4, 3, 30, 40)
    for i in range(4):
        image = cv2.imread(str(annoset / f"{i}.png"))
        expected = cv2.resize(image, (40, 30), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_allclose(data[i], expected.transpose(2, 0, 1).astype(np.float32)
                                   - np.array([10, 20, 30], np.float32)[:, None, None])
    rows = label[0, 0]
    expected_rows = []
    for i, objects in enumerate(OBJECTS):
        for name in dict.fromkeys(o[0] for o in objects):
            for k, o in enumerate(o for o in objects if o[0] == name):
                expected_rows.append([i, LABELS[name], k, o[1] / 80, o[2] / 60, o[3] / 80,
                                      o[4] / 60, o[5]])
    np.testing.assert_allclose(rows, np.array(expected_rows, np.float32), rtol=1e-6)


def test_mirror_flips_pixels_and_boxes(annoset, tmp_path):
    convert(annoset, tmp_path / "db")
    protonet.set_random_seed(3)
    net = data_net(tmp_path / "db", "mirror: true", phase=protonet.TRAIN)
    flipped = 0
    for _ in range(3):
        out = net.forward(blobs=["data", "label"])
        for row in out["label"][0, 0]:
            item, label = int(row[0]), int(row[1])
            found = colour_box(out["data"][item], COLOURS["red" if label == 1 else "green"])
            original = [o for o in OBJECTS[item]
                        if LABELS[o[0]] == label][int(row[2])]
            assert found is not None
            if abs(row[3] - original[1] / 80) > 1e-6:
                flipped += 1
                np.testing.assert_allclose(row[3:7], [1 - original[3] / 80, original[2] / 60,
                                                      1 - original[1] / 80, original[4] / 60],
                                           rtol=1e-5)
    assert flipped > 0


def test_batch_sampling_crops_images_and_boxes_together(annoset, tmp_path):
    convert(annoset, tmp_path / "db")          # raw pixels: crops stay exact
    protonet.set_random_seed(11)
    sampler = ("batch_sampler { sampler { min_scale: 0.4 max_scale: 1.0 "
               "min_aspect_ratio: 0.5 max_aspect_ratio: 2.0 } sample_constraint { "
               "min_jaccard_overlap: 0.1 } max_sample: 1 max_trials: 50 }")
    net = data_net(tmp_path / "db", "resize_param { resize_mode: WARP height: 120 "
                   "width: 160 interp_mode: NEAREST } emit_constraint { emit_type: CENTER }",
                   sampler, phase=protonet.TRAIN)
    checked = 0
    for _ in range(4):
        out = net.forward(blobs=["data", "label"])
        assert out["data"].shape == (4, 3, 120, 160)
        for row in out["label"][0, 0]:
            if row[0] < 0:
                continue
            item, label = int(row[0]), int(row[1])
            box = row[3:7]
            # the object's colour fills its box, but for a rim: the fork crops whole
            # source pixels (truncated) and projects boxes exactly, ~2.3 pixels here
            h, w = 120, 160
            x0, y0, x1, y1 = (int(round(box[0] * w)), int(round(box[1] * h)),
                              int(round(box[2] * w)), int(round(box[3] * h)))
            colour = COLOURS["red" if label == 1 else "green"]
            inside = out["data"][item][:, y0 + 6:y1 - 6, x0 + 6:x1 - 6]
            if inside.size:
                assert np.all(np.abs(inside.transpose(1, 2, 0) - colour) < 60)
                checked += 1
    assert checked > 5


def test_a_default_sampler_keeps_the_whole_image(annoset, tmp_path):
    """SSD's first batch_sampler (no sampler message) proposes the image itself."""
    convert(annoset, tmp_path / "db")
    plain = data_net(tmp_path / "db", "resize_param { resize_mode: WARP height: 30 "
                     "width: 40 }").forward(blobs=["data", "label"])
    whole = data_net(tmp_path / "db", "resize_param { resize_mode: WARP height: 30 "
                     "width: 40 }", "batch_sampler { max_sample: 1 max_trials: 1 }",
                     phase=protonet.TRAIN).forward(blobs=["data", "label"])
    np.testing.assert_array_equal(plain["data"], whole["data"])
    np.testing.assert_allclose(plain["label"], whole["label"], atol=1e-6)


def test_sampled_crops_of_encoded_records_go_through_jpeg(annoset, tmp_path):
    """The fork re-encodes a sampled crop of an encoded record as JPEG."""
    convert(annoset, tmp_path / "db", "--encode_type", "png")
    protonet.set_random_seed(2)
    net = data_net(tmp_path / "db", "resize_param { resize_mode: WARP height: 30 width: 40 }",
                   "batch_sampler { sampler { min_scale: 0.5 max_scale: 0.9 } "
                   "max_sample: 1 max_trials: 5 }", phase=protonet.TRAIN)
    data = net.forward(blobs=["data"])["data"]
    assert data.shape == (4, 3, 30, 40)
    # JPEG leaves values a solid PNG never has (neither 0 nor 255 in some channel)
    assert np.any((data > 5) & (data < 250))


TRAIN_NET = """
layer {{ name: "data" type: "AnnotatedData" top: "data" top: "label"
        include {{ phase: TRAIN }}
        data_param {{ source: "{db}" batch_size: 4 backend: LMDB }}
        transform_param {{ mean_value: 64 mean_value: 64 mean_value: 64 scale: 0.02
                          resize_param {{ resize_mode: WARP height: 32 width: 32 }} }} }}
layer {{ name: "feat" type: "Convolution" bottom: "data" top: "feat"
        convolution_param {{ num_output: 8 kernel_size: 8 stride: 8
                            weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "feat" top: "feat" }}
layer {{ name: "loc" type: "Convolution" bottom: "feat" top: "loc"
        convolution_param {{ num_output: 12 kernel_size: 3 pad: 1
                            weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "loc_perm" type: "Permute" bottom: "loc" top: "loc_perm"
        permute_param {{ order: 0 order: 2 order: 3 order: 1 }} }}
layer {{ name: "loc_flat" type: "Flatten" bottom: "loc_perm" top: "loc_flat" }}
layer {{ name: "conf" type: "Convolution" bottom: "feat" top: "conf"
        convolution_param {{ num_output: 9 kernel_size: 3 pad: 1
                            weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "conf_perm" type: "Permute" bottom: "conf" top: "conf_perm"
        permute_param {{ order: 0 order: 2 order: 3 order: 1 }} }}
layer {{ name: "conf_flat" type: "Flatten" bottom: "conf_perm" top: "conf_flat" }}
layer {{ name: "priors" type: "PriorBox" bottom: "feat" bottom: "data" top: "priors"
        prior_box_param {{ min_size: 8 max_size: 16 aspect_ratio: 2 flip: false
                          variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 }} }}
layer {{ name: "mbox_loss" type: "MultiBoxLoss" bottom: "loc_flat" bottom: "conf_flat"
        bottom: "priors" bottom: "label" top: "mbox_loss"
        propagate_down: true propagate_down: true propagate_down: false
        propagate_down: false
        multibox_loss_param {{ num_classes: 3 code_type: CENTER_SIZE
                              overlap_threshold: 0.3 }} }}
"""


def test_an_ssd_trains_from_the_annoset(annoset, tmp_path):
    convert(annoset, tmp_path / "db")
    protonet.set_random_seed(5)
    (tmp_path / "train.prototxt").write_text(TRAIN_NET.format(db=tmp_path / "db"))
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path}/train.prototxt"\nbase_lr: 0.01\nmomentum: 0.9\n'
        'lr_policy: "fixed"\nmax_iter: 25\ndisplay: 0\nsnapshot_after_train: false\n')
    solver = protonet.get_solver(str(tmp_path / "solver.prototxt"))
    losses = []
    for _ in range(25):
        solver.step(1)
        losses.append(float(solver.net.blobs["mbox_loss"].data))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_expansion_places_the_image_on_a_larger_canvas(annoset, tmp_path):
    convert(annoset, tmp_path / "db")          # raw records: the fork's filler is 32
    protonet.set_random_seed(4)
    net = data_net(tmp_path / "db", "resize_param { resize_mode: WARP height: 120 "
                   "width: 160 interp_mode: NEAREST } "
                   "expand_param { prob: 1 max_expand_ratio: 3 }", phase=protonet.TRAIN)
    out = net.forward(blobs=["data", "label"])
    data, rows = out["data"], out["label"][0, 0]
    assert np.any(np.all(data == 32, axis=1))          # the canvas shows
    for row in rows:
        item, label = int(row[0]), int(row[1])
        original = [o for o in OBJECTS[item] if LABELS[o[0]] == label][int(row[2])]
        x0, y0, x1, y1 = (int(round(v)) for v in row[3:7] * [160, 120, 160, 120])
        inside = data[item][:, y0 + 3:y1 - 3, x0 + 3:x1 - 3]
        assert inside.size and np.all(inside.transpose(1, 2, 0) == COLOURS[original[0]])
        # a box keeps its size relative to the image it came from
        assert (row[5] - row[3]) < (original[3] - original[1]) / 80 + 1e-6


def test_distortion_changes_colours_not_boxes(annoset, tmp_path):
    convert(annoset, tmp_path / "db", "--encode_type", "png")
    protonet.set_random_seed(8)
    plain = data_net(tmp_path / "db", "resize_param { resize_mode: WARP height: 30 width: 40 }")
    distorted = data_net(tmp_path / "db", "resize_param { resize_mode: WARP height: 30 "
                         "width: 40 } distort_param { brightness_prob: 1 brightness_delta: 40 "
                         "contrast_prob: 1 contrast_lower: 0.5 contrast_upper: 1.5 "
                         "saturation_prob: 1 saturation_lower: 0.5 saturation_upper: 1.5 "
                         "hue_prob: 1 hue_delta: 18 random_order_prob: 1 }")
    a = plain.forward(blobs=["data", "label"])
    b = distorted.forward(blobs=["data", "label"])
    np.testing.assert_array_equal(a["label"], b["label"])
    assert np.abs(a["data"] - b["data"]).mean() > 5


def test_unsupported_transforms_are_named(annoset, tmp_path):
    convert(annoset, tmp_path / "db")
    with pytest.raises(protonet.NetError, match="noise_param is not supported"):
        data_net(tmp_path / "db", "noise_param { prob: 0.5 }")


def test_sampled_boxes_stay_inside_the_image():
    """Scales near 1 with extreme aspect ratios clamp to boxes of width or height 1;
    rounding must not push the offset range below zero."""
    from protonet.data.annotated import sample_box
    sampler = caffe_pb2.Sampler(min_scale=0.3, max_scale=1.0, min_aspect_ratio=0.5,
                                max_aspect_ratio=2.0)
    rng = np.random.default_rng(0)
    for _ in range(3000):
        x0, y0, x1, y1 = sample_box(sampler, rng)
        assert 0 <= x0 <= x1 <= 1 + 1e-6 and 0 <= y0 <= y1 <= 1 + 1e-6
