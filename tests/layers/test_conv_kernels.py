"""The CPU convolution kernels chosen by shape (protonet.layers.conv_kernels) give
F.conv2d's values and gradients, and each shape takes the kernel it should."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from protonet.layers import conv_kernels
from protonet.net.module import NetModule
from protonet.io.text import parse_text
from protonet.proto import caffe_pb2
from protonet.speed import to_channels_last

CL = torch.channels_last


def _case(n, cin, cout, size, k, dtype=torch.float64, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, size, size, generator=gen, dtype=dtype)
    w = torch.randn(cout, cin, k, k, generator=gen, dtype=dtype)
    b = torch.randn(cout, generator=gen, dtype=dtype) if bias else None
    return to_channels_last(x).requires_grad_(), w.requires_grad_(), \
        (b.requires_grad_() if bias else None)


def _grads(y, inputs, seed=1):
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
    return torch.autograd.grad(y, [t for t in inputs if t is not None], dy)


# (batch, in, out, size, kernel, stride, pad, bias, kernel expected)
CASES = [
    (1, 8, 16, 7, 1, 1, 0, True, "pointwise"),
    (3, 8, 4, 9, 1, 2, 0, False, "pointwise"),
    (2, 6, 5, 6, 1, 3, 0, True, "pointwise"),
    (1, 16, 8, 7, 3, 1, 1, True, "im2col"),      # 49 output positions
    (2, 16, 8, 5, 3, 2, 1, False, "im2col"),     # 18
    (1, 5, 7, 6, 2, 1, 0, True, "im2col"),
    (1, 8, 6, 12, 3, 1, 1, True, "gemm"),        # 144
    (2, 6, 4, 11, 3, 1, 0, False, "gemm"),       # 162
    (4, 3, 4, 12, 5, 1, 2, True, "onednn"),      # 576: over both limits
]


@pytest.mark.parametrize("n,cin,cout,size,k,stride,pad,bias,kernel", CASES)
def test_values_and_gradients_match_conv2d(n, cin, cout, size, k, stride, pad, bias, kernel):
    x, w, b = _case(n, cin, cout, size, k, bias=bias)
    args = ((stride, stride), (pad, pad), (1, 1), 1)
    y = conv_kernels.conv2d(x, w, b, *args)
    expected = F.conv2d(x, w, b, *args[:3])
    assert y.shape == expected.shape and y.is_contiguous(memory_format=CL)
    assert torch.allclose(y, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(_grads(y, (x, w, b)), _grads(expected, (x, w, b))):
        assert torch.allclose(got, want, rtol=1e-11, atol=1e-11)
    name = type(y.grad_fn).__name__
    chosen = "gemm" if "GemmWeightGrad" in name else "onednn" if "Convolution" in name \
        else "pointwise" if _has_linear_without_unfold(y.grad_fn) else "im2col"
    assert chosen == kernel, name


def _has_linear_without_unfold(fn) -> bool:
    """The autograd graph below fn has no im2col (Im2ColBackward)."""
    seen, stack = set(), [fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "Im2Col" in type(node).__name__:
            return False
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return True


def test_gemm_weight_gradient_only_when_the_weight_needs_one():
    x, w, b = _case(1, 8, 6, 12, 3)
    with torch.no_grad():
        y = conv_kernels.conv2d(x, w, b, (1, 1), (1, 1), (1, 1), 1)
    assert torch.allclose(y, F.conv2d(x, w, b, 1, 1))
    frozen = w.detach()
    y = conv_kernels.conv2d(x, frozen, b, (1, 1), (1, 1), (1, 1), 1)
    assert type(y.grad_fn).__name__ == "ConvolutionBackward0"


@pytest.mark.parametrize("groups,dilation,layout", [(2, 1, CL), (1, 2, CL),
                                                    (1, 1, torch.contiguous_format)])
def test_other_convolutions_are_torch_s(groups, dilation, layout):
    x = torch.randn(1, 8, 7, 7).contiguous(memory_format=layout)
    w = torch.randn(4, 8 // groups, 1, 1, requires_grad=True)
    y = conv_kernels.conv2d(x, w, None, (1, 1), (0, 0), (dilation, dilation), groups)
    assert type(y.grad_fn).__name__ == "ConvolutionBackward0"
    assert torch.allclose(y, F.conv2d(x, w, None, 1, 0, dilation, groups), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k,pad,size", [(1, 0, 7), (3, 1, 7), (3, 1, 12)])
def test_autocast_runs_in_low_precision_and_returns_float32_gradients(k, pad, size, dtype):
    x, w, b = _case(1, 32, 16, size, k, dtype=torch.float32)
    with torch.autocast("cpu", dtype=dtype):
        y = conv_kernels.conv2d(x, w, b, (1, 1), (pad, pad), (1, 1), 1)
        expected = F.conv2d(x, w, b, 1, pad)
    assert y.dtype == dtype == expected.dtype
    scale = expected.float().abs().max()
    assert (y.float() - expected.float()).abs().max() < 2e-2 * scale
    got, want = _grads(y, (x, w, b)), _grads(expected, (x, w, b))
    for g, e in zip(got, want):
        assert g.dtype == torch.float32
        assert (g - e).abs().max() < 3e-2 * e.abs().max()


def test_one_channel_input_gives_channels_last_tops():
    """A 1-channel NCHW tensor is NHWC too; to_channels_last makes that unambiguous so
    the convolution's top (LeNet's conv1) and the layers after it stay NHWC."""
    x = torch.rand(4, 1, 12, 12)
    restrided = to_channels_last(x)
    assert restrided.data_ptr() == x.data_ptr() and torch.equal(restrided, x)
    y = conv_kernels.conv2d(restrided, torch.rand(6, 1, 3, 3), None, (1, 1), (0, 0), (1, 1), 1)
    assert y.is_contiguous(memory_format=CL) and not y.is_contiguous()


LENET_LIKE = """
force_backward: true
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 3 dim: 1 dim: 14 dim: 14 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 6 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
        convolution_param { num_output: 8 kernel_size: 1 weight_filler { type: "xavier" } } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "conv3" type: "Convolution" bottom: "conv2" top: "conv3"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
