"""Fork layers (ROIPooling, PSROIPooling, ShuffleChannel, Axpy, ConvolutionDepthwise,
SmoothL1Loss): forward against OpenCV 4 golden fixtures (tests/data/forks, made by
tools/make_fork_fixtures.py), backward against finite differences and the forks'
own gradient rules."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import protonet
from protonet.io.weights import read_weights

from layer_helpers import make_layer, run

DATA = Path(__file__).resolve().parents[1] / "data" / "forks"
CASES = ["roi_pooling", "psroi_pooling", "shuffle_channel", "axpy", "conv_depthwise",
         "tiny_fp16"]


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_golden(case):
    fixture = dict(np.load(DATA / f"{case}.npz"))
    weights = DATA / f"{case}.caffemodel"
    args = (str(weights),) if weights.exists() else ()
    net = protonet.Net(str(DATA / f"{case}.prototxt"), *args, protonet.TEST)
    net.forward(**{k: v for k, v in fixture.items() if not k.startswith("top:")})
    tops = [k for k in fixture if k.startswith("top:")]
    assert tops
    for key in tops:
        np.testing.assert_allclose(net.blobs[key[4:]].data, fixture[key],
                                   rtol=1e-4, atol=1e-5, err_msg=f"{case} {key}")


def test_fp16_caffemodel_loads_widened_to_float32():
    """cv2.dnn.shrinkCaffeModel stored Convolution/InnerProduct weights as fp16
    raw_data; they load as the fp16 rounding of the fp32 originals, the rest as is."""
    fp16, fp32 = read_weights(str(DATA / "tiny_fp16.caffemodel")), \
        read_weights(str(DATA / "tiny_fp32.caffemodel"))
    raw = [b for layer in fp16.layer for b in layer.blobs if b.raw_data]
    assert raw and all(b.raw_data_type == protonet.caffe_pb2.FLOAT16 for b in raw)
    original = {l.name: [np.array(b.data, np.float32) for b in l.blobs] for l in fp32.layer}
    net = protonet.Net(str(DATA / "tiny_fp16.prototxt"),
                       str(DATA / "tiny_fp16.caffemodel"), protonet.TEST)
    for name, blobs in net.params.items():
        for j, blob in enumerate(blobs):
            want = original[name][j]
            if name in ("conv", "fc"):
                want = want.astype(np.float16).astype(np.float32)
            np.testing.assert_array_equal(blob.data.ravel(), want)
    assert net.params["conv"][0].data.dtype == np.float32


def test_double_data_blob_loads():
    blob = protonet.caffe_pb2.BlobProto()
    blob.shape.dim.extend([2, 2])
    blob.double_data.extend([0.1, 1e-40, -3.0, 2.5])
    from protonet.io.weights import blob_to_array
    got = blob_to_array(blob)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.float32([[0.1, 1e-40], [-3.0, 2.5]]))


@pytest.mark.parametrize("kind, payload, match", [
    (None, np.float16([1, 2]).tobytes(), "no raw_data_type"),
    ("INT", np.int32([1, 2]).tobytes(), "INT is not a float type"),
    ("FLOAT16", b"\x00\x3c\x00", "3 bytes"),
    ("FLOAT16", np.float16([1, 2, 3]).tobytes(), "holds 3 values but its shape"),
])
def test_bad_raw_data_is_a_clear_error(kind, payload, match):
    from protonet.io.weights import blob_to_array
    blob = protonet.caffe_pb2.BlobProto(raw_data=payload)
    blob.shape.dim.extend([2])
    if kind:
        blob.raw_data_type = getattr(protonet.caffe_pb2, kind)
    with pytest.raises(protonet.ProtonetError, match=match):
        blob_to_array(blob, where="w.caffemodel: layer 'c' param 0")


def test_raw_data_float32_and_double():
    from protonet.io.weights import blob_to_array
    for kind, dtype in (("FLOAT", "<f4"), ("DOUBLE", "<f8")):
        blob = protonet.caffe_pb2.BlobProto(
            raw_data=np.array([1.5, -2.25], dtype).tobytes(),
            raw_data_type=getattr(protonet.caffe_pb2, kind))
        blob.shape.dim.extend([2])
        np.testing.assert_array_equal(blob_to_array(blob), np.float32([1.5, -2.25]))


# -- backward ------------------------------------------------------------------------

ROI = 'type: "ROIPooling" roi_pooling_param { pooled_h: 2 pooled_w: 3 spatial_scale: 0.5 }'
PSROI = ('type: "PSROIPooling" psroi_pooling_param { spatial_scale: 0.5 output_dim: 2 '
         'group_size: 2 }')
BOXES = torch.tensor([[0, 1.0, 2.0, 13.0, 9.0], [1, 0.0, 0.0, 5.0, 3.0],
                      [0, 9.0, 3.0, 21.0, 19.0], [1, 30.0, 30.0, 40.0, 40.0]])


def _gradcheck(layer, *inputs):
    assert torch.autograd.gradcheck(lambda *x: layer(*x), inputs, eps=1e-6, atol=1e-5,
                                    fast_mode=True)


def test_roi_pooling_backward_finite_differences():
    layer = make_layer(ROI, (2, 2, 8, 11), (4, 5))
    # Distinct values: the max of each bin is unique, so finite differences apply.
    data = torch.randperm(2 * 2 * 8 * 11).double().reshape(2, 2, 8, 11) / 10
    data.requires_grad_(True)
    _gradcheck(lambda d: layer(d, BOXES.double()), data)


def test_roi_pooling_backward_ties_go_to_the_first_cell_row_major():
    """The fork keeps the first strictly larger value scanning h then w; all of a
    bin's gradient goes to that one cell (not split among ties)."""
    layer = make_layer('type: "ROIPooling" roi_pooling_param { pooled_h: 1 pooled_w: 1 }',
                       (1, 1, 3, 3), (1, 5))
    data = torch.zeros(1, 1, 3, 3, requires_grad=True)
    top = layer(data, torch.tensor([[0.0, 0, 0, 2, 2]]))
    top.sum().backward()
    want = torch.zeros(1, 1, 3, 3)
    want[0, 0, 0, 0] = 1
    assert torch.equal(data.grad, want)
    data2 = torch.tensor([[[[0.0, 5, 1], [5, 2, 5], [0, 0, 5]]]], requires_grad=True)
    layer(data2, torch.tensor([[0.0, 0, 0, 2, 2]])).sum().backward()
    want = torch.zeros(1, 1, 3, 3)
    want[0, 0, 0, 1] = 1
    assert torch.equal(data2.grad, want)


