"""protonet.caffe, pycaffe's namespace: names, alias(), `python -m protonet.caffe`,
the global mode, and caffe.io / coord_map / net_spec / draw against pycaffe's
documented behaviour (expected numbers computed here independently)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time

import cv2
import numpy as np
import pytest
import torch

import protonet.caffe as caffe
from protonet.caffe import layers as L, params as P
from protonet.caffe.coord_map import (AxisMismatchException, UndefinedMapException,
                                      compose, coord_map, coord_map_from_to, conv_params,
                                      crop, crop_params, inverse)
from protonet.errors import ProtonetError
from protonet.proto import caffe_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PUBLIC = ["Net", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver",
          "AdaDeltaSolver", "AdamSolver", "get_solver", "Layer", "TRAIN", "TEST",
          "set_mode_cpu", "set_mode_gpu", "set_device", "set_random_seed",
          "layer_type_list", "Timer", "init_log", "log", "solver_count", "solver_rank",
          "set_solver_count", "set_solver_rank", "set_multiprocess", "has_nccl", "NCCL",
          "__version__", "NetSpec", "layers", "params", "to_proto", "Classifier",
          "Detector", "io", "draw", "net_spec", "coord_map", "classifier", "detector",
          "pycaffe", "proto"]

SMALL_NET = """
name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


@pytest.fixture
def net_file(tmp_path):
    path = tmp_path / "small.prototxt"
    path.write_text(SMALL_NET)
    return str(path)


# -- the namespace ------------------------------------------------------------------------
def test_public_names_are_there():
    missing = [n for n in PUBLIC if not hasattr(caffe, n)]
    assert not missing
    assert caffe.proto.caffe_pb2 is caffe_pb2
    assert (caffe.TRAIN, caffe.TEST) == (caffe_pb2.TRAIN, caffe_pb2.TEST)
    assert {"Data", "Convolution", "InnerProduct", "Python"} <= set(caffe.layer_type_list())
    assert caffe.Layer is __import__("protonet").PythonLayer
    assert isinstance(caffe.__version__, str)


def _caffe_modules():
    return {k: v for k, v in sys.modules.items() if k == "caffe" or k.startswith("caffe.")}


def test_alias_makes_import_caffe_these_modules():
    saved = _caffe_modules()
    try:
        caffe.alias()
        exec("import caffe.io, caffe.proto.caffe_pb2\n"
             "from caffe.coord_map import crop as aliased_crop\n"
             "from caffe.draw import draw_net\n"
             "from caffe.proto import caffe_pb2 as pb\n"
             "import caffe as aliased", names := {})
        aliased, aliased_crop, draw_net, pb = (names[k] for k in
                                               ("aliased", "aliased_crop", "draw_net", "pb"))
        assert aliased is caffe and names["caffe"] is caffe
        assert sys.modules["caffe.io"] is caffe.io
        assert pb is caffe_pb2 and sys.modules["caffe.proto.caffe_pb2"] is caffe_pb2
        assert aliased_crop is crop and draw_net is caffe.draw.draw_net
        for sub in ("net_spec", "classifier", "detector", "pycaffe", "proto"):
            assert sys.modules["caffe." + sub] is getattr(caffe, sub)
    finally:
        for key in _caffe_modules():
            del sys.modules[key]
        sys.modules.update(saved)


def _run(args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "protonet.caffe", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)


def test_python_m_runs_a_script_with_import_caffe(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent("""
        import sys
        import caffe
        from caffe import layers as L
        from caffe.proto import caffe_pb2
        import helper                      # the script's folder is on sys.path
        assert caffe.__name__ == "protonet.caffe", caffe.__name__
        print("argv", sys.argv[1:], __name__, helper.VALUE)
        sys.exit(int(sys.argv[2]))
    """))
    (tmp_path / "helper.py").write_text("VALUE = 42\n")
    done = _run([str(script), "--flag", "3"], tmp_path)
    assert done.returncode == 3, done.stderr
    assert "argv ['--flag', '3'] __main__ 42" in done.stdout
    assert _run([str(tmp_path / "absent.py")], tmp_path).returncode == 2


