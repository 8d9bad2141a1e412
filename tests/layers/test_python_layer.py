"""Python layers (pycaffe's contract) and the examples of docs/extending.md."""
from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import protonet
from protonet import caffe_pb2
from protonet.io.text import parse_text
from protonet.layers import registry
from protonet.layers.python_layer import NumpyBlob

DOC = Path(__file__).resolve().parents[2] / "docs" / "extending.md"


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Write a module into tmp_path, importable by name for this test only."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written = []

    def write(name: str, source: str) -> None:
        (tmp_path / f"{name}.py").write_text(source)
        written.append(name)

    yield write
    for name in written:
        sys.modules.pop(name, None)


def build(text: str, phase=protonet.TRAIN):
    return protonet.Net(parse_text(text, caffe_pb2.NetParameter()), phase)


def python_layer(name, bottoms, tops, cls, module="user_layers", param_str="", extra=""):
    return (f'layer {{ name: "{name}" type: "Python" '
            + "".join(f'bottom: "{b}" ' for b in bottoms)
            + "".join(f'top: "{t}" ' for t in tops)
            + f'{extra} python_param {{ module: "{module}" layer: "{cls}" '
              f'param_str: "{param_str}" }} }}\n')


def data_input(name="data", shape=(2, 3)):
    dims = " ".join(f"dim: {d}" for d in shape)
    return f'layer {{ name: "in_{name}" type: "Input" top: "{name}" ' \
           f'input_param {{ shape {{ {dims} }} }} }}\n'


USER_LAYERS = textwrap.dedent('''
    import numpy as np
    from protonet.layers.python_layer import PythonLayer

    class Times(PythonLayer):
        def setup(self, bottom, top):
            self.k = float(self.param_str or 10)
        def reshape(self, bottom, top):
            top[0].reshape(*bottom[0].data.shape)
        def forward(self, bottom, top):
            top[0].data[...] = self.k * bottom[0].data
        def backward(self, top, propagate_down, bottom):
            bottom[0].diff[...] = self.k * top[0].diff

    class Weighted(PythonLayer):
        def setup(self, bottom, top):
            self.blobs.add_blob(1)
            self.blobs[0].data[0] = 3
        def reshape(self, bottom, top):
            top[0].reshape(*bottom[0].data.shape)
        def forward(self, bottom, top):
            top[0].data[...] = self.blobs[0].data[0] * bottom[0].data
        def backward(self, top, propagate_down, bottom):
            self.blobs[0].diff[0] = np.sum(top[0].diff * bottom[0].data)
            if propagate_down[0]:
                bottom[0].diff[...] = self.blobs[0].data[0] * top[0].diff

    class Phase(PythonLayer):
        def reshape(self, bottom, top):
            top[0].reshape()
        def forward(self, bottom, top):
            top[0].data[()] = self.phase

    class SumAndRecord(PythonLayer):
        """Two tops; records what backward was told."""
        def reshape(self, bottom, top):
            top[0].reshape(*bottom[0].shape)
            top[1].reshape(bottom[0].num, 1)
        def forward(self, bottom, top):
            top[0].data[...] = bottom[0].data + bottom[1].data
            top[1].data[:, 0] = bottom[0].data.reshape(bottom[0].num, -1).sum(axis=1)
        def backward(self, top, propagate_down, bottom):
            self.propagate_down = list(propagate_down)
            self.top_data = top[1].data.copy()
            for i in range(2):
                if propagate_down[i]:
                    bottom[i].diff[...] = top[0].diff
            if propagate_down[0]:
                bottom[0].diff[...] += top[1].diff

    class Counter(PythonLayer):
        """A data layer in pycaffe's style: tops shaped in setup, reshape empty."""
        def setup(self, bottom, top):
            top[0].reshape(2, 2)
        def reshape(self, bottom, top):
            pass
        def forward(self, bottom, top):
            top[0].data[...] += 1

    class Broken(PythonLayer):
        def setup(self, bottom, top):
            raise RuntimeError("bad param_str " + repr(self.param_str))

    class FailsInForward(Times):
        def forward(self, bottom, top):
            raise ValueError("boom")

    class NotALayer:
        pass
''')


