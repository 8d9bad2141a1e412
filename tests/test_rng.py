"""protonet.rng: Caffe's mt19937 stream and Boost 1.74's distributions, bit for bit.

Known outputs are pinned (the mt19937 reference value, glibc's rand(), values and
hashes of what Boost 1.74 itself drew through tests/boost_random_oracle.cpp); where a
C++ compiler and Boost's headers are present, the oracle is built and compared on
200000 draws of each distribution, tails and redraws included.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import protonet
from protonet import rng
from protonet.data.transformer import DataTransformer
from protonet.proto import caffe_pb2

ORACLE = Path(__file__).with_name("boost_random_oracle.cpp")
F32 = np.float32


def bits(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).view(np.uint32)


def test_mt19937_reference_outputs():
    words = rng.CaffeRNG(5489).words(10000)
    assert words[0] == 3499211612
    assert words[9999] == 4123659995          # the C++ standard's check value


def test_seeding_is_init_genrand_for_every_32_bit_seed():
    for seed in (0, 1, 42, 5489, 2**31, 2**32 - 1):
        legacy = np.random.RandomState(seed).get_state()[1]    # numpy's init_genrand
        assert np.array_equal(rng.init_genrand(seed), legacy)
    # Caffe's seed is an unsigned int: solver seeds wrap mod 2**32
    assert np.array_equal(rng.CaffeRNG(2**32 + 7).words(5), rng.CaffeRNG(7).words(5))


def test_glibc_rand_from_srand_1():
    r = rng.GlibcRand()
    assert [r.rand() for _ in range(5)] == [1804289383, 846930886, 1681692777,
                                            1714636915, 1957747793]


def test_ziggurat_tables_have_equal_strips():
    for xs, ys, f, strips in ((rng._NORMAL_X, rng._NORMAL_Y, lambda x: np.exp(-x * x / 2), 128),
                              (rng._EXPONENTIAL_X, rng._EXPONENTIAL_Y, lambda x: np.exp(-x),
                               256)):
        assert len(xs) == len(ys) == strips + 1
        assert xs[-1] == 0 and ys[-1] == 1 and ys[0] == 0
        np.testing.assert_allclose(ys[1:], f(xs[1:]), rtol=1e-14)
        area = xs[0] * ys[1]                      # the base strip's (tail included)
        np.testing.assert_allclose(xs[1:-1] * (ys[2:] - ys[1:-1]), area, rtol=1e-12)


def test_boost_values_pinned():
    """The first draws Boost 1.74 makes from mt19937(42), in the oracle's order."""
    g = rng.CaffeRNG(42)
    normal = [float.fromhex(h) for h in (
        "-0x1.91e69p-1 0x1.336bbap+1 -0x1.73aabp+1 -0x1.06a68p-1 -0x1.f8078p+0 "
        "0x1.c93cp+1").split()]
    uniform = [float.fromhex(h) for h in (
        "0x1.978a2p-1 0x1.94c30cp-1 -0x1.105af8p-1 0x1.59993p-2 -0x1.106474p-1 "
        "-0x1.667042p-1").split()]
    assert np.array_equal(bits(g.gaussian(6, 0.5, 2.0)), bits(normal))
    assert np.array_equal(bits(g.uniform(6, -1, 2)), bits(uniform))
    assert g.bernoulli(6, 1.0 - float(F32(0.6)), double=True).tolist() == [1, 0, 0, 1, 0, 1]
    assert g.bernoulli(6, 0.5).tolist() == [0, 0, 1, 1, 0, 0]
    assert [g.uniform_int(k) for k in range(1, 7)] == [1, 2, 0, 0, 1, 6]
    assert g.rand() == 787716372


def _draws(seed: int, n: int) -> list[np.ndarray]:
    g = rng.CaffeRNG(seed)
    out = [bits(g.gaussian(n, 0.5, 2.0)), bits(g.uniform(n, -1, 2)),
           g.bernoulli(n, 1.0 - float(F32(0.6)), double=True).astype(np.uint32),
           g.bernoulli(n, 0.5).astype(np.uint32),
           np.array([g.uniform_int(k) for k in range(1, n + 1)], dtype=np.uint32),
           g.words(1)]
    return out