def test_python_m_runs_a_module(tmp_path):
    (tmp_path / "mod_main.py").write_text(
        "import sys, caffe.io\nprint('mod', sys.argv[1:])\nraise SystemExit(0)\n")
    done = _run(["-m", "mod_main", "x"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "mod ['x']" in done.stdout


# -- mode, solvers and small functions -------------------------------------------------------
def test_nets_follow_the_global_mode(net_file, caplog):
    net = caffe.Net(net_file, caffe.TEST)
    assert net.device.type == "cpu"
    assert isinstance(net, caffe.Net) and issubclass(__import__("protonet").Net, caffe.Net)
    assert not isinstance(net, caffe.Classifier)
    try:
        caffe.set_device(0)
        caffe.set_mode_gpu()
        with caplog.at_level(logging.WARNING, logger="protonet"):
            gpu_net = caffe.Net(net_file, caffe.TEST, stages=None)
        if torch.cuda.is_available():
            assert gpu_net.device.type == "cuda"
            assert next(gpu_net.module.parameters()).is_cuda
        else:
            assert gpu_net.device.type == "cpu"
            assert "CUDA is not available" in caplog.text
    finally:
        caffe.set_mode_cpu()
    assert caffe.Net(net_file, caffe.TEST).device.type == "cpu"
    with pytest.raises(ProtonetError):
        caffe.set_device(-1)


def test_solver_classes_and_get_solver(tmp_path, net_file):
    train = tmp_path / "train.prototxt"
    train.write_text(SMALL_NET.replace('name: "prob" type: "Softmax" bottom: "ip" top: "prob"',
                                       'name: "loss" type: "EuclideanLoss" bottom: "ip" '
                                       'bottom: "ip" top: "loss"'))
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(f'net: "{train}" base_lr: 0.1 lr_policy: "fixed" type: "Adam" '
                           'solver_mode: GPU\n')
    solver = caffe.get_solver(str(solver_file))
    assert type(solver) is caffe.AdamSolver
    assert solver.device.type == "cpu"          # pycaffe: the mode decides, not the file
    assert isinstance(solver.net, caffe.Net)
    sgd = caffe.SGDSolver(str(solver_file))
    assert isinstance(sgd, caffe.SGDSolver) and sgd.param.base_lr == pytest.approx(0.1)


def test_small_functions(caplog):
    caffe.set_random_seed(7)
    a = torch.rand(3)
    caffe.set_random_seed(7)
    assert torch.equal(a, torch.rand(3))
    timer = caffe.Timer()
    timer.start()
    time.sleep(0.02)
    timer.stop()
    assert 15 <= timer.ms < 2000
    assert timer.ms == timer.ms                       # stopped: no longer moves
    previous = logging.getLogger("protonet").level
    try:
        caffe.init_log(0, False)
        with caplog.at_level(logging.INFO, logger="protonet"):
            caffe.log("hello from a script")
        assert "hello from a script" in caplog.text
    finally:
        logging.getLogger("protonet").setLevel(previous)
    assert (caffe.solver_count(), caffe.solver_rank()) == (1, 0)
    caffe.set_solver_count(2)
    caffe.set_solver_rank(1)
    assert (caffe.solver_count(), caffe.solver_rank()) == (2, 1)
    caffe.set_solver_count(1)
    caffe.set_solver_rank(0)
    caffe.set_multiprocess(False)
    assert caffe.has_nccl() is False
    with pytest.raises(ProtonetError, match="distributed"):
        caffe.NCCL(None, "")
    with pytest.raises(ProtonetError, match="NCCL"):
        caffe.NCCL.new_uid()


# -- caffe.io: Transformer ------------------------------------------------------------------
def _transformer(shape=(1, 3, 4, 5)):
    t = caffe.io.Transformer({"data": shape})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255.0)
    t.set_mean("data", np.array([10.0, 20.0, 30.0]))
    t.set_input_scale("data", 0.5)
    return t


def test_transformer_preprocess_order_and_round_trip():
    rng = np.random.default_rng(0)
    image = rng.random((4, 5, 3)).astype(np.float32)
    t = _transformer()
    out = t.preprocess("data", image)
    expected = np.empty((3, 4, 5), np.float32)
    for c_out, c_in in enumerate((2, 1, 0)):           # BGR from RGB
        expected[c_out] = (image[:, :, c_in] * 255.0 - (10.0, 20.0, 30.0)[c_out]) * 0.5
    assert out.dtype == np.float32 and out.shape == (3, 4, 5)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(t.deprocess("data", out), image, atol=1e-5)
    # a batch axis of one is squeezed away by deprocess, as pycaffe does
    np.testing.assert_allclose(t.deprocess("data", out[None]), image, atol=1e-5)


def test_transformer_resizes_to_the_input_and_checks_arguments():
    t = caffe.io.Transformer({"data": (1, 3, 4, 5)})
    t.set_transpose("data", (2, 0, 1))
    out = t.preprocess("data", np.full((8, 10, 3), 0.25, np.float32))
    assert out.shape == (3, 4, 5) and np.all(out == np.float32(0.25))
    with pytest.raises(Exception, match="not one of the net inputs"):
        t.preprocess("other", np.zeros((4, 5, 3)))
    with pytest.raises(Exception, match="Transpose order"):
        t.set_transpose("data", (1, 0))
    with pytest.raises(Exception, match="Channel swap"):
        t.set_channel_swap("data", (1, 0))
    with pytest.raises(ValueError, match="Mean channels"):
        t.set_mean("data", np.zeros(4))
    with pytest.raises(ValueError, match="Mean shape invalid"):
        t.set_mean("data", np.zeros((1, 3, 4, 5)))
    t.set_mean("data", np.arange(60, dtype=np.float32).reshape(3, 4, 5))   # as is
    assert t.mean["data"].shape == (3, 4, 5)
    big = np.broadcast_to(np.array([1.0, 2.0, 4.0])[:, None, None], (3, 8, 10)).copy()
    big[:, 0, 0] += 0.001                           # not constant: goes through resize
    t.set_mean("data", big)                          # another size: resized to 4 x 5
    assert t.mean["data"].shape == (3, 4, 5)
    np.testing.assert_allclose(t.mean["data"][:, 2, 2], [1.0, 2.0, 4.0], atol=1e-3)
    grey = caffe.io.Transformer({"data": (1, 1, 4, 5)})
    grey.set_mean("data", np.ones((4, 5)))          # H x W: a one-channel input's mean
    assert grey.mean["data"].shape == (4, 5)


# -- caffe.io: images -----------------------------------------------------------------------
def test_load_image_colour_grey_and_alpha(tmp_path):
    rgb = np.zeros((3, 4, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 255, 128, 0          # orange, in RGB
    rgb[1, 2] = (10, 20, 30)
    path = str(tmp_path / "c.png")
    cv2.imwrite(path, rgb[:, :, ::-1])                            # OpenCV writes BGR
    img = caffe.io.load_image(path)
    assert img.dtype == np.float32 and img.shape == (3, 4, 3)
    np.testing.assert_allclose(img, rgb / 255.0, atol=1e-7)
    grey = caffe.io.load_image(path, color=False)
    assert grey.shape == (3, 4, 1)
    np.testing.assert_allclose(grey[..., 0], (rgb / 255.0) @ [0.2125, 0.7154, 0.0721],
                               atol=1e-6)
    gpath = str(tmp_path / "g.png")
    cv2.imwrite(gpath, np.array([[0, 51], [102, 255]], np.uint8))
    g3 = caffe.io.load_image(gpath)
    assert g3.shape == (2, 2, 3) and np.all(g3[..., 0] == g3[..., 2])
    np.testing.assert_allclose(g3[..., 1], [[0, 0.2], [0.4, 1.0]], atol=1e-7)
    assert caffe.io.load_image(gpath, color=False).shape == (2, 2, 1)
    apath = str(tmp_path / "a.png")
    cv2.imwrite(apath, np.dstack([rgb[:, :, ::-1], np.full((3, 4), 7, np.uint8)]))
    np.testing.assert_allclose(caffe.io.load_image(apath), rgb / 255.0, atol=1e-7)
    wpath = str(tmp_path / "w.png")
    cv2.imwrite(wpath, np.full((2, 2), 65535, np.uint16))
    assert np.all(caffe.io.load_image(wpath) == 1.0)
    with pytest.raises(ProtonetError, match="cannot read"):
        caffe.io.load_image(str(tmp_path / "missing.png"))


def _bilinear_1d(values, n_out):
    """Half-pixel-centre linear interpolation with clamped edges, by hand."""
    n_in = len(values)
    out = []
    for i in range(n_out):
        x = min(max((i + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)
        lo = int(np.floor(x))
        hi = min(lo + 1, n_in - 1)
        out.append(values[lo] * (1 - (x - lo)) + values[hi] * (x - lo))
    return np.array(out)


def test_resize_image_orders_range_and_channels():
    im = np.array([[0.0, 4.0], [8.0, 12.0]])[:, :, None]          # range 0..12
    up = caffe.io.resize_image(im, (4, 4))
    assert up.dtype == np.float32 and up.shape == (4, 4, 1)
    rows = np.array([_bilinear_1d(r, 4) for r in im[:, :, 0]])
    expected = np.array([_bilinear_1d(c, 4) for c in rows.T]).T
    np.testing.assert_allclose(up[:, :, 0], expected, atol=1e-5)
    near = caffe.io.resize_image(im, (4, 4), interp_order=0)
    np.testing.assert_array_equal(near[:, :, 0], np.repeat(np.repeat(im[:, :, 0], 2, 0), 2, 1))
    grid = np.arange(36, dtype=np.float64).reshape(6, 6, 1)
    third = caffe.io.resize_image(grid, (2, 3), interp_order=0)   # the pixel under each centre
    np.testing.assert_allclose(third[:, :, 0], grid[[1, 4]][:, [1, 3, 5], 0], atol=1e-5)
    const = caffe.io.resize_image(np.full((3, 3, 3), -2.5), (5, 7))
    assert const.shape == (5, 7, 3) and np.all(const == -2.5)
    many = np.random.default_rng(1).random((6, 6, 5)) * 100 - 50  # not 1 or 3 channels
    small = caffe.io.resize_image(many, (3, 2))
    assert small.shape == (3, 2, 5)
    cubic = caffe.io.resize_image(np.random.default_rng(2).random((5, 5, 3)), (9, 9), 3)
    assert cubic.shape == (9, 9, 3) and cubic.min() >= 0 and cubic.max() <= 1
    with pytest.raises(ProtonetError):
        caffe.io.resize_image(im, (4, 4), interp_order=7)


def test_oversample_crops_and_mirrors():
    h, w, k = 7, 9, 2
    ims = [np.arange(h * w * k, dtype=np.float32).reshape(h, w, k) + 1000 * n for n in range(2)]
    crops = caffe.io.oversample(ims, (4, 6))
    assert crops.shape == (20, 4, 6, 2) and crops.dtype == np.float32
    for n, im in enumerate(ims):
        got = crops[10 * n:10 * n + 10]
        corners = [im[:4, :6], im[:4, 3:], im[3:, :6], im[3:, 3:], im[1:5, 1:7]]
        for i, expected in enumerate(corners):
            np.testing.assert_array_equal(got[i], expected)
            np.testing.assert_array_equal(got[5 + i], expected[:, ::-1])


# -- caffe.io: protos -----------------------------------------------------------------------
def test_blobproto_round_trips():
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    diff = -arr
    blob = caffe.io.array_to_blobproto(arr, diff)
    assert list(blob.shape.dim) == [2, 3, 4]
    np.testing.assert_allclose(caffe.io.blobproto_to_array(blob), arr, rtol=1e-7)
    np.testing.assert_allclose(caffe.io.blobproto_to_array(blob, return_diff=True), diff,
                               rtol=1e-7)
    legacy = caffe_pb2.BlobProto(num=1, channels=2, height=3, width=4)
    legacy.data.extend(range(24))
    assert caffe.io.blobproto_to_array(legacy).shape == (1, 2, 3, 4)
    flat = caffe_pb2.BlobProto()
    flat.data.extend([1.0, 2.0])
    with pytest.raises(ValueError):
        caffe.io.blobproto_to_array(flat)
    scalar = caffe_pb2.BlobProto()
    scalar.data.append(123.0)
    assert caffe.io.blobproto_to_array(scalar) == 123
    arrays = [arr, np.ones((5,)), np.zeros((1, 1))]
    text = caffe.io.arraylist_to_blobprotovector_str(arrays)
    assert isinstance(text, bytes)
    back = caffe.io.blobprotovector_str_to_arraylist(text)
    assert [b.shape for b in back] == [a.shape for a in arrays]
    np.testing.assert_allclose(back[0], arr, rtol=1e-7)


def test_datum_round_trips():
    u8 = np.random.default_rng(3).integers(0, 256, (3, 4, 5)).astype(np.uint8)
    datum = caffe.io.array_to_datum(u8, label=4)
    assert datum.data == u8.tobytes() and len(datum.float_data) == 0
    assert (datum.channels, datum.height, datum.width, datum.label) == (3, 4, 5, 4)
    back = caffe.io.datum_to_array(datum)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, u8)
    floats = np.linspace(-1, 1, 60).reshape(3, 4, 5)
    fdatum = caffe.io.array_to_datum(floats)
    assert not fdatum.HasField("label") and not fdatum.data
    np.testing.assert_allclose(caffe.io.datum_to_array(fdatum), floats, rtol=1e-7)
    assert len(caffe.io.array_to_datum(floats, 1).SerializeToString()) > \
        len(fdatum.SerializeToString())
    with pytest.raises(ValueError):
        caffe.io.array_to_datum(np.zeros((2, 2)))


# -- coord_map --------------------------------------------------------------------------
def _conv_pool_deconv(ks=3, stride=1, pad=0, pool=2, dstride=2, dpad=0):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 1, 100, 100]))
    n.aux = L.Input(shape=dict(dim=[2, 1, 20, 20]))
    n.conv = L.Convolution(n.data, num_output=10, kernel_size=ks, stride=stride, pad=pad)
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=pool, stride=pool, pad=0)
    dks = [2 * s for s in dstride] if isinstance(dstride, list) else 2 * dstride
    n.deconv = L.Deconvolution(n.pool, num_output=10, kernel_size=dks, stride=dstride,
                               pad=dpad)
    return n