def test_roi_pooling_adaptive_path_equals_the_gather_path():
    """Both ways of pooling a box give the fork's bins, values and gradient."""
    torch.manual_seed(0)
    n = 40
    corners = torch.rand(n, 4) * 60 - 10
    rois = torch.cat([torch.randint(0, 2, (n, 1)).float(),
                      torch.minimum(corners[:, :2], corners[:, 2:]),
                      torch.maximum(corners[:, :2], corners[:, 2:])], 1)
    rois[:5, 1:] = torch.round(rois[:5, 1:])            # whole and half cells after * 0.5
    data = torch.relu(torch.randn(2, 3, 13, 17))        # ties at 0
    grads = []
    for adaptive in (True, False):
        layer = make_layer('type: "ROIPooling" roi_pooling_param { pooled_h: 3 pooled_w: 5 '
                           'spatial_scale: 0.5 }', (2, 3, 13, 17), (n, 5))
        layer.use_adaptive = adaptive
        x = data.clone().requires_grad_(True)
        top = layer(x, rois)
        (top * torch.arange(top.numel()).view(top.shape)).sum().backward()
        grads.append((top.detach(), x.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.equal(grads[0][1], grads[1][1])


def test_roi_pooling_empty_bin_is_zero_without_gradient():
    layer = make_layer(ROI, (2, 3, 8, 11), (4, 5))
    data = torch.randn(2, 3, 8, 11, requires_grad=True)
    top = layer(data, BOXES)
    assert torch.equal(top[3], torch.zeros_like(top[3]))     # box past the map
    top.sum().backward()
    assert data.grad is not None


def test_psroi_pooling_backward_finite_differences():
    layer = make_layer(PSROI, (2, 8, 8, 11), (4, 5))
    data = torch.randn(2, 8, 8, 11, dtype=torch.float64, requires_grad=True)
    _gradcheck(lambda d: layer(d, BOXES.double()), data)


def test_psroi_pooling_backward_spreads_evenly_over_the_bin():
    layer = make_layer('type: "PSROIPooling" psroi_pooling_param { spatial_scale: 1 '
                       'output_dim: 1 group_size: 1 }', (1, 1, 4, 4), (1, 5))
    data = torch.randn(1, 1, 4, 4, requires_grad=True)
    top = layer(data, torch.tensor([[0.0, 1, 1, 2, 3]]))     # cells x 1..2, y 1..3
    assert top.item() == pytest.approx(data[0, 0, 1:4, 1:3].mean().item(), rel=1e-6)
    top.sum().backward()
    want = torch.zeros(1, 1, 4, 4)
    want[0, 0, 1:4, 1:3] = 1 / 6
    torch.testing.assert_close(data.grad, want)


def test_shuffle_channel_axpy_depthwise_backward_finite_differences():
    shuffle = make_layer('type: "ShuffleChannel" shuffle_channel_param { group: 3 }',
                         (1, 6, 1, 2))
    _gradcheck(shuffle, torch.randn(1, 6, 1, 2, dtype=torch.float64, requires_grad=True))
    axpy = make_layer('type: "Axpy"', (2, 2, 1, 1), (2, 2, 2, 2), (2, 2, 2, 2))
    _gradcheck(axpy, *(torch.randn(s, dtype=torch.float64, requires_grad=True)
                       for s in ((2, 2, 1, 1), (2, 2, 2, 2), (2, 2, 2, 2))))
    dw = make_layer('type: "ConvolutionDepthwise" convolution_param { num_output: 3 '
                    'kernel_size: 3 stride: 2 pad: 1 weight_filler { type: "gaussian" } '
                    'bias_filler { type: "gaussian" } }', (2, 3, 5, 6)).double()
    _gradcheck(dw, torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True))
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    dw(x).sum().backward()
    # The fork's weight gradient: sum over n, output cells of dtop * input cell.
    cols = torch.nn.functional.unfold(x, 3, padding=1, stride=2).view(2, 3, 9, -1)
    torch.testing.assert_close(dw.blobs[0].grad.view(3, 9), cols.sum((0, 3)))
    torch.testing.assert_close(dw.blobs[1].grad, torch.full((3,), 2.0 * 9,
                                                           dtype=torch.float64))


def test_shuffle_channel_permutation():
    x = torch.arange(6.0).view(1, 6, 1, 1)
    top = make_layer('type: "ShuffleChannel" shuffle_channel_param { group: 2 }',
                     (1, 6, 1, 1))(x)
    assert top.view(-1).tolist() == [0, 3, 1, 4, 2, 5]


def test_axpy_follows_senet_not_opencv():
    a = np.float32([[[[2.0]]]])
    x = np.float32([[[[3.0]]]])
    y = np.float32([[[[5.0]]]])
    net = run('layer { name: "L" type: "Axpy" bottom: "a" bottom: "x" bottom: "y" '
              'top: "out" }', a=a, x=x, y=y)
    assert net.blobs["out"].data.item() == 11.0    # a*X + Y; OpenCV 4 gives a*Y + X = 13


def test_axpy_shape_errors():
    from layer_helpers import expect_error
    layer = 'layer { name: "L" type: "Axpy" bottom: "a" bottom: "x" bottom: "y" top: "o" }'
    expect_error(layer, {"a": (2, 3, 2, 1), "x": (2, 3, 4, 4), "y": (2, 3, 4, 4)},
                 "scale bottom")
    expect_error(layer, {"a": (2, 3), "x": (2, 3, 4, 4), "y": (2, 3, 4, 5)}, "same shape")


def test_depthwise_ignores_num_output_like_the_fork():
    layer = make_layer('type: "ConvolutionDepthwise" convolution_param { num_output: 7 '
                       'kernel_size: 3 }', (1, 4, 5, 5))
    assert tuple(layer.blobs[0].shape) == (4, 1, 3, 3)
    assert layer.reshape([(1, 4, 5, 5)]) == [(1, 4, 3, 3)]


def _smooth_l1(d, sigma2):
    a = np.abs(d)
    return np.where(a < 1 / sigma2, 0.5 * d * d * sigma2, a - 0.5 / sigma2)


def test_smooth_l1_loss_forward_backward_as_the_fork():
    rng = np.random.default_rng(3)
    shape = (3, 8, 2, 2)
    pred, target = rng.standard_normal(shape), rng.standard_normal(shape)
    w_in, w_out = rng.uniform(0, 2, shape), rng.uniform(0, 2, shape)
    sigma = 3.0
    layer = make_layer(f'type: "SmoothL1Loss" smooth_l1_loss_param {{ sigma: {sigma} }}',
                       shape, shape, shape, shape)
    tensors = [torch.tensor(v, requires_grad=True) for v in (pred, target, w_in, w_out)]
    loss = layer(*tensors)
    d = w_in * (pred - target)
    want = (w_out * _smooth_l1(d, sigma * sigma)).sum() / shape[0]
    assert loss.item() == pytest.approx(want, rel=1e-12)
    loss.backward()
    # The fork's backward: f'(d) * w_in * w_out / N, negated for the targets.
    fprime = np.where(np.abs(d) < 1 / sigma ** 2, sigma ** 2 * d, np.sign(d))
    np.testing.assert_allclose(tensors[0].grad.numpy(), fprime * w_in * w_out / shape[0])
    np.testing.assert_allclose(tensors[1].grad.numpy(), -fprime * w_in * w_out / shape[0])
    assert tensors[2].grad is None and tensors[3].grad is None


def test_smooth_l1_loss_two_bottoms_and_three_is_an_error():
    net = run('layer { name: "L" type: "SmoothL1Loss" bottom: "a" bottom: "b" top: "l" }',
              a=np.float32([[0.5, 3.0]]), b=np.float32([[0.0, 0.0]]))
    assert net.blobs["l"].data.item() == pytest.approx(0.125 + 2.5)
    from layer_helpers import expect_error
    expect_error('layer { name: "L" type: "SmoothL1Loss" bottom: "a" bottom: "b" '
                 'bottom: "c" top: "l" }', {"a": (1, 2), "b": (1, 2), "c": (1, 2)},
                 "4")


def test_roi_errors_name_the_layer():
    from layer_helpers import expect_error
    expect_error('layer { name: "L" type: "ROIPooling" bottom: "d" bottom: "r" top: "t" '
                 'roi_pooling_param { pooled_h: 2 pooled_w: 2 } }',
                 {"d": (1, 2, 4, 4), "r": (3, 4)}, "rois bottom must be")
    expect_error('layer { name: "L" type: "PSROIPooling" bottom: "d" bottom: "r" top: "t" '
                 'psroi_pooling_param { spatial_scale: 1 output_dim: 2 } }',
                 {"d": (1, 8, 4, 4), "r": (3, 5)}, "group_size")
    expect_error('layer { name: "L" type: "PSROIPooling" bottom: "d" bottom: "r" top: "t" '
                 'psroi_pooling_param { spatial_scale: 1 output_dim: 2 group_size: 2 } }',
                 {"d": (1, 6, 4, 4), "r": (3, 5)}, "needs 8")


def test_box_with_a_bad_batch_index_is_an_error():
    net = protonet.Net(str(DATA / "roi_pooling.prototxt"), protonet.TEST)
    fixture = dict(np.load(DATA / "roi_pooling.npz"))
    rois = fixture["rois"].copy()
    rois[1, 0] = 5
    with pytest.raises(protonet.NetError, match="batch item 5"):
        net.forward(data=fixture["data"], rois=rois)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", CASES)
def test_forward_matches_golden_on_cuda(case):
    fixture = dict(np.load(DATA / f"{case}.npz"))
    weights = DATA / f"{case}.caffemodel"
    args = (str(weights),) if weights.exists() else ()
    net = protonet.Net(str(DATA / f"{case}.prototxt"), *args, protonet.TEST, device="cuda")
    net.forward(**{k: v for k, v in fixture.items() if not k.startswith("top:")})
    for key in (k for k in fixture if k.startswith("top:")):
        np.testing.assert_allclose(net.blobs[key[4:]].data, fixture[key],
                                   rtol=1e-4, atol=1e-5, err_msg=f"{case} {key}")