def test_boost_hashes_pinned():
    """200000 draws of each (about 40 normal tails among them), hashed; the hashes
    are those of Boost 1.74's own output for mt19937(42)."""
    normal, uniform, keep_d, keep_f, ints, word = _draws(42, 200000)
    digest = {name: hashlib.sha256(a.tobytes()).hexdigest()[:16] for name, a in
              (("normal", normal), ("uniform", uniform), ("bern_d", keep_d),
               ("bern_f", keep_f), ("uint", ints))}
    assert digest == {"normal": "395ed3b310fcb492", "uniform": "742926afd9a7d5e5",
                      "bern_d": "ed89ecbe4eab3000", "bern_f": "5e7c571e7da7509b",
                      "uint": "d32be9bc698a68c9"}
    assert word[0] == 3411704362


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    if shutil.which("g++") is None or \
            not Path("/usr/include/boost/random/normal_distribution.hpp").exists():
        pytest.skip("needs g++ and Boost.Random's headers")
    binary = tmp_path_factory.mktemp("oracle") / "oracle"
    subprocess.run(["g++", "-O1", "-o", str(binary), str(ORACLE)], check=True)
    return binary


@pytest.mark.parametrize("seed", [7, 2**32 - 1])
def test_against_boost_itself(tmp_path, oracle, seed):
    binary = oracle
    n = 200000
    subprocess.run([str(binary), str(seed), str(n), str(tmp_path / "out.bin")], check=True)
    raw = np.fromfile(tmp_path / "out.bin", dtype=np.uint32)
    theirs = np.split(raw[:-1], 5) + [raw[-1:]]
    for name, ours, ref in zip(("normal", "uniform", "bern_d", "bern_f", "uint", "word"),
                               _draws(seed, n), theirs):
        assert np.array_equal(ours, ref), name


def test_a_stream_is_the_same_however_it_is_cut():
    whole = rng.CaffeRNG(3)
    a, b = whole.gaussian(5000, 0, 1), whole.uniform(3000, 0, 1)
    pieces = rng.CaffeRNG(3)
    cut = [pieces.gaussian(k, 0, 1) for k in (1, 0, 7, 2000, 2992)]
    cut_u = [pieces.uniform(k, 0, 1) for k in (1500, 1, 1499)]
    assert np.array_equal(bits(np.concatenate(cut)), bits(a))
    assert np.array_equal(bits(np.concatenate(cut_u)), bits(b))
    assert whole.words(4).tolist() == pieces.words(4).tolist()