def test_coord_map_through_conv_pool_deconv():
    n = _conv_pool_deconv()
    assert coord_map_from_to(n.deconv, n.data) == (1, 1, 0)   # 3x3 conv, 2x pool, 2x deconv
    n = _conv_pool_deconv(pool=4, dstride=4)
    assert coord_map_from_to(n.deconv, n.data) == (1, 1, -1)
    for pad in (0, 3, 7):                           # conv pad shifts -, deconv pad +
        n = _conv_pool_deconv(pad=pad)
        assert coord_map_from_to(n.deconv, n.data)[2] == -pad
        n = _conv_pool_deconv(dpad=pad)
        assert coord_map_from_to(n.deconv, n.data)[2] == pad
        n = _conv_pool_deconv(pad=pad, dpad=pad)
        assert coord_map_from_to(n.deconv, n.data)[2] == 0
    n = _conv_pool_deconv()
    n.relu = L.ReLU(n.deconv)
    n.one = L.Convolution(n.relu, num_output=10, kernel_size=1)
    assert coord_map_from_to(n.relu, n.data) == coord_map_from_to(n.one, n.data) == (1, 1, 0)


def test_coord_map_rect_nd_and_multi_bottom():
    n3 = _conv_pool_deconv(ks=3, stride=1, pad=0)
    n5 = _conv_pool_deconv(ks=5, stride=2, pad=10)
    n35 = _conv_pool_deconv(ks=[3, 5], stride=[1, 2], pad=[0, 10])
    _, a3, b3 = coord_map_from_to(n3.deconv, n3.data)
    _, a5, b5 = coord_map_from_to(n5.deconv, n5.data)
    _, a35, b35 = coord_map_from_to(n35.deconv, n35.data)
    assert (a35[0], b35[0], a35[1], b35[1]) == (a3, b3, a5, b5)
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3, 100, 100, 100]))
    n.conv = L.Convolution(n.data, num_output=10, kernel_size=[3, 3, 3], stride=[1, 1, 1],
                           pad=[0, 1, 2])
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.deconv = L.Deconvolution(n.pool, num_output=10, kernel_size=4, stride=2)
    ax, a, b = coord_map_from_to(n.deconv, n.data)
    assert ax == 1 and np.all(a == 1) and list(b) == [0, -1, -2]
    n = _conv_pool_deconv()
    n.cd, n.ca = L.Convolution(n.data, n.aux, ntop=2, num_output=10, kernel_size=5, stride=2)
    for ax, a, b in (coord_map_from_to(n.cd, n.data), coord_map_from_to(n.ca, n.aux)):
        assert (ax, list(a), list(b)) == (1, [2.0], [2.0])   # stride 2, (5 - 1) / 2 px


