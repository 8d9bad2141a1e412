"""RNN, LSTM and LSTMUnit against numpy references, state rules and error paths."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import protonet
from protonet import caffe_pb2
from protonet.io.text import parse_text
from protonet.layers.recurrent import LSTMUnitFunction, lstm_unit

RNG = np.random.default_rng(7)


# -- numpy references -----------------------------------------------------------
def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def lstm_reference(x, cont, w_x, b, w_h, static=None, w_s=None, h0=None, c0=None):
    """Outputs and final (h, c) of Caffe's LSTM, in float64."""
    steps, n = cont.shape
    hidden = w_h.shape[1]
    h = np.zeros((n, hidden)) if h0 is None else h0
    c = np.zeros((n, hidden)) if c0 is None else c0
    projected = x.reshape(steps, n, -1) @ w_x.T + b
    outputs = []
    for t in range(steps):
        keep = cont[t][:, None]
        gates = (keep * h) @ w_h.T + projected[t]
        if static is not None:
            gates = gates + static.reshape(n, -1) @ w_s.T
        i, f, o, g = np.split(gates, 4, axis=1)
        c = keep * sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        outputs.append(h)
    return np.stack(outputs), h, c


def rnn_reference(x, cont, w_xh, b_h, w_hh, w_ho, b_o, static=None, w_s=None):
    steps, n = cont.shape
    h = np.zeros((n, w_hh.shape[0]))
    outputs = []
    for t in range(steps):
        total = (cont[t][:, None] * h) @ w_hh.T + x[t].reshape(n, -1) @ w_xh.T + b_h
        if static is not None:
            total = total + static.reshape(n, -1) @ w_s.T
        h = np.tanh(total)
        outputs.append(np.tanh(h @ w_ho.T + b_o))
    return np.stack(outputs)


# -- nets -------------------------------------------------------------------------
def recurrent_net(kind, x_shape, hidden, *, static_shape=None, expose=False,
                  phase=protonet.TRAIN, extra=""):
    steps, n = x_shape[:2]
    dims = lambda shape: " ".join(f"dim: {d}" for d in shape)  # noqa: E731
    inputs = [("x", x_shape), ("cont", (steps, n))]
    if static_shape is not None:
        inputs.append(("xs", static_shape))
    if expose:
        inputs += [(name, (1, n, hidden)) for name in ("h0", "c0")[:2 if kind == "LSTM" else 1]]
    tops = ["y"] + ([f"{s}T" for s in ("h", "c")[:2 if kind == "LSTM" else 1]] if expose else [])
    text = "force_backward: true\n" + "".join(
        f'layer {{ name: "in_{name}" type: "Input" top: "{name}" '
        f'input_param {{ shape {{ {dims(shape)} }} }} }}\n' for name, shape in inputs)
    text += (f'layer {{ name: "rec" type: "{kind}" '
             + "".join(f'bottom: "{name}" ' for name, _ in inputs)
             + "".join(f'top: "{t}" ' for t in tops)
             + f'recurrent_param {{ num_output: {hidden} expose_hidden: {str(expose).lower()} '
             'weight_filler { type: "gaussian" std: 0.5 } '
             f'bias_filler {{ type: "gaussian" std: 0.5 }} {extra} }} }}\n')
    return protonet.Net(parse_text(text, caffe_pb2.NetParameter()), phase)


def params(net):
    return [p.data.astype(np.float64) for p in net.params["rec"]]


def run(net, **inputs):
    for name, value in inputs.items():
        net.blobs[name].data[...] = value
    return {k: v.astype(np.float64) for k, v in net.forward().items()}


def sequences(steps, n, *feature):
    x = RNG.normal(size=(steps, n, *feature)).astype(np.float32)
    cont = np.ones((steps, n), np.float32)
    cont[0] = 0
    return x, cont


