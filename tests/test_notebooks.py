"""Caffe's example notebooks as condensed scripts, run through `import protonet.caffe
as caffe`: each keeps its notebook's code path (the calls, in order) with only the
data changed — small local data made here (sklearn digits, random images, random
weights) and narrower nets instead of ImageNet, MNIST downloads and CaffeNet — and
checks what the notebook shows against numbers computed independently.

00-classification, 01-learning-lenet, 02-fine-tuning, brewing-logreg, net_surgery,
pascal-multilabel-with-datalayer, and Google's deep dream loop.
"""
from __future__ import annotations

import os
import sys
import tempfile
import textwrap

import cv2
import numpy as np
import pytest
import torch
from google.protobuf import text_format

import protonet.caffe as caffe
from protonet.caffe import layers as L, params as P
from protonet.caffe.proto import caffe_pb2

lmdb = pytest.importorskip("lmdb")
h5py = pytest.importorskip("h5py")


def _write_jpeg(path, rng, h, w, grey=False):
    image = (rng.random((h, w) if grey else (h, w, 3)) * 255).astype(np.uint8)
    image = cv2.GaussianBlur(image, (5, 5), 0)        # image-like, not pure noise
    cv2.imwrite(str(path), image)
    return str(path)


def _random_weights(model_def, path, seed=0):
    """A .caffemodel of the net's filler-initialised weights (our 'pretrained' model)."""
    caffe.set_random_seed(seed)
    caffe.Net(model_def, caffe.TEST).save(str(path))
    return str(path)


# -- 00-classification ------------------------------------------------------------------
CAFFENET_SMALL_DEPLOY = """
name: "CaffeNetSmall"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 10 dim: 3 dim: 67 dim: 67 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 16 kernel_size: 11 stride: 4 weight_filler { type: "gaussian" std: 0.02 } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1" lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }
layer { name: "conv2" type: "Convolution" bottom: "norm1" top: "conv2"
  convolution_param { num_output: 16 pad: 2 kernel_size: 5 group: 2 weight_filler { type: "gaussian" std: 0.05 } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "pool5" type: "Pooling" bottom: "conv2" top: "pool5" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "fc6" type: "InnerProduct" bottom: "pool5" top: "fc6"
  inner_product_param { num_output: 32 weight_filler { type: "gaussian" std: 0.05 } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }
layer { name: "drop6" type: "Dropout" bottom: "fc6" top: "fc6" dropout_param { dropout_ratio: 0.5 } }
layer { name: "fc8" type: "InnerProduct" bottom: "fc6" top: "fc8"
  inner_product_param { num_output: 10 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "prob" type: "Softmax" bottom: "fc8" top: "prob" }
"""


def test_00_classification(tmp_path):
    rng = np.random.default_rng(0)
    model_def = str(tmp_path / "deploy.prototxt")
    open(model_def, "w").write(CAFFENET_SMALL_DEPLOY)
    model_weights = _random_weights(model_def, tmp_path / "caffenet.caffemodel")
    np.save(tmp_path / "mean.npy", (rng.random((3, 80, 80)) * 40 + 100).astype(np.float64))
    image_file = _write_jpeg(tmp_path / "cat.jpg", rng, 90, 120)
    labels_file = tmp_path / "synset_words.txt"
    labels_file.write_text("".join(f"n0{i:07d} class {i}\n" for i in range(10)))

    caffe.set_mode_cpu()
    net = caffe.Net(model_def, model_weights, caffe.TEST)
    mu = np.load(tmp_path / "mean.npy")
    mu = mu.mean(1).mean(1)
    transformer = caffe.io.Transformer({"data": net.blobs["data"].data.shape})
    transformer.set_transpose("data", (2, 0, 1))
    transformer.set_mean("data", mu)
    transformer.set_raw_scale("data", 255)
    transformer.set_channel_swap("data", (2, 1, 0))
    net.blobs["data"].reshape(5, 3, 67, 67)
    image = caffe.io.load_image(image_file)
    transformed_image = transformer.preprocess("data", image)
    net.blobs["data"].data[...] = transformed_image
    output = net.forward()
    output_prob = output["prob"][0]
    labels = np.loadtxt(str(labels_file), str, delimiter="\t")
    top_inds = output_prob.argsort()[::-1][:5]
    top = list(zip(output_prob[top_inds], labels[top_inds]))

    # independently: OpenCV's BGR pixels resized, minus the mean, through the core Net
    bgr = cv2.imread(image_file).astype(np.float32) / 255.0
    resized = caffe.io.resize_image(bgr, (67, 67)) * 255.0 - mu.astype(np.float32)
    core = __import__("protonet").Net(model_def, model_weights, caffe.TEST)
    core.blobs["data"].reshape(1, 3, 67, 67)
    core.reshape()
    expected = core.forward(data=resized.transpose(2, 0, 1)[None])["prob"][0]
    np.testing.assert_allclose(output_prob, expected, rtol=1e-4, atol=1e-5)
    assert output["prob"].shape == (5, 10) and top[0][0] == output_prob.max()
    assert top[0][1] == labels[output_prob.argmax()]

    caffe.set_device(0)      # the notebook's GPU cell: the mode switch is accepted
    caffe.set_mode_gpu()
    net.forward()
    caffe.set_mode_cpu()
    shapes = {name: blob.data.shape for name, blob in net.blobs.items()}
    assert shapes["conv1"] == (5, 16, 15, 15) and shapes["pool5"] == (5, 16, 3, 3)
    params = {name: (p[0].data.shape, p[1].data.shape) for name, p in net.params.items()}
    assert params["conv2"] == ((16, 8, 5, 5), (16,))

    def vis_square(data):
        data = (data - data.min()) / (data.max() - data.min())
        n = int(np.ceil(np.sqrt(data.shape[0])))
        padding = (((0, n ** 2 - data.shape[0]), (0, 1), (0, 1))
                   + ((0, 0),) * (data.ndim - 3))
        data = np.pad(data, padding, mode="constant", constant_values=1)
        data = data.reshape((n, n) + data.shape[1:]).transpose(
            (0, 2, 1, 3) + tuple(range(4, data.ndim + 1)))
        return data.reshape((n * data.shape[1], n * data.shape[3]) + data.shape[4:])

    assert vis_square(net.params["conv1"][0].data.transpose(0, 2, 3, 1)).shape == (48, 48, 3)
    assert vis_square(net.blobs["conv1"].data[0, :36]).shape == (64, 64)
    feat = net.blobs["fc6"].data[0]
    assert np.all(feat >= 0)                          # after the in-place ReLU
    assert np.allclose(net.blobs["prob"].data[0], output_prob)