def test_crop_helper_and_its_checks():
    n = _conv_pool_deconv(pad=0, pool=4, dstride=4)   # deconv is 1 px off the data
    n.score = crop(n.deconv, n.data)
    layer = n.to_proto().layer[-1]
    assert layer.type == "Crop" and list(layer.bottom) == ["deconv", "data"]
    assert layer.crop_param.axis == 2 and list(layer.crop_param.offset) == [1]
    offset = 4
    n.crop2 = L.Crop(n.deconv, n.data, axis=2, offset=offset)
    assert coord_map_from_to(n.crop2, n.data)[2] == -1 + offset
    with pytest.raises(RuntimeError):
        n.ip = L.InnerProduct(n.deconv, num_output=10)
        coord_map_from_to(n.ip, n.data)
    scale_mismatch = _conv_pool_deconv(pool=3, dstride=2)
    with pytest.raises(AssertionError, match="scale mismatch"):
        crop(scale_mismatch.deconv, scale_mismatch.data)
    smaller = _conv_pool_deconv(dpad=10)        # output smaller than the input
    with pytest.raises(AssertionError, match="negative offset"):
        crop(smaller.deconv, smaller.data)


def test_coord_map_functions():
    n = _conv_pool_deconv(ks=3, stride=2, pad=1)
    axis, stride, ks, pad = conv_params(n.conv.fn)
    assert axis == 1 and list(stride) == [2] and list(ks) == [3] and list(pad) == [1]
    dil = L.Convolution(n.data, num_output=1, kernel_size=3, dilation=2)
    assert list(conv_params(dil.fn)[2]) == [5]          # (3 - 1) * 2 + 1
    c = L.Crop(n.deconv, n.data, crop_param=dict(axis=1, offset=[2, 3]))
    assert crop_params(c.fn)[0] == 1 and list(crop_params(c.fn)[1]) == [2, 3]
    assert coord_map(L.ReLU(n.data).fn) == (None, 1, 0)
    with pytest.raises(UndefinedMapException):
        coord_map(L.InnerProduct(n.data, num_output=2).fn)
    assert compose((None, 1, 0), (2, 0.5, 3)) == (2, 0.5, 3)
    assert compose((2, 2, 1), (2, 0.5, 3)) == (2, 1.0, 7)
    with pytest.raises(AxisMismatchException):
        compose((1, 1, 0), (2, 1, 0))
    assert inverse((1, 2.0, 4.0)) == (1, 0.5, -2.0)