# -- LSTM and RNN forward ----------------------------------------------------------
def test_lstm_param_shapes_and_forward_match_reference():
    net = recurrent_net("LSTM", (5, 3, 2, 2), 4)
    assert [p.data.shape for p in net.params["rec"]] == [(16, 4), (16,), (16, 4)]
    assert net.blobs["y"].shape == (5, 3, 4)
    x, cont = sequences(5, 3, 2, 2)
    cont[3, 1] = 0
    expected, _, _ = lstm_reference(x.astype(np.float64), cont, *params(net))
    np.testing.assert_allclose(run(net, x=x, cont=cont)["y"], expected, atol=2e-6)


def test_lstm_static_input():
    net = recurrent_net("LSTM", (4, 2, 3), 3, static_shape=(2, 2, 3))
    assert [p.data.shape for p in net.params["rec"]] == [(12, 3), (12,), (12, 6), (12, 3)]
    x, cont = sequences(4, 2, 3)
    xs = RNG.normal(size=(2, 2, 3)).astype(np.float32)
    w_x, b, w_s, w_h = params(net)
    expected, _, _ = lstm_reference(x.astype(np.float64), cont, w_x, b, w_h, xs, w_s)
    np.testing.assert_allclose(run(net, x=x, cont=cont, xs=xs)["y"], expected, atol=2e-6)


def test_rnn_forward_and_static_input_match_reference():
    net = recurrent_net("RNN", (4, 2, 3), 5, static_shape=(2, 4))
    assert [p.data.shape for p in net.params["rec"]] == [
        (5, 3), (5,), (5, 4), (5, 5), (5, 5), (5,)]
    x, cont = sequences(4, 2, 3)
    cont[2, 0] = 0
    xs = RNG.normal(size=(2, 4)).astype(np.float32)
    w_xh, b_h, w_s, w_hh, w_ho, b_o = params(net)
    expected = rnn_reference(x, cont, w_xh, b_h, w_hh, w_ho, b_o, xs, w_s)
    np.testing.assert_allclose(run(net, x=x, cont=cont, xs=xs)["y"], expected, atol=2e-6)


def test_default_fillers_are_zero_and_bias_filler_is_used():
    text = ('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 1 '
            'dim: 3 } } } layer { name: "c" type: "Input" top: "c" input_param { shape { '
            'dim: 2 dim: 1 } } } layer { name: "rec" type: "RNN" bottom: "x" bottom: "c" '
            'top: "y" recurrent_param { num_output: 2 bias_filler { type: "constant" '
            'value: 0.5 } } }')
    net = protonet.Net(parse_text(text, caffe_pb2.NetParameter()), protonet.TEST)
    values = [p.data for p in net.params["rec"]]
    for weight in (values[0], values[2], values[3]):
        assert not weight.any()
    np.testing.assert_array_equal(values[1], 0.5)
    np.testing.assert_array_equal(values[4], 0.5)