# -- 01-learning-lenet ------------------------------------------------------------------
def _digits_lmdb(path, images, labels):
    env = lmdb.open(str(path), map_size=1 << 28)
    with env.begin(write=True) as txn:
        for i, (im, label) in enumerate(zip(images, labels)):
            datum = caffe.io.array_to_datum(im[None], int(label))
            txn.put(f"{i:08d}".encode(), datum.SerializeToString())
    env.close()
    return str(path)


def _digits_28():
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    images = np.stack([cv2.resize((im * 255 / 16).astype(np.uint8), (28, 28),
                                  interpolation=cv2.INTER_LINEAR) for im in digits.images])
    return images, digits.target


def test_01_learning_lenet(tmp_path, monkeypatch):
    images, labels = _digits_28()
    train_lmdb = _digits_lmdb(tmp_path / "mnist_train_lmdb", images[:1500], labels[:1500])
    test_lmdb = _digits_lmdb(tmp_path / "mnist_test_lmdb", images[1500:], labels[1500:])
    monkeypatch.chdir(tmp_path)

    def lenet(lmdb_path, batch_size):
        n = caffe.NetSpec()
        n.data, n.label = L.Data(batch_size=batch_size, backend=P.Data.LMDB, source=lmdb_path,
                                 transform_param=dict(scale=1. / 255), ntop=2)
        n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20,
                                weight_filler=dict(type="xavier"))
        n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
        n.conv2 = L.Convolution(n.pool1, kernel_size=5, num_output=50,
                                weight_filler=dict(type="xavier"))
        n.pool2 = L.Pooling(n.conv2, kernel_size=2, stride=2, pool=P.Pooling.MAX)
        n.fc1 = L.InnerProduct(n.pool2, num_output=500, weight_filler=dict(type="xavier"))
        n.relu1 = L.ReLU(n.fc1, in_place=True)
        n.score = L.InnerProduct(n.relu1, num_output=10, weight_filler=dict(type="xavier"))
        n.loss = L.SoftmaxWithLoss(n.score, n.label)
        return n.to_proto()

    with open("lenet_auto_train.prototxt", "w") as f:
        f.write(str(lenet(train_lmdb, 32)))
    with open("lenet_auto_test.prototxt", "w") as f:
        f.write(str(lenet(test_lmdb, 50)))
    with open("lenet_auto_solver.prototxt", "w") as f:
        f.write(textwrap.dedent("""\
            train_net: "lenet_auto_train.prototxt"
            test_net: "lenet_auto_test.prototxt"
            test_iter: 100
            test_interval: 500
            base_lr: 0.01
            momentum: 0.9
            weight_decay: 0.0005
            lr_policy: "inv"
            gamma: 0.0001
            power: 0.75
            display: 100
            max_iter: 10000
            snapshot: 5000
            snapshot_prefix: "lenet"
            random_seed: 1
            """))
    caffe.set_device(0)
    caffe.set_mode_gpu()
    try:
        solver = caffe.SGDSolver("lenet_auto_solver.prototxt")
    finally:
        caffe.set_mode_cpu()
    shapes = [(k, v.data.shape) for k, v in solver.net.blobs.items()]
    assert shapes[0] == ("data", (32, 1, 28, 28)) and ("score", (32, 10)) in shapes
    assert [(k, v[0].data.shape) for k, v in solver.net.params.items()][0] == \
        ("conv1", (20, 1, 5, 5))
    solver.net.forward()
    solver.test_nets[0].forward()
    np.testing.assert_array_equal(solver.net.blobs["label"].data[:8], labels[:8])
    np.testing.assert_array_equal(solver.test_nets[0].blobs["label"].data[:8],
                                  labels[1500:1508])
    np.testing.assert_allclose(solver.net.blobs["data"].data[0, 0], images[0] / 255.0,
                               atol=1e-6)
    solver.step(1)
    assert np.abs(solver.net.params["conv1"][0].diff).sum() > 0
    assert solver.net.params["conv1"][0].diff[:, 0].reshape(4, 5, 5, 5).shape == (4, 5, 5, 5)

    niter, test_interval = 16, 8
    train_loss = np.zeros(niter)
    test_acc = np.zeros(int(np.ceil(niter / test_interval)) + 1)
    output = np.zeros((niter, 8, 10))
    for it in range(niter):
        solver.step(1)
        train_loss[it] = solver.net.blobs["loss"].data
        solver.test_nets[0].forward(start="conv1")
        output[it] = solver.test_nets[0].blobs["score"].data[:8]
        if it % test_interval == 0 or it == niter - 1:
            correct = 0
            for _ in range(3):
                solver.test_nets[0].forward()
                correct += sum(solver.test_nets[0].blobs["score"].data.argmax(1)
                               == solver.test_nets[0].blobs["label"].data)
            test_acc[it // test_interval + (it == niter - 1)] = correct / 150
    assert solver.iter == niter + 1
    assert train_loss[-5:].mean() < 0.6 * train_loss[:5].mean()
    assert test_acc[-1] > 0.5                          # chance is 0.1


def test_01_learning_lenet_custom_solver(tmp_path):
    images, labels = _digits_28()
    train_lmdb = _digits_lmdb(tmp_path / "train_lmdb", images[:1500], labels[:1500])
    test_lmdb = _digits_lmdb(tmp_path / "test_lmdb", images[1500:], labels[1500:])
    train_net_path = str(tmp_path / "custom_auto_train.prototxt")
    test_net_path = str(tmp_path / "custom_auto_test.prototxt")
    solver_config_path = str(tmp_path / "custom_auto_solver.prototxt")

    def custom_net(lmdb_path, batch_size):
        n = caffe.NetSpec()
        n.data, n.label = L.Data(batch_size=batch_size, backend=P.Data.LMDB, source=lmdb_path,
                                 transform_param=dict(scale=1. / 255), ntop=2)
        n.score = L.InnerProduct(n.data, num_output=10, weight_filler=dict(type="xavier"))
        n.loss = L.SoftmaxWithLoss(n.score, n.label)
        return n.to_proto()

    with open(train_net_path, "w") as f:
        f.write(str(custom_net(train_lmdb, 64)))
    with open(test_net_path, "w") as f:
        f.write(str(custom_net(test_lmdb, 100)))
    s = caffe_pb2.SolverParameter()
    s.random_seed = 0xCAFFE
    s.train_net = train_net_path
    s.test_net.append(test_net_path)
    s.test_interval = 500
    s.test_iter.append(100)
    s.max_iter = 10000
    s.type = "Adam"
    s.base_lr = 0.001
    s.momentum = 0.9
    s.momentum2 = 0.999
    s.weight_decay = 5e-4
    s.lr_policy = "inv"
    s.gamma = 0.0001
    s.power = 0.75
    s.display = 1000
    s.snapshot = 5000
    s.snapshot_prefix = str(tmp_path / "custom_net")
    s.solver_mode = caffe_pb2.SolverParameter.GPU
    with open(solver_config_path, "w") as f:
        f.write(str(s))
    solver = caffe.get_solver(solver_config_path)
    assert isinstance(solver, caffe.AdamSolver)
    niter = 40
    test_interval = niter / 4
    train_loss = np.zeros(niter)
    for it in range(niter):
        solver.step(1)
        train_loss[it] = solver.net.blobs["loss"].data
        if it % test_interval == 0:
            correct = 0
            for _ in range(3):
                solver.test_nets[0].forward()
                correct += sum(solver.test_nets[0].blobs["score"].data.argmax(1)
                               == solver.test_nets[0].blobs["label"].data)
    assert train_loss[-5:].mean() < 0.5 * train_loss[:3].mean()
    assert correct / 300 > 0.6


# -- brewing-logreg ---------------------------------------------------------------------
def test_brewing_logreg(tmp_path):
    datasets = pytest.importorskip("sklearn.datasets")
    model_selection = pytest.importorskip("sklearn.model_selection")
    X, y = datasets.make_classification(n_samples=2000, n_features=4, n_redundant=0,
                                        n_informative=2, n_clusters_per_class=2,
                                        hypercube=False, random_state=0)
    X, Xt, y, yt = model_selection.train_test_split(X, y, random_state=0)
    dirname = str(tmp_path / "data")
    os.makedirs(dirname)
    train_filename = os.path.join(dirname, "train.h5")
    test_filename = os.path.join(dirname, "test.h5")
    with h5py.File(train_filename, "w") as f:
        f["data"] = X
        f["label"] = y.astype(np.float32)
    with open(os.path.join(dirname, "train.txt"), "w") as f:
        f.write(train_filename + "\n")
        f.write(train_filename + "\n")
    comp_kwargs = {"compression": "gzip", "compression_opts": 1}
    with h5py.File(test_filename, "w") as f:
        f.create_dataset("data", data=Xt, **comp_kwargs)
        f.create_dataset("label", data=yt.astype(np.float32), **comp_kwargs)
    with open(os.path.join(dirname, "test.txt"), "w") as f:
        f.write(test_filename + "\n")

    def logreg(hdf5, batch_size):
        n = caffe.NetSpec()
        n.data, n.label = L.HDF5Data(batch_size=batch_size, source=hdf5, ntop=2)
        n.ip1 = L.InnerProduct(n.data, num_output=2, weight_filler=dict(type="xavier"))
        n.accuracy = L.Accuracy(n.ip1, n.label)
        n.loss = L.SoftmaxWithLoss(n.ip1, n.label)
        return n.to_proto()

    def nonlinear_net(hdf5, batch_size):
        n = caffe.NetSpec()
        n.data, n.label = L.HDF5Data(batch_size=batch_size, source=hdf5, ntop=2)
        n.ip1 = L.InnerProduct(n.data, num_output=40, weight_filler=dict(type="xavier"))
        n.relu1 = L.ReLU(n.ip1, in_place=True)
        n.ip2 = L.InnerProduct(n.ip1, num_output=2, weight_filler=dict(type="xavier"))
        n.accuracy = L.Accuracy(n.ip2, n.label)
        n.loss = L.SoftmaxWithLoss(n.ip2, n.label)
        return n.to_proto()

    def solver(train_net_path, test_net_path):
        s = caffe_pb2.SolverParameter()
        s.train_net = train_net_path
        s.test_net.append(test_net_path)
        s.test_interval = 100
        s.test_iter.append(20)
        s.max_iter = 200
        s.base_lr = 0.01
        s.lr_policy = "step"
        s.gamma = 0.1
        s.stepsize = 5000
        s.momentum = 0.9
        s.weight_decay = 5e-4
        s.display = 1000
        s.snapshot = 10000
        s.snapshot_prefix = os.path.join(dirname, "train")
        s.solver_mode = caffe_pb2.SolverParameter.CPU
        return s

    accuracies = {}
    for name, make in (("logreg", logreg), ("nonlinear", nonlinear_net)):
        train_net_path = str(tmp_path / f"{name}_auto_train.prototxt")
        with open(train_net_path, "w") as f:
            f.write(str(make(os.path.join(dirname, "train.txt"), 10)))
        test_net_path = str(tmp_path / f"{name}_auto_test.prototxt")
        with open(test_net_path, "w") as f:
            f.write(str(make(os.path.join(dirname, "test.txt"), 10)))
        solver_path = str(tmp_path / f"{name}_solver.prototxt")
        with open(solver_path, "w") as f:
            f.write(str(solver(train_net_path, test_net_path)))
        caffe.set_mode_cpu()
        s = caffe.get_solver(solver_path)
        s.solve()
        assert s.iter == 200
        accuracy = 0
        batch_size = s.test_nets[0].blobs["data"].num
        test_iters = int(len(Xt) / batch_size)
        for _ in range(test_iters):
            s.test_nets[0].forward()
            accuracy += s.test_nets[0].blobs["accuracy"].data
        accuracy /= test_iters
        # the same accuracy from the weights, in numpy
        params = s.test_nets[0].params
        if name == "logreg":
            scores = Xt @ params["ip1"][0].data.T + params["ip1"][1].data
        else:
            hidden = np.maximum(Xt @ params["ip1"][0].data.T + params["ip1"][1].data, 0)
            scores = hidden @ params["ip2"][0].data.T + params["ip2"][1].data
        assert accuracy == pytest.approx((scores.argmax(1) == yt).mean(), abs=1e-4)
        accuracies[name] = float(accuracy)
    assert accuracies["logreg"] > 0.7 and accuracies["nonlinear"] > 0.75


# -- net_surgery ------------------------------------------------------------------------
CONV_PROTOTXT = """
name: "convolution"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 dim: 100 dim: 100 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 3 kernel_size: 5 stride: 1
    weight_filler { type: "gaussian" std: 0.01 } bias_filler { type: "constant" value: 0 } } }
"""

FC_DEPLOY = """
name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 12 dim: 12 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
%s
layer { name: "prob" type: "Softmax" bottom: "fc8%s" top: "prob" }
"""
FC_LAYERS = """
layer { name: "fc6" type: "InnerProduct" bottom: "pool1" top: "fc6" inner_product_param { num_output: 8 weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }
layer { name: "fc7" type: "InnerProduct" bottom: "fc6" top: "fc7" inner_product_param { num_output: 8 weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu7" type: "ReLU" bottom: "fc7" top: "fc7" }
layer { name: "fc8" type: "InnerProduct" bottom: "fc7" top: "fc8" inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 } } }
"""
CONV_LAYERS = """
layer { name: "fc6-conv" type: "Convolution" bottom: "pool1" top: "fc6-conv" convolution_param { num_output: 8 kernel_size: 5 } }
layer { name: "relu6" type: "ReLU" bottom: "fc6-conv" top: "fc6-conv" }
layer { name: "fc7-conv" type: "Convolution" bottom: "fc6-conv" top: "fc7-conv" convolution_param { num_output: 8 kernel_size: 1 } }
layer { name: "relu7" type: "ReLU" bottom: "fc7-conv" top: "fc7-conv" }
layer { name: "fc8-conv" type: "Convolution" bottom: "fc7-conv" top: "fc8-conv" convolution_param { num_output: 5 kernel_size: 1 } }
"""


def _correlate_valid(image, kernel):
    windows = np.lib.stride_tricks.sliding_window_view(image, kernel.shape)
    return np.einsum("ijkl,kl->ij", windows, kernel)


def test_net_surgery(tmp_path):
    rng = np.random.default_rng(4)
    conv_def = tmp_path / "conv.prototxt"
    conv_def.write_text(CONV_PROTOTXT)
    cat_gray = _write_jpeg(tmp_path / "cat_gray.jpg", rng, 100, 100, grey=True)
    caffe.set_mode_cpu()
    net = caffe.Net(str(conv_def), caffe.TEST)
    im = np.array(caffe.io.load_image(cat_gray, color=False)).squeeze()
    im_input = im[np.newaxis, np.newaxis, :, :]
    net.blobs["data"].reshape(*im_input.shape)
    net.blobs["data"].data[...] = im_input
    net.forward()
    conv0 = net.blobs["conv"].data[0, 0]
    pre = float(conv0.mean())
    net.params["conv"][1].data[0] = 1.
    net.forward()
    assert float(conv0.mean()) == pytest.approx(pre + 1, abs=1e-5)   # conv0 is a view
    ksize = net.params["conv"][0].data.shape[2:]
    sigma = 1.
    y, x = np.mgrid[-ksize[0] // 2 + 1:ksize[0] // 2 + 1, -ksize[1] // 2 + 1:ksize[1] // 2 + 1]
    g = np.exp(-((x ** 2 + y ** 2) / (2.0 * sigma ** 2)))
    gaussian = (g / g.sum()).astype(np.float32)
    net.params["conv"][0].data[0] = gaussian
    net.params["conv"][0].data[1:] = 0.
    sobel = np.array((-1, -2, -1, 0, 0, 0, 1, 2, 1), dtype=np.float32).reshape((3, 3))
    net.params["conv"][0].data[1, 0, 1:-1, 1:-1] = sobel
    net.params["conv"][0].data[2, 0, 1:-1, 1:-1] = sobel.T
    net.forward()
    out = net.blobs["conv"].data[0]
    np.testing.assert_allclose(out[0], _correlate_valid(im, gaussian) + 1, atol=1e-5)
    np.testing.assert_allclose(out[1], _correlate_valid(im, np.pad(sobel, 1)), atol=1e-5)
    np.testing.assert_allclose(out[2], _correlate_valid(im, np.pad(sobel.T, 1)), atol=1e-5)

    # casting a classifier into a fully convolutional net
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(FC_DEPLOY % (FC_LAYERS, ""))
    full_conv = tmp_path / "full_conv.prototxt"
    full_conv.write_text((FC_DEPLOY % (CONV_LAYERS, "-conv")).replace("dim: 12 dim: 12",
                                                                       "dim: 20 dim: 20"))
    weights = _random_weights(str(deploy), tmp_path / "small.caffemodel")
    net = caffe.Net(str(deploy), weights, caffe.TEST)
    params = ["fc6", "fc7", "fc8"]
    fc_params = {pr: (net.params[pr][0].data, net.params[pr][1].data) for pr in params}
    net_full_conv = caffe.Net(str(full_conv), weights, caffe.TEST)
    params_full_conv = ["fc6-conv", "fc7-conv", "fc8-conv"]
    conv_params = {pr: (net_full_conv.params[pr][0].data, net_full_conv.params[pr][1].data)
                   for pr in params_full_conv}
    for pr, pr_conv in zip(params, params_full_conv):
        conv_params[pr_conv][0].flat = fc_params[pr][0].flat
        conv_params[pr_conv][1][...] = fc_params[pr][1]
    net_full_conv.save(str(tmp_path / "full_conv.caffemodel"))
    im = caffe.io.load_image(_write_jpeg(tmp_path / "cat.jpg", rng, 30, 30))
    transformer = caffe.io.Transformer({"data": net_full_conv.blobs["data"].data.shape})
    transformer.set_mean("data", np.array([0.4, 0.5, 0.6]))
    transformer.set_transpose("data", (2, 0, 1))
    transformer.set_channel_swap("data", (2, 1, 0))
    transformer.set_raw_scale("data", 255.0)
    data = np.asarray([transformer.preprocess("data", im)])
    out = net_full_conv.forward_all(data=data)
    assert out["prob"].shape == (1, 5, 5, 5)
    reloaded = caffe.Net(str(full_conv), str(tmp_path / "full_conv.caffemodel"), caffe.TEST)
    np.testing.assert_allclose(reloaded.forward_all(data=data)["prob"], out["prob"], atol=1e-6)
    for i, j in ((0, 0), (1, 2), (4, 3)):      # each output is the classifier on a window
        window = data[:, :, 2 * i:2 * i + 12, 2 * j:2 * j + 12]
        np.testing.assert_allclose(out["prob"][0, :, i, j],
                                   net.forward(data=window)["prob"][0], rtol=1e-4, atol=1e-6)


# -- 02-fine-tuning ---------------------------------------------------------------------
# CaffeNet's layers with narrower widths (96, 256, 384, 4096 -> 8, 8, 8, 16).
WIDTH = {96: 8, 256: 8, 384: 8, 4096: 16}


def _style_data(tmp_path, rng, count=12, classes=5):
    lines = []
    for i in range(count):
        path = _write_jpeg(tmp_path / f"style{i}.jpg", rng, 64, 80)
        lines.append(f"{path} {i % classes}\n")
    for subset in ("train", "test"):
        (tmp_path / f"{subset}.txt").write_text("".join(lines))
    mean = caffe.io.array_to_blobproto((rng.random((1, 3, 256, 256)) * 20 + 110))
    (tmp_path / "imagenet_mean.binaryproto").write_bytes(mean.SerializeToString())


def test_02_fine_tuning(tmp_path):
    rng = np.random.default_rng(2)
    _style_data(tmp_path, rng)
    NUM_STYLE_LABELS = 5
    weight_param = dict(lr_mult=1, decay_mult=1)
    bias_param = dict(lr_mult=2, decay_mult=0)
    learned_param = [weight_param, bias_param]
    frozen_param = [dict(lr_mult=0)] * 2

    def conv_relu(bottom, ks, nout, stride=1, pad=0, group=1, param=learned_param,
                  weight_filler=dict(type="gaussian", std=0.01),
                  bias_filler=dict(type="constant", value=0.1)):
        conv = L.Convolution(bottom, kernel_size=ks, stride=stride, num_output=WIDTH[nout],
                             pad=pad, group=group, param=param, weight_filler=weight_filler,
                             bias_filler=bias_filler)
        return conv, L.ReLU(conv, in_place=True)

    def fc_relu(bottom, nout, param=learned_param,
                weight_filler=dict(type="gaussian", std=0.005),
                bias_filler=dict(type="constant", value=0.1)):
        fc = L.InnerProduct(bottom, num_output=WIDTH[nout], param=param,
                            weight_filler=weight_filler, bias_filler=bias_filler)
        return fc, L.ReLU(fc, in_place=True)

    def max_pool(bottom, ks, stride=1):
        return L.Pooling(bottom, pool=P.Pooling.MAX, kernel_size=ks, stride=stride)

    def caffenet(data, label=None, train=True, num_classes=1000, classifier_name="fc8",
                 learn_all=False):
        n = caffe.NetSpec()
        n.data = data
        param = learned_param if learn_all else frozen_param
        n.conv1, n.relu1 = conv_relu(n.data, 11, 96, stride=4, param=param)
        n.pool1 = max_pool(n.relu1, 3, stride=2)
        n.norm1 = L.LRN(n.pool1, local_size=5, alpha=1e-4, beta=0.75)
        n.conv2, n.relu2 = conv_relu(n.norm1, 5, 256, pad=2, group=2, param=param)
        n.pool2 = max_pool(n.relu2, 3, stride=2)
        n.norm2 = L.LRN(n.pool2, local_size=5, alpha=1e-4, beta=0.75)
        n.conv3, n.relu3 = conv_relu(n.norm2, 3, 384, pad=1, param=param)
        n.conv4, n.relu4 = conv_relu(n.relu3, 3, 384, pad=1, group=2, param=param)
        n.conv5, n.relu5 = conv_relu(n.relu4, 3, 256, pad=1, group=2, param=param)
        n.pool5 = max_pool(n.relu5, 3, stride=2)
        n.fc6, n.relu6 = fc_relu(n.pool5, 4096, param=param)
        if train:
            n.drop6 = fc7input = L.Dropout(n.relu6, in_place=True)
        else:
            fc7input = n.relu6
        n.fc7, n.relu7 = fc_relu(fc7input, 4096, param=param)
        if train:
            n.drop7 = fc8input = L.Dropout(n.relu7, in_place=True)
        else:
            fc8input = n.relu7
        fc8 = L.InnerProduct(fc8input, num_output=num_classes, param=learned_param)
        n.__setattr__(classifier_name, fc8)
        if not train:
            n.probs = L.Softmax(fc8)
        if label is not None:
            n.label = label
            n.loss = L.SoftmaxWithLoss(fc8, n.label)
            n.acc = L.Accuracy(fc8, n.label)
        with tempfile.NamedTemporaryFile("w", delete=False, dir=tmp_path,
                                         suffix=".prototxt") as f:
            f.write(str(n.to_proto()))
            return f.name

    dummy_data = L.DummyData(shape=dict(dim=[1, 3, 227, 227]))
    imagenet_net_filename = caffenet(data=dummy_data, train=False)
    weights = _random_weights(imagenet_net_filename, tmp_path / "caffenet.caffemodel")
    imagenet_net = caffe.Net(imagenet_net_filename, weights, caffe.TEST)

    def style_net(train=True, learn_all=False, subset=None):
        if subset is None:
            subset = "train" if train else "test"
        source = str(tmp_path / f"{subset}.txt")
        transform_param = dict(mirror=train, crop_size=227,
                               mean_file=str(tmp_path / "imagenet_mean.binaryproto"))
        style_data, style_label = L.ImageData(transform_param=transform_param, source=source,
                                              batch_size=4, new_height=256, new_width=256,
                                              ntop=2)
        return caffenet(data=style_data, label=style_label, train=train,
                        num_classes=NUM_STYLE_LABELS, classifier_name="fc8_flickr",
                        learn_all=learn_all)

    untrained_style_net = caffe.Net(style_net(train=False, subset="train"), weights,
                                    caffe.TEST)
    untrained_style_net.forward()
    style_data_batch = untrained_style_net.blobs["data"].data.copy()
    style_label_batch = np.array(untrained_style_net.blobs["label"].data, dtype=np.int32)
    assert list(style_label_batch) == [0, 1, 2, 3]

    def disp_preds(net, image, k=5):
        net.blobs["data"].data[0, ...] = image
        probs = net.forward(start="conv1")["probs"][0]
        return (-probs).argsort()[:k], probs

    image = style_data_batch[0]
    top, probs = disp_preds(imagenet_net, image)
    assert probs.shape == (1000,) and probs[top[0]] == probs.max()
    style_top, style_probs = disp_preds(untrained_style_net, image, k=3)
    assert style_probs.shape == (NUM_STYLE_LABELS,)
    diff = untrained_style_net.blobs["fc7"].data[0] - imagenet_net.blobs["fc7"].data[0]
    assert (diff ** 2).sum() < 1e-8                  # the same layers, the same weights
    del untrained_style_net

    def solver(train_net_path, test_net_path=None, base_lr=0.001):
        s = caffe_pb2.SolverParameter()
        s.train_net = train_net_path
        if test_net_path is not None:
            s.test_net.append(test_net_path)
            s.test_interval = 1000
            s.test_iter.append(100)
        s.iter_size = 1
        s.max_iter = 100000
        s.lr_policy = "step"
        s.gamma = 0.1
        s.stepsize = 20000
        s.momentum = 0.9
        s.weight_decay = 5e-4
        s.base_lr = base_lr
        s.display = 1000
        s.snapshot = 10000
        s.snapshot_prefix = str(tmp_path / "finetune_flickr_style")
        s.solver_mode = caffe_pb2.SolverParameter.GPU
        with tempfile.NamedTemporaryFile("w", delete=False, dir=tmp_path) as f:
            f.write(str(s))
            return f.name

    def run_solvers(niter, solvers, disp_interval=10):
        blobs = ("loss", "acc")
        loss, acc = ({name: np.zeros(niter) for name, _ in solvers} for _ in blobs)
        for it in range(niter):
            for name, s in solvers:
                s.step(1)
                loss[name][it], acc[name][it] = (s.net.blobs[b].data.copy() for b in blobs)
        weight_dir = tempfile.mkdtemp(dir=tmp_path)
        weights = {}
        for name, s in solvers:
            filename = "weights.%s.caffemodel" % name
            weights[name] = os.path.join(weight_dir, filename)
            s.net.save(weights[name])
        return loss, acc, weights

    niter = 3
    style_solver = caffe.get_solver(solver(style_net(train=True)))
    style_solver.net.copy_from(weights)
    scratch_style_solver = caffe.get_solver(solver(style_net(train=True)))
    conv1_before = style_solver.net.params["conv1"][0].data.copy()
    fc8_before = style_solver.net.params["fc8_flickr"][0].data.copy()
    np.testing.assert_array_equal(conv1_before, imagenet_net.params["conv1"][0].data)
    solvers = [("pretrained", style_solver), ("scratch", scratch_style_solver)]
    loss, acc, finetuned = run_solvers(niter, solvers)
    assert np.all(np.isfinite(loss["pretrained"])) and np.all(np.isfinite(loss["scratch"]))
    np.testing.assert_array_equal(style_solver.net.params["conv1"][0].data, conv1_before)
    assert not np.array_equal(style_solver.net.params["fc8_flickr"][0].data, fc8_before)
    del style_solver, scratch_style_solver, solvers

    def eval_style_net(weights, test_iters=2):
        test_net = caffe.Net(style_net(train=False), weights, caffe.TEST)
        accuracy = 0
        for _ in range(test_iters):
            accuracy += test_net.forward()["acc"]
            by_hand = (test_net.blobs["fc8_flickr"].data.argmax(1)
                       == test_net.blobs["label"].data).mean()
            assert test_net.blobs["acc"].data == pytest.approx(by_hand)
        accuracy /= test_iters
        return test_net, accuracy

    test_net, accuracy = eval_style_net(finetuned["pretrained"])
    assert 0 <= accuracy <= 1
    np.testing.assert_array_equal(test_net.params["conv1"][0].data, conv1_before)

    end_to_end = caffe.get_solver(solver(style_net(train=True, learn_all=True)))
    end_to_end.net.copy_from(finetuned["pretrained"])
    run_solvers(1, [("end-to-end", end_to_end)])
    assert not np.array_equal(end_to_end.net.params["conv1"][0].data, conv1_before)


# -- pascal-multilabel-with-datalayer -------------------------------------------------
CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
           "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
           "sheep", "sofa", "train", "tvmonitor"]

# The notebook's data layer module, as a local file: a Python layer that reads a
# VOC-style folder (JPEGImages/, ImageSets/Main/<split>.txt, and, instead of the XML
# annotations, Annotations/<id>.txt with one class name a line).
DATALAYER = '''
import os
import cv2
import numpy as np
import caffe

CLASSES = %r


class SimpleTransformer:
    def __init__(self, mean=(128, 128, 128)):
        self.mean = np.array(mean, dtype=np.float32)
        self.scale = 1.0

    def preprocess(self, im):
        im = np.float32(im)
        im = im[:, :, ::-1]            # RGB -> BGR
        im -= self.mean
        im *= self.scale
        return im.transpose((2, 0, 1))


class BatchLoader:
    def __init__(self, params, result):
        self.batch_size = params["batch_size"]
        self.pascal_root = params["pascal_root"]
        self.im_shape = params["im_shape"]
        list_file = os.path.join(self.pascal_root, "ImageSets/Main", params["split"] + ".txt")
        self.indexlist = [line.rstrip("\\n") for line in open(list_file)]
        self._cur = 0
        self.transformer = SimpleTransformer()

    def load_next_image(self):
        if self._cur == len(self.indexlist):
            self._cur = 0
        index = self.indexlist[self._cur]
        rgb = cv2.imread(os.path.join(self.pascal_root, "JPEGImages", index + ".jpg"))[:, :, ::-1]
        im = cv2.resize(rgb, (self.im_shape[1], self.im_shape[0]))
        multilabel = np.zeros(20).astype(np.float32)
        for name in open(os.path.join(self.pascal_root, "Annotations", index + ".txt")):
            multilabel[CLASSES.index(name.strip())] = 1
        self._cur += 1
        return self.transformer.preprocess(im), multilabel


class PascalMultilabelDataLayerSync(caffe.Layer):
    def setup(self, bottom, top):
        self.top_names = ["data", "label"]
        params = eval(self.param_str)
        self.batch_size = params["batch_size"]
        self.batch_loader = BatchLoader(params, None)
        top[0].reshape(self.batch_size, 3, params["im_shape"][0], params["im_shape"][1])
        top[1].reshape(self.batch_size, 20)

    def forward(self, bottom, top):
        for itt in range(self.batch_size):
            im, multilabel = self.batch_loader.load_next_image()
            top[0].data[itt, ...] = im
            top[1].data[itt, ...] = multilabel

    def reshape(self, bottom, top):
        pass

    def backward(self, top, propagate_down, bottom):
        pass
''' % (CLASSES,)


class CaffeSolver:
    """The notebook's tools.CaffeSolver: a dict of solver fields written as prototxt."""

    def __init__(self, testnet_prototxt_path, trainnet_prototxt_path):
        self.sp = {"base_lr": "0.001", "momentum": "0.9", "test_iter": "100",
                   "test_interval": "250", "display": "25", "snapshot": "2500",
                   "snapshot_prefix": '"snapshot"', "lr_policy": '"fixed"', "gamma": "0.1",
                   "weight_decay": "0.0005", "train_net": '"%s"' % trainnet_prototxt_path,
                   "test_net": '"%s"' % testnet_prototxt_path, "max_iter": "100000",
                   "test_initialization": "false", "average_loss": "25", "iter_size": "1"}

    def write(self, filepath):
        with open(filepath, "w") as f:
            for key, value in sorted(self.sp.items()):
                f.write("%s: %s\n" % (key, value))


@pytest.fixture
def aliased_caffe():
    saved = {k: v for k, v in sys.modules.items() if k == "caffe" or k.startswith("caffe.")}
    caffe.alias()
    yield
    for key in [k for k in sys.modules if k == "caffe" or k.startswith("caffe.")]:
        del sys.modules[key]
    sys.modules.update(saved)
    sys.modules.pop("pascal_multilabel_datalayers", None)


def test_pascal_multilabel_with_datalayer(tmp_path, monkeypatch, aliased_caffe):
    rng = np.random.default_rng(8)
    pascal_root = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "ImageSets/Main", "Annotations"):
        (pascal_root / sub).mkdir(parents=True)
    ids = [f"2008_{i:06d}" for i in range(10)]
    truth = {}
    for index in ids:
        _write_jpeg(pascal_root / "JPEGImages" / f"{index}.jpg", rng, 60, 70)
        names = sorted(set(rng.choice(CLASSES, size=int(rng.integers(1, 4)))))
        (pascal_root / "Annotations" / f"{index}.txt").write_text("\n".join(names) + "\n")
        truth[index] = names
    (pascal_root / "ImageSets/Main/train.txt").write_text("\n".join(ids[:6]) + "\n")
    (pascal_root / "ImageSets/Main/val.txt").write_text("\n".join(ids[6:]) + "\n")
    layers_dir = tmp_path / "layers"
    layers_dir.mkdir()
    (layers_dir / "pascal_multilabel_datalayers.py").write_text(DATALAYER)
    monkeypatch.syspath_prepend(str(layers_dir))

    import caffe as aliased
    from caffe import layers as L, params as P   # noqa: F811  (as the notebook imports)
    assert aliased is caffe
    caffe.set_mode_gpu()
    caffe.set_device(0)

    def conv_relu(bottom, ks, nout, stride=1, pad=0, group=1):
        conv = L.Convolution(bottom, kernel_size=ks, stride=stride, num_output=WIDTH[nout],
                             pad=pad, group=group, weight_filler=dict(type="xavier"))
        return conv, L.ReLU(conv, in_place=True)

    def fc_relu(bottom, nout):
        fc = L.InnerProduct(bottom, num_output=WIDTH[nout], weight_filler=dict(type="xavier"))
        return fc, L.ReLU(fc, in_place=True)

    def max_pool(bottom, ks, stride=1):
        return L.Pooling(bottom, pool=P.Pooling.MAX, kernel_size=ks, stride=stride)

    def caffenet_multilabel(data_layer_params, datalayer):
        n = caffe.NetSpec()
        n.data, n.label = L.Python(module="pascal_multilabel_datalayers", layer=datalayer,
                                   ntop=2, param_str=str(data_layer_params))
        n.conv1, n.relu1 = conv_relu(n.data, 11, 96, stride=4)
        n.pool1 = max_pool(n.relu1, 3, stride=2)
        n.norm1 = L.LRN(n.pool1, local_size=5, alpha=1e-4, beta=0.75)
        n.conv2, n.relu2 = conv_relu(n.norm1, 5, 256, pad=2, group=2)
        n.pool2 = max_pool(n.relu2, 3, stride=2)
        n.norm2 = L.LRN(n.pool2, local_size=5, alpha=1e-4, beta=0.75)
        n.conv3, n.relu3 = conv_relu(n.norm2, 3, 384, pad=1)
        n.conv4, n.relu4 = conv_relu(n.relu3, 3, 384, pad=1, group=2)
        n.conv5, n.relu5 = conv_relu(n.relu4, 3, 256, pad=1, group=2)
        n.pool5 = max_pool(n.relu5, 3, stride=2)
        n.fc6, n.relu6 = fc_relu(n.pool5, 4096)
        n.drop6 = L.Dropout(n.relu6, in_place=True)
        n.fc7, n.relu7 = fc_relu(n.drop6, 4096)
        n.drop7 = L.Dropout(n.relu7, in_place=True)
        n.score = L.InnerProduct(n.drop7, num_output=20)
        n.loss = L.SigmoidCrossEntropyLoss(n.score, n.label)
        return str(n.to_proto())

    workdir = str(tmp_path / "pascal_multilabel_with_datalayer")
    os.makedirs(workdir)
    solverprototxt = CaffeSolver(trainnet_prototxt_path=os.path.join(workdir, "trainnet.prototxt"),
                                 testnet_prototxt_path=os.path.join(workdir, "valnet.prototxt"))
    solverprototxt.sp["display"] = "1"
    solverprototxt.sp["base_lr"] = "0.0001"
    solverprototxt.write(os.path.join(workdir, "solver.prototxt"))
    with open(os.path.join(workdir, "trainnet.prototxt"), "w") as f:
        data_layer_params = dict(batch_size=4, im_shape=[227, 227], split="train",
                                 pascal_root=str(pascal_root))
        f.write(caffenet_multilabel(data_layer_params, "PascalMultilabelDataLayerSync"))
    with open(os.path.join(workdir, "valnet.prototxt"), "w") as f:
        data_layer_params = dict(batch_size=4, im_shape=[227, 227], split="val",
                                 pascal_root=str(pascal_root))
        f.write(caffenet_multilabel(data_layer_params, "PascalMultilabelDataLayerSync"))
    try:
        solver = caffe.SGDSolver(os.path.join(workdir, "solver.prototxt"))
    finally:
        caffe.set_mode_cpu()
    pretrained = tmp_path / "caffenet.caffemodel"
    solver.net.save(str(pretrained))            # "pretrained" weights, by name
    solver.net.copy_from(str(pretrained))
    solver.test_nets[0].share_with(solver.net)
    solver.step(1)

    gtlist = solver.net.blobs["label"].data[0, ...].astype(int)
    assert [CLASSES[i] for i in np.where(gtlist)[0]] == truth[ids[0]]
    first = cv2.resize(cv2.imread(str(pascal_root / "JPEGImages" / f"{ids[0]}.jpg")),
                       (227, 227)).astype(np.float32) - 128
    np.testing.assert_allclose(solver.net.blobs["data"].data[0], first.transpose(2, 0, 1))

    def hamming_distance(gt, est):
        return sum([1 for (g, e) in zip(gt, est) if g == e]) / float(len(gt))

    def check_accuracy(net, num_batches, batch_size=4):
        acc = 0.0
        for t in range(num_batches):
            net.forward()
            gts = net.blobs["label"].data
            ests = net.blobs["score"].data > 0
            for gt, est in zip(gts, ests):
                acc += hamming_distance(gt, est)
        return acc / (num_batches * batch_size)

    for itt in range(2):
        solver.step(2)
        accuracy = check_accuracy(solver.test_nets[0], 1)
        scores = solver.test_nets[0].blobs["score"].data
        labels = solver.test_nets[0].blobs["label"].data
        assert accuracy == pytest.approx(((scores > 0) == labels).mean())
    test_net = solver.test_nets[0]
    np.testing.assert_array_equal(test_net.params["conv1"][0].data,
                                  solver.net.params["conv1"][0].data)   # shared
    estlist = test_net.blobs["score"].data[0, ...] > 0
    assert estlist.shape == (20,)