# -- net_spec ---------------------------------------------------------------------------
LENET_TEXT = '''layer {
  name: "data"
  type: "DummyData"
  top: "data"
  top: "label"
  transform_param {
    scale: 0.5
  }
  dummy_data_param {
    shape {
      dim: 4
      dim: 1
      dim: 8
      dim: 8
    }
    shape {
      dim: 4
      dim: 1
      dim: 1
      dim: 1
    }
  }
}
layer {
  name: "conv1"
  type: "Convolution"
  bottom: "data"
  top: "conv1"
  param {
    lr_mult: 1
  }
  param {
    lr_mult: 2
    decay_mult: 0
  }
  convolution_param {
    num_output: 3
    kernel_size: 3
    weight_filler {
      type: "xavier"
    }
  }
}
layer {
  name: "pool1"
  type: "Pooling"
  bottom: "conv1"
  top: "pool1"
  pooling_param {
    pool: MAX
    kernel_size: 2
    stride: 2
  }
}
layer {
  name: "relu1"
  type: "ReLU"
  bottom: "pool1"
  top: "pool1"
}
layer {
  name: "ip"
  type: "InnerProduct"
  bottom: "pool1"
  top: "ip"
  inner_product_param {
    num_output: 10
  }
}
layer {
  name: "loss"
  type: "SoftmaxWithLoss"
  bottom: "ip"
  bottom: "label"
  top: "loss"
}
'''