# -- state rules ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_cont_zero_restarts_the_sequence(kind):
    net = recurrent_net(kind, (6, 2, 3), 4)
    x, cont = sequences(6, 2, 3)
    cont[3] = 0
    whole = run(net, x=x, cont=cont)["y"]
    fresh = recurrent_net(kind, (3, 2, 3), 4)
    for mine, theirs in zip(fresh.params["rec"], net.params["rec"]):
        mine.data[...] = theirs.data
    tail = run(fresh, x=x[3:], cont=cont[3:])["y"]
    np.testing.assert_allclose(whole[3:], tail, atol=1e-6)


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_state_carries_between_forward_passes(kind):
    """Without expose_hidden, one step at a time equals the whole sequence (Caffe's test)."""
    x, cont = sequences(4, 3, 2)
    whole_net = recurrent_net(kind, (4, 3, 2), 3)
    whole = run(whole_net, x=x, cont=cont)["y"]
    step_net = recurrent_net(kind, (1, 3, 2), 3)
    for mine, theirs in zip(step_net.params["rec"], whole_net.params["rec"]):
        mine.data[...] = theirs.data
    steps = [run(step_net, x=x[t:t + 1], cont=cont[t:t + 1])["y"][0] for t in range(4)]
    np.testing.assert_allclose(np.stack(steps), whole, atol=1e-6)
    restarted = [run(step_net, x=x[t:t + 1], cont=np.zeros((1, 3), np.float32))["y"][0]
                 for t in range(2)]
    np.testing.assert_allclose(restarted[0], whole[0], atol=1e-6)
    assert np.abs(restarted[1] - whole[1]).max() > 1e-4


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_expose_hidden_round_trip(kind):
    """Two chunks with the final state fed back equal one long run."""
    long_net = recurrent_net(kind, (6, 2, 3), 4, expose=True)
    chunk_net = recurrent_net(kind, (3, 2, 3), 4, expose=True)
    for mine, theirs in zip(chunk_net.params["rec"], long_net.params["rec"]):
        mine.data[...] = theirs.data
    x, cont = sequences(6, 2, 3)
    names = ["h0", "c0"][:len(long_net.outputs) - 1]
    start = {name: RNG.normal(size=(1, 2, 4)).astype(np.float32) for name in names}
    cont[0] = 1                      # continue from the given initial state
    whole = run(long_net, x=x, cont=cont, **start)
    first = run(chunk_net, x=x[:3], cont=cont[:3], **start)
    carried = {name: first[name[0] + "T"].astype(np.float32) for name in names}
    second = run(chunk_net, x=x[3:], cont=cont[3:], **carried)
    np.testing.assert_allclose(np.concatenate([first["y"], second["y"]]), whole["y"],
                               atol=1e-6)
    for name in names:
        np.testing.assert_allclose(second[name[0] + "T"], whole[name[0] + "T"], atol=1e-6)


def test_expose_hidden_matches_reference_with_initial_state():
    net = recurrent_net("LSTM", (3, 2, 3), 2, expose=True)
    x, cont = sequences(3, 2, 3)
    cont[0] = [1, 0]
    h0, c0 = (RNG.normal(size=(1, 2, 2)).astype(np.float32) for _ in range(2))
    out = run(net, x=x, cont=cont, h0=h0, c0=c0)
    expected, h, c = lstm_reference(x.astype(np.float64), cont, *params(net),
                                     h0=h0[0], c0=c0[0])
    np.testing.assert_allclose(out["y"], expected, atol=2e-6)
    np.testing.assert_allclose(out["hT"][0], h, atol=2e-6)
    np.testing.assert_allclose(out["cT"][0], c, atol=2e-6)


# -- gradients --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_gradcheck_through_time_with_static_input(kind):
    net = recurrent_net(kind, (3, 2, 2), 2, static_shape=(2, 3))
    layer = net.layer_dict["rec"].module.double()
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    xs = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    cont = torch.tensor([[0, 0], [1, 1], [1, 0]], dtype=torch.float64)

    def run_layer(x, xs, *weights):
        layer.carried = None
        return torch.func.functional_call(
            layer, {f"blobs.{i}": w for i, w in enumerate(weights)}, (x, cont, xs))

    weights = [p.detach().clone().requires_grad_(True) for p in layer.blobs]
    assert torch.autograd.gradcheck(run_layer, (x, xs, *weights))


def test_no_gradient_reaches_cont_or_initial_states():
    net = recurrent_net("LSTM", (3, 2, 3), 2, expose=True)
    x, cont = sequences(3, 2, 3)
    run(net, x=x, cont=cont)
    grads = net.backward(y=np.ones((3, 2, 2), np.float32))
    assert grads["x"].any()
    for name in ("cont", "h0", "c0"):
        assert not grads[name].any()
    layer = net.layer_dict["rec"].module
    assert [layer.allow_force_backward(i) for i in range(4)] == [True, False, False, False]


# -- LSTMUnit -------------------------------------------------------------------------
def unit_net(n=3, hidden=2):
    text = "force_backward: true\n" + "".join(
        f'layer {{ name: "in_{name}" type: "Input" top: "{name}" input_param {{ shape {{ '
        + " ".join(f"dim: {d}" for d in shape) + " } } }\n"
        for name, shape in [("c_prev", (1, n, hidden)), ("gates", (1, n, 4 * hidden)),
                            ("cont", (1, n))])
    text += ('layer { name: "unit" type: "LSTMUnit" bottom: "c_prev" bottom: "gates" '
             'bottom: "cont" top: "c" top: "h" }')
    return protonet.Net(parse_text(text, caffe_pb2.NetParameter()), protonet.TRAIN)