layer { name: "ip" type: "InnerProduct" bottom: "conv3" top: "ip"
        inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
"""


def test_channels_last_module_matches_nchw_blobs_and_gradients():
    torch.manual_seed(0)
    net = NetModule(parse_text(LENET_LIKE, caffe_pb2.NetParameter()), phase=caffe_pb2.TRAIN)
    data = torch.rand(3, 1, 14, 14)

    def run():
        values, _ = net({"data": data})
        values[net.blob_index["ip"]].square().sum().backward()
        grads = [p.grad.clone() for p in net.parameters()]
        net.zero_grad(set_to_none=True)
        return values, grads

    values, grads = run()
    net.use_channels_last()
    nhwc, nhwc_grads = run()
    for name in ("conv1", "pool1", "conv2", "conv3"):
        blob = nhwc[net.blob_index[name]]
        assert blob.is_contiguous(memory_format=CL), name
        assert torch.allclose(blob, values[net.blob_index[name]], rtol=1e-5, atol=1e-6)
    assert torch.allclose(nhwc[net.blob_index["ip"]], values[net.blob_index["ip"]],
                          rtol=1e-5, atol=1e-6)
    for got, want in zip(nhwc_grads, grads):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("k,stride,pad,size", [(1, 2, 0, 8), (3, 1, 1, 7), (3, 2, 1, 9)])
def test_bottom_gradient_stays_channels_last(k, stride, pad, size):
    """A strided 1x1 and an im2col convolution hand back an NHWC bottom gradient, as
    oneDNN's do: one NCHW gradient makes every element-wise backward below it mix
    layouts (several times slower)."""
    x, w, b = _case(1, 8, 6, size, k, dtype=torch.float32)
    y = conv_kernels.conv2d(x, w, b, (stride, stride), (pad, pad), (1, 1), 1)
    grad_x, = torch.autograd.grad(y, x, torch.ones_like(y))
    assert grad_x.is_contiguous(memory_format=CL) and not grad_x.is_contiguous()
    expected, = torch.autograd.grad(F.conv2d(x, w, b, stride, pad), x, torch.ones_like(y))
    torch.testing.assert_close(grad_x, expected)


@pytest.mark.parametrize("rows,kernel", [(1, "mkl"), (2, "onednn"), (10, "onednn")])
def test_linear_bottom_gradient_kernel_and_values(rows, kernel):
    """InnerProduct's and a 1x1 or im2col convolution's bottom gradient, grad @ weight:
    a single row is MKL's product, several are oneDNN's (MKL's takes a few rows about
    as long as that many matrix-vector products); both equal the float64 product to
    float32 rounding, and the weight and bias gradients are unchanged."""
    from protonet.layers import inner_product
    if not inner_product._ONEDNN_LINEAR:
        pytest.skip("this torch build has no oneDNN linear")
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 512, generator=gen).requires_grad_()
    w = torch.randn(256, 512, generator=gen).requires_grad_()
    b = torch.randn(256, generator=gen).requires_grad_()
    dy = torch.randn(rows, 256, generator=gen)
    grad_x, grad_w, grad_b = torch.autograd.grad(
        inner_product._OneDnnLinear.apply(x, w, b), [x, w, b], dy)
    exact = dy.double() @ w.detach().double()
    torch.testing.assert_close(grad_x.double(), exact, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad_w.double(), dy.double().t() @ x.detach().double(),
                               rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad_b, dy.sum(0))
    by = {"mkl": dy.mm(w.detach()),
          "onednn": torch.ops.mkldnn._linear_pointwise(dy, w.detach().t(), None, "none",
                                                       [], "")}
    assert torch.equal(grad_x, by[kernel])