# -- Google's deep dream ----------------------------------------------------------------
DREAM_DEPLOY = """
name: "dreamnet"
input: "data"
input_shape { dim: 10 dim: 3 dim: 32 dim: 32 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 6 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.05 } bias_filler { type: "constant" value: 0.01 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 6 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
"""
DREAM_HEAD = """
layer { name: "fc" type: "InnerProduct" bottom: "conv2" top: "fc" inner_product_param { num_output: 10 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


@pytest.mark.parametrize("classifier_head", [False, True])
def test_deepdream(tmp_path, classifier_head):
    nd = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(9)
    net_fn = str(tmp_path / "deploy.prototxt")
    open(net_fn, "w").write(DREAM_DEPLOY + (DREAM_HEAD if classifier_head else ""))
    param_fn = _random_weights(net_fn, tmp_path / "dream.caffemodel", seed=5)
    model = caffe_pb2.NetParameter()
    text_format.Merge(open(net_fn).read(), model)
    model.force_backward = True
    open(str(tmp_path / "tmp.prototxt"), "w").write(str(model))
    net = caffe.Classifier(str(tmp_path / "tmp.prototxt"), param_fn,
                           mean=np.float32([104.0, 116.0, 122.0]),
                           channel_swap=(2, 1, 0))

    def preprocess(net, img):
        return np.float32(np.rollaxis(img, 2)[::-1]) - net.transformer.mean["data"]

    def deprocess(net, img):
        return np.dstack((img + net.transformer.mean["data"])[::-1])

    def objective_L2(dst):
        dst.diff[:] = dst.data

    def make_step(net, step_size=1.5, end="conv2", jitter=32, clip=True,
                  objective=objective_L2):
        src = net.blobs["data"]
        dst = net.blobs[end]
        ox, oy = np.random.randint(-jitter, jitter + 1, 2)
        src.data[0] = np.roll(np.roll(src.data[0], ox, -1), oy, -2)
        net.forward(end=end)
        objective(dst)
        net.backward(start=end)
        g = src.diff[0]
        src.data[:] += step_size / np.abs(g).mean() * g
        src.data[0] = np.roll(np.roll(src.data[0], -ox, -1), -oy, -2)
        if clip:
            bias = net.transformer.mean["data"]
            src.data[:] = np.clip(src.data, -bias, 255 - bias)

    def deepdream(net, base_img, iter_n=3, octave_n=2, octave_scale=1.4, end="conv2",
                  clip=True, **step_params):
        octaves = [preprocess(net, base_img)]
        for i in range(octave_n - 1):
            octaves.append(nd.zoom(octaves[-1], (1, 1.0 / octave_scale, 1.0 / octave_scale),
                                   order=1))
        src = net.blobs["data"]
        detail = np.zeros_like(octaves[-1])
        for octave, octave_base in enumerate(octaves[::-1]):
            h, w = octave_base.shape[-2:]
            if octave > 0:
                h1, w1 = detail.shape[-2:]
                detail = nd.zoom(detail, (1, 1.0 * h / h1, 1.0 * w / w1), order=1)
            src.reshape(1, 3, h, w)
            src.data[0] = octave_base + detail
            for i in range(iter_n):
                make_step(net, end=end, clip=clip, **step_params)
                vis = deprocess(net, src.data[0])
                if not clip:
                    vis = vis * (255.0 / np.percentile(vis, 99.98))
            detail = src.data[0] - octave_base
        return deprocess(net, src.data[0])

    img = np.float32(rng.random((40, 44, 3)) * 255)

    # one step, checked against torch autograd of 0.5 * |conv2|^2 (no jitter); end is
    # the layer conv2, so its top holds the values before the in-place relu2
    src = net.blobs["data"]
    src.reshape(1, 3, 40, 44)
    src.data[0] = preprocess(net, img)
    x = torch.tensor(src.data.copy(), requires_grad=True)
    w1, b1 = (torch.tensor(p.data) for p in net.params["conv1"])
    w2, b2 = (torch.tensor(p.data) for p in net.params["conv2"])
    hidden = torch.nn.functional.max_pool2d(torch.relu(torch.conv2d(x, w1, b1, padding=1)), 2)
    out = torch.conv2d(hidden, w2, b2, padding=1)      # layer conv2: relu2 comes after
    (0.5 * (out ** 2).sum()).backward()
    before = src.data.copy()
    make_step(net, jitter=0, step_size=1.0)
    g = x.grad.numpy()
    expected = np.clip(before + g / np.abs(g[0]).mean(), -net.transformer.mean["data"],
                       255 - net.transformer.mean["data"])
    np.testing.assert_allclose(src.data, expected, rtol=1e-4, atol=1e-3)

    def energy(image):
        net.blobs["data"].reshape(1, 3, *image.shape[:2])
        net.blobs["data"].data[0] = preprocess(net, image)
        net.forward(end="conv2")
        return float((net.blobs["conv2"].data ** 2).sum())

    np.random.seed(0)
    frame = deepdream(net, img)
    assert frame.shape == img.shape
    assert energy(frame) > energy(img)                 # the dream amplified conv2
    frame = deepdream(net, img, end="conv1", octave_n=1, iter_n=2, jitter=4)
    assert frame.shape == img.shape