def _small_lenet(named: bool):
    kw = dict(shape=[dict(dim=[4, 1, 8, 8]), dict(dim=[4, 1, 1, 1])],
              transform_param=dict(scale=0.5), ntop=2)
    conv_kw = dict(kernel_size=3, num_output=3, weight_filler=dict(type="xavier"),
                   param=[dict(lr_mult=1), dict(lr_mult=2, decay_mult=0)])
    if named:
        n = caffe.NetSpec()
        n.data, n.label = L.DummyData(**kw)
        n.conv1 = L.Convolution(n.data, **conv_kw)
        n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
        n.relu1 = L.ReLU(n.pool1, in_place=True)
        n.ip = L.InnerProduct(n.relu1, num_output=10)
        n.loss = L.SoftmaxWithLoss(n.ip, n.label)
        return n.to_proto()
    data, label = L.DummyData(**kw)
    relu = L.ReLU(L.Pooling(L.Convolution(data, **conv_kw), kernel_size=2, stride=2,
                            pool=P.Pooling.MAX), in_place=True)
    return L.SoftmaxWithLoss(L.InnerProduct(relu, num_output=10), label).to_proto()


def test_net_spec_writes_pycaffes_prototxt(tmp_path):
    assert str(_small_lenet(True)) == LENET_TEXT
    anon = _small_lenet(False)
    assert [l.name for l in anon.layer] == ["DummyData1", "Convolution1", "Pooling1",
                                            "ReLU1", "InnerProduct1", "SoftmaxWithLoss1"]
    assert list(anon.layer[3].bottom) == list(anon.layer[3].top) == ["Pooling1"]
    assert list(anon.layer[0].top) == ["DummyData1", "DummyData2"]
    path = tmp_path / "lenet.prototxt"
    path.write_text(str(_small_lenet(True)))
    net = caffe.Net(str(path), caffe.TEST)
    assert len(net.layers) == 6 and net.blobs["ip"].data.shape == (4, 10)