def unit_reference(c_prev, gates, cont, c_diff, h_diff):
    """Caffe's CPU LSTMUnit forward and backward, written out in numpy."""
    i, f, o, g = np.split(gates, 4, axis=-1)
    i, o, g = sigmoid(i), sigmoid(o), np.tanh(g)
    f = cont[..., None] * sigmoid(f)
    c = f * c_prev + i * g
    h = o * np.tanh(c)
    c_term = c_diff + h_diff * o * (1 - np.tanh(c) ** 2)
    gates_diff = np.concatenate([c_term * g * i * (1 - i), c_term * c_prev * f * (1 - f),
                                 h_diff * np.tanh(c) * o * (1 - o), c_term * i * (1 - g * g)],
                                axis=-1)
    return c, h, c_term * f, gates_diff


def test_lstm_unit_forward_and_caffe_backward():
    net = unit_net()
    assert net.blobs["c"].shape == net.blobs["h"].shape == (1, 3, 2)
    c_prev = RNG.normal(size=(1, 3, 2)).astype(np.float32)
    gates = RNG.normal(size=(1, 3, 8)).astype(np.float32)
    cont = np.array([[0.0, 1.0, 0.5]], np.float32)      # 0.5: Caffe's CPU quirk applies
    c_diff, h_diff = (RNG.normal(size=(1, 3, 2)).astype(np.float32) for _ in range(2))
    out = run(net, c_prev=c_prev, gates=gates, cont=cont)
    grads = net.backward(c=c_diff, h=h_diff)
    c, h, c_prev_diff, gates_diff = unit_reference(
        *(a.astype(np.float64) for a in (c_prev, gates, cont, c_diff, h_diff)))
    np.testing.assert_allclose(out["c"], c, atol=2e-6)
    np.testing.assert_allclose(out["h"], h, atol=2e-6)
    np.testing.assert_allclose(grads["c_prev"], c_prev_diff, atol=2e-6)
    np.testing.assert_allclose(grads["gates"], gates_diff, atol=2e-6)
    assert not grads["cont"].any()


def test_lstm_unit_gradcheck_with_binary_cont():
    c_prev = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    gates = torch.randn(2, 12, dtype=torch.float64, requires_grad=True)
    cont = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda c, g: lstm_unit(c, g, cont), (c_prev, gates))
    assert LSTMUnitFunction.apply(c_prev, gates, cont)[0].requires_grad


@pytest.mark.parametrize("shapes, message", [
    ([(1, 3, 2), (1, 3, 8), (1, 3, 1)], "3, 3 and 2 axes"),
    ([(2, 3, 2), (2, 3, 8), (2, 3)], "first axis of 1"),
    ([(1, 3, 2), (1, 4, 8), (1, 3)], "number of streams"),
    ([(1, 3, 2), (1, 3, 6), (1, 3)], "4 x 2 = 8"),
])
def test_lstm_unit_shape_errors(shapes, message):
    text = "".join(f'layer {{ name: "in{k}" type: "Input" top: "b{k}" input_param {{ shape {{ '
                   + " ".join(f"dim: {d}" for d in s) + " } } }\n"
                   for k, s in enumerate(shapes))
    text += ('layer { name: "unit" type: "LSTMUnit" bottom: "b0" bottom: "b1" bottom: "b2" '
             'top: "c" top: "h" }')
    with pytest.raises(protonet.ShapeError, match=message) as err:
        protonet.Net(parse_text(text, caffe_pb2.NetParameter()), protonet.TEST)
    assert "'unit' (LSTMUnit)" in str(err.value)