# -- pycaffe's contract ---------------------------------------------------------------
def test_chain_forward_backward(user_module):
    """pycaffe's own test: three x10 layers give 1000 x, and 1000 x the diff back."""
    user_module("user_layers", USER_LAYERS)
    net = build("force_backward: true\n" + data_input(shape=(4, 3, 2))
                + python_layer("one", ["data"], ["one"], "Times")
                + python_layer("two", ["one"], ["two"], "Times")
                + python_layer("three", ["two"], ["three"], "Times", param_str="2"))
    x = np.random.default_rng(0).normal(size=(4, 3, 2)).astype(np.float32)
    net.blobs["data"].data[...] = x
    np.testing.assert_allclose(net.forward()["three"], 200 * x, rtol=1e-6)
    grads = net.backward(three=np.full((4, 3, 2), 7, np.float32))
    np.testing.assert_allclose(grads["data"], 1400, rtol=1e-6)


def test_param_blob_gradient_and_caffemodel_round_trip(user_module, tmp_path):
    user_module("user_layers", USER_LAYERS)
    text = "force_backward: true\n" + data_input() + python_layer(
        "w", ["data"], ["out"], "Weighted")
    net = build(text)
    assert [p.data.tolist() for p in net.params["w"]] == [[3.0]]
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    net.blobs["data"].data[...] = x
    np.testing.assert_allclose(net.forward()["out"], 3 * x)
    grads = net.backward(out=np.ones((2, 3), np.float32))
    np.testing.assert_allclose(grads["data"], 3)
    np.testing.assert_allclose(net.params["w"][0].diff, [15])
    net.params["w"][0].data[...] = -2
    np.testing.assert_allclose(net.forward()["out"], -2 * x)
    path = str(tmp_path / "w.caffemodel")
    net.save(path)
    copy = protonet.Net(parse_text(text, caffe_pb2.NetParameter()), path, protonet.TEST)
    np.testing.assert_allclose(copy.params["w"][0].data, [-2])


def test_phase_attribute_and_scalar_top(user_module):
    user_module("user_layers", USER_LAYERS)
    for phase in (protonet.TRAIN, protonet.TEST):
        net = build(python_layer("p", [], ["phase"], "Phase"), phase)
        assert net.blobs["phase"].shape == ()
        assert net.forward()["phase"] == phase


def test_two_tops_propagate_down_and_top_data_in_backward(user_module):
    user_module("user_layers", USER_LAYERS)
    net = build(data_input("a") + data_input("b")
                + 'layer { name: "w" type: "Scale" bottom: "a" top: "a2" '
                  'param { lr_mult: 1 } scale_param { bias_term: false } }\n'
                + python_layer("s", ["a2", "b"], ["sum", "rowsum"], "SumAndRecord",
                               extra="loss_weight: 1 loss_weight: 1"))
    assert net.blobs["sum"].shape == (2, 3) and net.blobs["rowsum"].shape == (2, 1)
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = net.forward(a=a, b=np.ones((2, 3), np.float32))
    np.testing.assert_allclose(out["rowsum"][:, 0], [3, 12])
    net.backward(sum=np.ones((2, 3), np.float32), rowsum=np.array([[1], [2]], np.float32))
    user = net.layer_dict["s"].module.user
    assert user.propagate_down == [True, False]
    np.testing.assert_allclose(user.top_data[:, 0], [3, 12])
    np.testing.assert_allclose(net.blobs["a2"].diff, [[2, 2, 2], [3, 3, 3]])


def test_tops_persist_between_calls(user_module):
    user_module("user_layers", USER_LAYERS)
    net = build(python_layer("count", [], ["n"], "Counter"))
    assert net.blobs["n"].shape == (2, 2)
    net.forward()
    np.testing.assert_array_equal(net.forward()["n"], np.full((2, 2), 2))


def test_reshape_follows_new_input_shape(user_module):
    user_module("user_layers", USER_LAYERS)
    net = build(data_input() + python_layer("t", ["data"], ["out"], "Times"))
    net.blobs["data"].reshape(5, 4)
    net.reshape()
    assert net.module.blob_shapes[net.module.blob_index["out"]] == (5, 4)
    net.blobs["data"].data[...] = 1
    assert net.forward()["out"].shape == (5, 4)


def test_numpy_blob_accessors():
    blob = NumpyBlob(np.zeros((2, 3), np.float32))
    assert (blob.num, blob.channels, blob.height, blob.width, blob.count) == (2, 3, 1, 1, 6)
    blob.reshape(1, 2, 3, 4)
    assert blob.shape == (1, 2, 3, 4) and blob.diff.shape == (1, 2, 3, 4)
    assert blob.data.dtype == np.float32 and blob.width == 4
    with pytest.raises(ValueError, match="negative"):
        blob.reshape(-1)