def test_large_draws_go_in_chunks_without_a_seam():
    n = rng._CHUNK + 1000
    big = rng.CaffeRNG(4)
    a, u, k = big.gaussian(n, 0, 1), big.uniform(n, 0, 1), big.bernoulli(n, 0.3, True)
    small = rng.CaffeRNG(4)
    parts = [(small.gaussian, (0, 1)), (small.uniform, (0, 1)),
             (small.bernoulli, (0.3, True))]
    for whole, (draw, args) in zip((a, u, k), parts):
        sizes = [300000] * (n // 300000) + [n % 300000]
        pieces = np.concatenate([draw(size, *args) for size in sizes])
        assert np.array_equal(pieces.view(np.uint8), whole.view(np.uint8))


def test_vectorised_normal_follows_boosts_loop():
    """The vectorised ziggurat equals Boost's loop run one value at a time."""
    n = 100000
    fast = rng.CaffeRNG(11).unit_normal(n)
    slow = rng.CaffeRNG(11)
    words = slow.peek(2 * n)
    at, values = 0, []
    for _ in range(n):
        value, used = slow._normal_slow(words, at)
        values.append(value)
        at += used
    assert np.array_equal(bits(fast), bits(values))


def test_shuffle_draws_uniform_int_from_the_back():
    count = 300000                        # large enough for bucket redraws to happen
    js = rng.CaffeRNG(5).shuffle_indices(count)
    one_by_one = rng.CaffeRNG(5)
    assert js.tolist() == [one_by_one.uniform_int(i) for i in range(count - 1, 0, -1)]
    items = list(range(6))
    rng.CaffeRNG(9).shuffle(items)
    expected = list(range(6))
    for i, j in zip(range(5, 0, -1), rng.CaffeRNG(9).shuffle_indices(6).tolist()):
        expected[i], expected[j] = expected[j], expected[i]
    assert items == expected and sorted(items) == list(range(6))


def test_uniform_edges():
    g = rng.CaffeRNG(1)
    v = g.uniform(100000, 0, 1)
    assert v.dtype == np.float32 and v.min() >= 0 and v.max() <= 1
    same = g.uniform(10, 0.25, 0.25)              # [a, nextafter(a)): always a
    assert (same == F32(0.25)).all()
    with pytest.raises(ValueError):
        g.uniform(1, 1, 0)
    g = rng.CaffeRNG(1)
    assert g.bernoulli(5, 0).tolist() == [0] * 5  # p = 0 draws nothing, as in Boost
    assert g.words(1)[0] == rng.CaffeRNG(1).words(1)[0]


def test_set_random_seed_makes_fillers_caffes_and_negative_does_nothing():
    filler = caffe_pb2.FillerParameter(type="gaussian", mean=0.5, std=2.0)
    assert not rng.seeded()
    protonet.set_random_seed(-1)
    assert not rng.seeded()
    protonet.set_random_seed(42)
    assert rng.seeded()
    from protonet.fillers import fill
    first = fill(filler, (2, 3)).numpy().ravel()
    assert np.array_equal(bits(first), bits(rng.CaffeRNG(42).gaussian(6, 0.5, 2.0)))
    protonet.set_random_seed(42)
    assert np.array_equal(bits(fill(filler, (2, 3)).numpy().ravel()), bits(first))


def test_unseeded_fillers_still_follow_torch_manual_seed():
    from protonet.fillers import fill
    filler = caffe_pb2.FillerParameter(type="xavier")
    torch.manual_seed(3)
    a = fill(filler, (4, 5))
    torch.manual_seed(3)
    assert torch.equal(fill(filler, (4, 5)), a)


def test_dropout_mask_is_caffes_cpu_bernoulli(tmp_path):
    prototxt = tmp_path / "drop.prototxt"
    prototxt.write_text(
        'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 3 dim: 50 } } }\n'
        'layer { name: "drop" type: "Dropout" bottom: "x" top: "y" '
        'dropout_param { dropout_ratio: 0.3 } }\n')
    protonet.set_random_seed(5)
    net = protonet.Net(str(prototxt), protonet.TRAIN)
    net.blobs["x"].data[...] = -2.0
    net.forward()
    keep = rng.CaffeRNG(5).bernoulli(150, 1.0 - float(F32(0.3)), double=True)
    scale = F32(1.0 / (1.0 - float(F32(0.3))))
    expected = np.where(keep.reshape(3, 50) == 1, F32(-2.0) * scale, F32(-0.0))
    assert np.array_equal(bits(net.blobs["y"].data), bits(expected))


@pytest.mark.parametrize("phase,mirror,crop,columns", [
    (caffe_pb2.TRAIN, True, 4, [0, 1, 2]), (caffe_pb2.TRAIN, False, 4, [1, 2]),
    (caffe_pb2.TEST, True, 4, [0]), (caffe_pb2.TEST, False, 4, []),
    (caffe_pb2.TRAIN, True, 0, [0])])
def test_transformer_draws_what_caffes_transform_draws(phase, mirror, crop, columns):
    protonet.set_random_seed(8)
    t = DataTransformer(caffe_pb2.TransformationParameter(mirror=mirror, crop_size=crop),
                        phase)
    t.init_rand()
    draws = t.draw(5)
    if not columns:
        assert not draws.any() and rng.caffe_rng().words(1)[0] == rng.CaffeRNG(8).rand()
        return
    own = rng.CaffeRNG(rng.CaffeRNG(8).rand())          # seeded from the main stream
    words = own.words(5 * len(columns)).reshape(5, len(columns))
    assert np.array_equal(draws[:, columns], words)
    others = [c for c in range(3) if c not in columns]
    assert not draws[:, others].any()


def test_hdf5_shuffle_is_caffes_random_shuffle(tmp_path, monkeypatch):
    """Two files of 7 and 5 rows, shuffled, batches of 5: the labels BVLC Caffe's
    HDF5Data gave (pycaffe, a fresh process), over several file and epoch wraps."""
    h5py = pytest.importorskip("h5py")
    monkeypatch.chdir(tmp_path)
    for name, rows, base in (("a.h5", 7, 0), ("b.h5", 5, 100)):
        with h5py.File(name, "w") as f:
            labels = np.arange(rows, dtype=np.float32) + base
            f["data"], f["label"] = labels.reshape(-1, 1), labels
    Path("list.txt").write_text("a.h5\nb.h5\n")
    Path("net.prototxt").write_text(
        'layer { name: "d" type: "HDF5Data" top: "data" top: "label" '
        'hdf5_data_param { source: "list.txt" batch_size: 5 shuffle: true } }\n')
    protonet.set_random_seed(1)
    net = protonet.Net("net.prototxt", protonet.TRAIN)
    labels = []
    for _ in range(10):
        net.forward()
        labels += net.blobs["label"].data.astype(int).tolist()
    assert labels == [2, 5, 1, 6, 3, 0, 4, 102, 103, 104, 101, 100, 103, 104, 101, 102, 100,
                      3, 5, 0, 2, 1, 6, 4, 103, 102, 101, 100, 104, 6, 3, 5, 4, 0, 1, 2, 0,
                      6, 2, 5, 1, 4, 3, 103, 104, 101, 100, 102, 5, 0]


RECURRENT_NET = """\
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 4 dim: 2 dim: 3 } } }
layer { name: "c" type: "Input" top: "cont" input_param { shape { dim: 4 dim: 2 } } }
layer { name: "s" type: "Input" top: "s" input_param { shape { dim: 2 dim: 5 } } }
layer { name: "lstm" type: "LSTM" bottom: "x" bottom: "cont" top: "h"
  recurrent_param { num_output: 3 weight_filler { type: "uniform" min: -1 max: 1 } bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "rnn" type: "RNN" bottom: "x" bottom: "cont" bottom: "s" top: "o"
  recurrent_param { num_output: 4 weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "uniform" } } }
layer { name: "after" type: "InnerProduct" bottom: "o" top: "after" inner_product_param { num_output: 2 axis: 2 weight_filler { type: "xavier" } } }
"""


def test_recurrent_layers_draw_every_unrolled_step(tmp_path):
    """LSTM and RNN (with a static input) as Caffe fills them: its unrolled net fills
    each time step's copies before sharing them, so a layer after them draws later
    in the stream. The hash is of the params BVLC Caffe made (pycaffe, seed 3)."""
    (tmp_path / "net.prototxt").write_text(RECURRENT_NET)
    protonet.set_random_seed(3)
    net = protonet.Net(str(tmp_path / "net.prototxt"), protonet.TRAIN)
    blobs = [b.data for name in ("lstm", "rnn", "after") for b in net.params[name]]
    assert [b.shape for b in blobs] == [(12, 3), (12,), (12, 3), (4, 3), (4,), (4, 5),
                                        (4, 4), (4, 4), (4,), (2, 4), (2,)]
    digest = hashlib.sha256(b"".join(b.astype(np.float32).tobytes() for b in blobs))
    assert digest.hexdigest()[:16] == "0050ec2eeb7001d3"


SHARED_NET = """\
layer { name: "d" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 4 dim: 6 } shape { dim: 4 } data_filler { type: "constant" value: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 20 weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "uniform" } } }
layer { name: "drop" type: "Dropout" bottom: "ip" top: "drop" dropout_param { dropout_ratio: 0.4 } }
layer { name: "ip2" type: "InnerProduct" bottom: "drop" top: "ip2" param { name: "shared_w" } inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "ip3" type: "InnerProduct" bottom: "drop" top: "ip3" param { name: "shared_w" } inner_product_param { num_output: 3 weight_filler { type: "msra" } } }
layer { name: "sum" type: "Eltwise" bottom: "ip2" bottom: "ip3" top: "sum" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "sum" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "sum" bottom: "label" top: "acc" include { phase: TEST } }
"""

SHARED_SOLVER = """\
net: "net.prototxt"
test_iter: 1
test_interval: 1000
test_initialization: false
base_lr: 0.1
lr_policy: "fixed"
max_iter: 10
display: 1
random_seed: 5
solver_mode: CPU
snapshot_after_train: false
"""


def test_solver_with_test_net_shared_params_and_dropout(tmp_path, monkeypatch):
    """Caffe's order: the train net (ip3's msra fill is drawn, then its weight shared
    with ip2's), the test net's fills, then Dropout masks each iteration. The values
    pinned are BVLC Caffe's (pycaffe): params right after the solver is built, and
    the mask and loss of the third iteration."""
    monkeypatch.chdir(tmp_path)
    Path("net.prototxt").write_text(SHARED_NET)
    Path("solver.prototxt").write_text(SHARED_SOLVER)
    solver = protonet.get_solver("solver.prototxt")
    blobs = [b.data for name in ("ip", "ip2", "ip3") for b in solver.net.params[name]]
    digest = hashlib.sha256(b"".join(b.astype(np.float32).tobytes() for b in blobs))
    assert digest.hexdigest()[:16] == "d20dee2ba9c5b3c9"
    solver.step(3)
    mask = np.packbits((solver.net.blobs["drop"].data != 0).ravel()).tobytes().hex()
    assert mask == "2f76288afbee56276d1e"
    assert abs(float(solver.net.blobs["loss"].data) - 0.001384057803079486) <= 1e-8


LAYERS_NET = """\
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }
layer { name: "ids" type: "Input" top: "ids" input_param { shape { dim: 2 dim: 5 } } }
layer { name: "deconv" type: "Deconvolution" bottom: "x" top: "dc" convolution_param { num_output: 4 kernel_size: 3 group: 1 weight_filler { type: "msra" variance_norm: FAN_OUT } bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "embed" type: "Embed" bottom: "ids" top: "emb" embed_param { input_dim: 10 num_output: 6 weight_filler { type: "uniform" min: -0.5 max: 0.5 } bias_filler { type: "gaussian" std: 1 } } }
layer { name: "bias" type: "Bias" bottom: "x" top: "b" bias_param { filler { type: "gaussian" std: 0.3 } } }
layer { name: "scale" type: "Scale" bottom: "x" top: "s" scale_param { bias_term: true filler { type: "gaussian" std: 0.2 } bias_filler { type: "uniform" min: -1 max: 1 } } }
layer { name: "prelu" type: "PReLU" bottom: "x" top: "p" prelu_param { filler { type: "gaussian" std: 0.05 } } }
layer { name: "ipt" type: "InnerProduct" bottom: "x" top: "ipt" inner_product_param { num_output: 5 transpose: true weight_filler { type: "xavier" variance_norm: AVERAGE } bias_filler { type: "positive_unitball" } } }
layer { name: "bil" type: "Deconvolution" bottom: "x" top: "up" convolution_param { num_output: 3 group: 3 kernel_size: 4 stride: 2 weight_filler { type: "bilinear" } bias_term: false } }
layer { name: "conv" type: "Convolution" bottom: "x" top: "c" convolution_param { num_output: 2 kernel_size: 2 weight_filler { type: "gaussian" std: 1 sparse: 1 } } }
"""


def test_every_layer_with_fillers_in_caffes_order(tmp_path):
    """Deconvolution, Embed, Bias, Scale (with its bias), PReLU, a transposed
    InnerProduct, a bilinear filler (draws nothing) and a sparse Gaussian: the params
    BVLC Caffe made for seed 11 (pycaffe), hashed in the net's param order."""
    (tmp_path / "net.prototxt").write_text(LAYERS_NET)
    protonet.set_random_seed(11)
    net = protonet.Net(str(tmp_path / "net.prototxt"), protonet.TRAIN)
    blobs = [b.data for bl in net.params.values() for b in bl]
    assert len(blobs) == 13
    digest = hashlib.sha256(b"".join(b.astype(np.float32).tobytes() for b in blobs))
    assert digest.hexdigest()[:16] == "9099eff5df4044a7"