# -- shapes, options and errors ------------------------------------------------------------
def test_exposed_state_tops_and_reshape_keeps_state_shape():
    net = recurrent_net("LSTM", (4, 2, 3), 5, expose=True)
    assert net.blobs["y"].shape == (4, 2, 5)
    assert net.blobs["hT"].shape == net.blobs["cT"].shape == (1, 2, 5)
    layer = net.layer_dict["rec"].module
    assert layer.reshape([(4, 7, 3), (4, 7), (1, 7, 5), (1, 7, 5)]) == [
        (4, 7, 5), (1, 7, 5), (1, 7, 5)]


def test_batch_size_change_restarts_carried_state():
    net = recurrent_net("RNN", (2, 2, 3), 2)
    layer = net.layer_dict["rec"].module
    x = torch.randn(2, 2, 3)
    layer(x, torch.ones(2, 2))
    assert layer.carried[0].shape == (2, 2)
    y = layer(torch.randn(2, 5, 3), torch.ones(2, 5))
    assert y.shape == (2, 5, 2) and layer.carried[0].shape == (5, 2)


def test_debug_info_logs_each_step(caplog):
    net = recurrent_net("LSTM", (2, 1, 3), 2, extra="debug_info: true")
    with caplog.at_level(logging.INFO, logger="protonet"):
        net.forward()
    steps = [r.getMessage() for r in caplog.records if "[rec] step" in r.getMessage()]
    assert len(steps) == 2 and "h_1" in steps[0] and "c_2" in steps[1]


def build_error(text):
    with pytest.raises(protonet.NetError) as err:
        protonet.Net(parse_text(text, caffe_pb2.NetParameter()), protonet.TEST)
    assert "'rec' (" in str(err.value)
    return str(err.value)


def two_inputs(x_shape, cont_shape, layer):
    dims = lambda shape: " ".join(f"dim: {d}" for d in shape)  # noqa: E731
    return (f'layer {{ name: "a" type: "Input" top: "x" input_param {{ shape {{ '
            f'{dims(x_shape)} }} }} }} layer {{ name: "b" type: "Input" top: "c" '
            f'input_param {{ shape {{ {dims(cont_shape)} }} }} }} {layer}')


@pytest.mark.parametrize("x_shape, cont_shape, param, message", [
    ((3, 2, 4), (3, 2), "num_output: 0", "num_output must be positive"),
    ((3,), (3, 2), "num_output: 2", "at least 2 axes"),
    ((3, 2, 4), (3, 2, 1), "num_output: 2", r"cont must be \(time steps, streams\)"),
    ((3, 2, 4), (2, 2), "num_output: 2", r"cont must be"),
])
def test_recurrent_param_and_shape_errors(x_shape, cont_shape, param, message):
    layer = (f'layer {{ name: "rec" type: "LSTM" bottom: "x" bottom: "c" top: "y" '
             f'recurrent_param {{ {param} }} }}')
    assert __import__("re").search(message, build_error(two_inputs(x_shape, cont_shape, layer)))


def test_blob_count_follows_expose_hidden():
    layer = ('layer { name: "rec" type: "LSTM" bottom: "x" bottom: "c" top: "y" '
             'recurrent_param { num_output: 2 expose_hidden: true } }')
    assert "at least 4 bottom" in build_error(two_inputs((3, 2, 4), (3, 2), layer))


def test_wrong_static_and_state_shapes():
    net = recurrent_net("LSTM", (3, 2, 4), 2, static_shape=(2, 5), expose=True)
    layer = net.layer_dict["rec"].module
    good = [(3, 2, 4), (3, 2), (2, 5), (1, 2, 2), (1, 2, 2)]
    cases = [(2, (3, 2, 5)), (2, (2, 6)), (3, (1, 2, 3)), (0, (4, 2, 4)), (0, (3, 2, 5))]
    messages = ["static input must be", "params were made for 5", "initial state h_0",
                "time steps changed", "params were made for 4"]
    for (index, shape), message in zip(cases, messages):
        shapes = list(good)
        shapes[index] = shape
        with pytest.raises(protonet.ShapeError, match=message):
            layer.reshape(shapes)