# -- errors -------------------------------------------------------------------------------
@pytest.mark.parametrize("module, cls, message", [
    ("no_such_module_xyz", "Times", "cannot import module 'no_such_module_xyz' for class "
                                    "'Times'.*must be importable"),
    ("user_layers", "Tmes", "has no class 'Tmes'.*did you mean 'Times'"),
    ("user_layers", "NotALayer", "user_layers.NotALayer must be a class derived from"),
    ("user_layers", "Broken", r"user_layers.Broken.setup\(\) raised RuntimeError: "
                              "bad param_str 'x'"),
    ("", "Times", "needs both 'module' and 'layer'"),
])
def test_build_errors_name_layer_module_and_class(user_module, module, cls, message):
    user_module("user_layers", USER_LAYERS)
    with pytest.raises(protonet.NetError, match=message) as err:
        build(data_input() + python_layer("py", ["data"], ["out"], cls, module, "x"))
    assert str(err.value).startswith("layer 'py' (Python): ")


def test_module_that_fails_to_import(user_module):
    user_module("user_layers", "raise ImportError('missing dependency')\n")
    user_module("syntax_layers", "def broken(:\n")
    with pytest.raises(protonet.NetError, match="missing dependency"):
        build(data_input() + python_layer("py", ["data"], ["out"], "Times"))
    with pytest.raises(protonet.NetError, match="importing module 'syntax_layers'.*SyntaxError"):
        build(data_input() + python_layer("py", ["data"], ["out"], "Times", "syntax_layers"))


def test_exception_in_forward(user_module):
    user_module("user_layers", USER_LAYERS)
    net = build(data_input() + python_layer("py", ["data"], ["out"], "FailsInForward"))
    with pytest.raises(protonet.NetError, match=r"'py'.*FailsInForward.forward\(\) raised "
                                                r"ValueError: boom") as err:
        net.forward()
    assert isinstance(err.value.__cause__, ValueError)


# -- the examples of docs/extending.md ----------------------------------------------------
def doc_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), re.S)


def doc_modules() -> list[tuple[str, str]]:
    """The doc's python blocks that are modules: (name from '# name.py', source)."""
    found = []
    for block in doc_blocks("python"):
        header = re.match(r"# (\w+)\.py\n", block)
        if header:
            found.append((header.group(1), block))
    return found


@pytest.fixture
def private_registry(monkeypatch):
    """Types registered during the test are gone after it."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_doc_registered_layer_types(user_module, private_registry):
    (name, source), _ = doc_modules()
    user_module(name, source)
    __import__(name)
    assert {"GradientClip", "ScalarScale"} <= set(protonet.layers.registered_types())
    net = build(doc_blocks("prototxt")[0])
    x = np.array([[1, -2, 3], [4, 5, -6]], np.float32)
    np.testing.assert_array_equal(net.forward(data=x)["out"], x)
    top_diff = np.array([[0.1, -3, 0.4], [2, -0.2, 0.6]], np.float32)
    grads = net.backward(out=top_diff)
    np.testing.assert_allclose(grads["data"], np.clip(top_diff, -0.5, 0.5))
    np.testing.assert_allclose(net.params["scale"][0].diff, [np.sum(top_diff * x)], rtol=1e-6)
    bad = doc_blocks("prototxt")[0].replace('"0.5"', '"-1"')
    with pytest.raises(protonet.NetError, match="'clip' .GradientClip.: the limit must be"):
        build(bad)


def test_doc_python_layer(user_module):
    _, (name, source) = doc_modules()
    user_module(name, source)
    net = build(doc_blocks("prototxt")[1])
    rng = np.random.default_rng(3)
    a, b = (rng.normal(size=(4, 3)).astype(np.float32) for _ in range(2))
    loss = net.forward(a=a, b=b)["loss"]
    np.testing.assert_allclose(loss, [0.5 * np.sum((a - b) ** 2) / 4 / 2], rtol=1e-5)
    grads = net.backward()
    np.testing.assert_allclose(grads["a"], 0.5 * (a - b) / 4, rtol=1e-5)
    np.testing.assert_allclose(grads["b"], -0.5 * (a - b) / 4, rtol=1e-5)