def test_net_spec_details():
    data, data2 = L.DummyData(shape=dict(dim=3), ntop=2)
    with pytest.raises(TypeError, match=r"^Silence input 0 is not a Top \(type is <class "
                                        r"'tuple'>\)$"):
        L.Silence((data, data2), ntop=0)
    n = caffe.NetSpec()
    n.data, n.data2 = data, data2
    n.silence = L.Silence(n.data, n.data2, ntop=0)
    proto = n.to_proto()
    assert proto.layer[1].name == "silence" and not proto.layer[1].top
    conv = L.Convolution(data, kernel_size=3, num_output=2, in_place=False,
                         param=[dict(lr_mult=0)])
    assert conv.fn.params == dict(kernel_size=3, num_output=2, param=[dict(lr_mult=0)])
    assert P.Pooling.MAX == caffe_pb2.PoolingParameter.MAX
    assert P.Eltwise.SUM == caffe_pb2.EltwiseParameter.SUM
    assert caffe.net_spec.param_name_dict()["Pooling"] == "pooling"
    msg = caffe_pb2.LayerParameter()
    caffe.net_spec.assign_proto(msg, "bottom", "x")
    caffe.net_spec.assign_proto(msg, "include", dict(phase=caffe.TEST))
    assert list(msg.bottom) == ["x"] and msg.include[0].phase == caffe.TEST


# -- draw -------------------------------------------------------------------------------
def test_draw(tmp_path):
    net = _small_lenet(True)
    conv, pool, relu = net.layer[1], net.layer[2], net.layer[3]
    assert caffe.draw.get_layer_label(conv, "LR") == \
        r'"conv1\n(Convolution)\nkernel size: 3\nstride: 1\npad: 0"'
    assert caffe.draw.get_layer_label(pool, "TB") == \
        '"pool1 (Pooling MAX) kernel size: 2 stride: 2 pad: 0"'
    assert caffe.draw.get_layer_label(conv, "LR", display_lrm=True).endswith(
        r'\nlr mult: 1.0, 2.0"')
    assert caffe.draw.get_edge_label(conv) == "3"
    assert caffe.draw.get_edge_label(relu) == '""'
    assert caffe.draw.get_layer_lr_mult(conv) == (1.0, 2.0)
    with pytest.raises(ValueError):
        caffe.draw.get_layer_lr_mult(pool)
    assert caffe.draw.choose_color_by_layertype("Pooling") == "#FF9900"
    assert caffe.draw.choose_color_by_layertype("Softmax") == "#6495ED"
    assert caffe.draw.get_pooling_types_dict()[0] == "MAX"
    raw = tmp_path / "net.raw"
    caffe.draw.draw_net_to_file(net, str(raw), "TB", phase=caffe.TEST)
    text = raw.read_text()
    assert text.startswith("digraph") and "conv1" in text and "rankdir=TB" in text
    try:
        import pydot
    except ImportError:
        with pytest.raises(ProtonetError, match="pydot"):
            caffe.draw.get_pydot_graph(net, "LR")
    else:
        graph = caffe.draw.get_pydot_graph(net, "LR")
        assert isinstance(graph, pydot.Dot) and graph.get_rankdir() == "LR"
        # 6 layers and 6 blobs (data, label, conv1, pool1, ip, loss); 13 bottom and top edges
        assert len(graph.get_nodes()) == 12 and len(graph.get_edges()) == 13
    import shutil
    if shutil.which("dot") is None:
        pytest.skip("Graphviz's dot is not installed")
    png = tmp_path / "net.png"
    caffe.draw.draw_net_to_file(net, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert caffe.draw.draw_net(net, "LR", ext="svg").lstrip().startswith(b"<")


# -- Classifier and Detector ------------------------------------------------------------
@pytest.fixture
def weights(tmp_path, net_file):
    caffe.set_random_seed(3)
    path = str(tmp_path / "small.caffemodel")
    caffe.Net(net_file, caffe.TEST).save(path)
    return path


def _probs(net_file, weights, batch):
    """The net's prob output for a (N, 3, 6, 6) batch, two at a time as forward does."""
    net = caffe.Net(net_file, weights, caffe.TEST)
    out = []
    for i in range(0, len(batch), 2):
        chunk = batch[i:i + 2]
        net.blobs["data"].reshape(*chunk.shape)
        net.reshape()
        out.append(net.forward(data=chunk)["prob"].copy())
    return np.concatenate(out)


def _manual_input(crop, mean):
    """pycaffe's preprocessing by hand: HWC -> CHW, RGB -> BGR, * 2, - mean."""
    return crop.transpose(2, 0, 1)[::-1] * 2.0 - mean[:, None, None]


def test_classifier_predict_center_and_oversampled(net_file, weights):
    rng = np.random.default_rng(5)
    images = [rng.random((10, 12, 3)).astype(np.float32) for _ in range(3)]
    mean = np.array([0.1, 0.2, 0.3], np.float32)
    clf = caffe.Classifier(net_file, weights, image_dims=(8, 8), mean=mean, raw_scale=2.0,
                           channel_swap=(2, 1, 0))
    assert isinstance(clf, caffe.Net) and list(clf.crop_dims) == [6, 6]
    resized = [caffe.io.resize_image(im, (8, 8)) for im in images]
    center = np.stack([_manual_input(r[1:7, 1:7], mean) for r in resized]).astype(np.float32)
    got = clf.predict(images, oversample=False)
    assert got.shape == (3, 5)
    np.testing.assert_allclose(got, _probs(net_file, weights, center), rtol=1e-5, atol=1e-6)
    crops = []
    for r in resized:
        views = [r[:6, :6], r[:6, 2:], r[2:, :6], r[2:, 2:], r[1:7, 1:7]]
        crops += [_manual_input(v, mean) for v in views]
        crops += [_manual_input(v[:, ::-1], mean) for v in views]
    expected = _probs(net_file, weights, np.stack(crops).astype(np.float32))
    np.testing.assert_allclose(clf.predict(images), expected.reshape(3, 10, 5).mean(1),
                               rtol=1e-5, atol=1e-6)


def test_detector_windows_context_and_selective_search(tmp_path, net_file, weights):
    rng = np.random.default_rng(6)
    rgb = (rng.random((20, 24, 3)) * 255).astype(np.uint8)
    path = str(tmp_path / "im.png")
    cv2.imwrite(path, rgb[:, :, ::-1])
    mean = np.array([0.1, 0.2, 0.3], np.float32)
    det = caffe.Detector(net_file, weights, mean=mean, raw_scale=2.0, channel_swap=(2, 1, 0))
    windows = [np.array([0, 0, 10, 12]), np.array([5, 6, 20, 24]), np.array([2, 3, 8, 9])]
    found = det.detect_windows([(path, windows)])
    assert [d["filename"] for d in found] == [path] * 3
    image = rgb.astype(np.float32) / 255.0
    batch = np.stack([_manual_input(caffe.io.resize_image(image[w[0]:w[2], w[1]:w[3]],
                                                          (6, 6)), mean) for w in windows])
    expected = _probs(net_file, weights, batch.astype(np.float32))
    for d, w, e in zip(found, windows, expected):
        assert d["window"] is w
        np.testing.assert_allclose(d["prediction"], e, rtol=1e-5, atol=1e-6)
    padded = caffe.Detector(net_file, weights, mean=mean, raw_scale=2.0,
                            channel_swap=(2, 1, 0), context_pad=1)
    assert list(padded.crop_dims) == [6, 6, 3]
    np.testing.assert_allclose(padded.crop_mean.reshape(3), mean[::-1] / 2.0)
    crop = padded.crop(image, np.array([0, 0, 10, 10]))   # context above/left: mean fill
    assert crop.shape == (6, 6, 3)
    np.testing.assert_allclose(crop[0, 0], mean[::-1] / 2.0, rtol=1e-6)
    assert len(padded.detect_windows([(path, [np.array([0, 0, 10, 10])])])) == 1
    with pytest.raises(ProtonetError, match="external proposal source"):
        det.detect_selective_search([path])
