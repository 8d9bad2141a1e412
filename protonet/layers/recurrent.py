"""Recurrent layers: RNN, LSTM and the LSTMUnit cell they are built from.

Caffe runs RNN and LSTM by unrolling an internal net over the T time steps of the
input. Here each step is a few torch ops in a Python loop, with the same param blobs
(same order and shapes, so caffemodels load unchanged) and the same rules:

- bottoms are x (T x N x ...), cont (T x N), an optional static input (N x ...) and,
  with `expose_hidden`, the initial states; `cont[t]` multiplies the state carried
  into step t, so 0 starts a new sequence;
- without `expose_hidden`, the final state of one forward pass is the initial state of
  the next (zeros at first), as Caffe copies it between passes;
- gradients never cross forward passes: nothing flows to cont, to the initial-state
  bottoms or from the final-state tops.

`recurrent_param.debug_info` logs each step's mean |h| (and |c|) on the "protonet" logger.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from .. import rng
from ..fillers import fill
from .base import TEST, Layer
from .registry import register

log = logging.getLogger("protonet")


def caffe_tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh the way Caffe's LSTMUnit computes it, through the sigmoid."""
    return 2 * torch.sigmoid(2 * x) - 1


class LSTMUnitFunction(torch.autograd.Function):
    """One LSTM cell step with Caffe's CPU backward.

    gates = [i', f', o', g'] along the last axis; i, f, o are sigmoids (f scaled by
    cont), g a tanh; c = f * c_prev + i * g, h = o * tanh(c). The forget-gate
    derivative uses f * (1 - f) with the cont-scaled f, which is the true gradient
    only for binary cont (Caffe's CPU code does this; its GPU code does not).
    """

    @staticmethod
    def forward(ctx, c_prev, gates, cont):
        i, f, o, g = _activations(gates, cont)
        c = f * c_prev + i * g
        h = o * caffe_tanh(c)
        ctx.save_for_backward(c_prev, gates, cont, c)
        return c, h

    @staticmethod
    def backward(ctx, c_diff, h_diff):
        c_prev, gates, cont, c = ctx.saved_tensors
        i, f, o, g = _activations(gates, cont)
        tanh_c = caffe_tanh(c)
        c_term = c_diff + h_diff * o * (1 - tanh_c * tanh_c)
        gates_diff = torch.cat([c_term * g * i * (1 - i),
                                c_term * c_prev * f * (1 - f),
                                h_diff * tanh_c * o * (1 - o),
                                c_term * i * (1 - g * g)], dim=-1)
        return c_term * f, gates_diff, None


def _activations(gates: torch.Tensor, cont: torch.Tensor):
    i, f, o, g = gates.chunk(4, dim=-1)
    return (torch.sigmoid(i), cont.unsqueeze(-1) * torch.sigmoid(f), torch.sigmoid(o),
            caffe_tanh(g))


def lstm_unit(c_prev: torch.Tensor, gates: torch.Tensor, cont: torch.Tensor):
    """(c, h) for one step; cont has c_prev's shape without its last axis."""
    return LSTMUnitFunction.apply(c_prev, gates, cont.detach())


@register("LSTMUnit")
class LSTMUnit(Layer):
    """One LSTM step: bottoms c_prev (1 x N x H), gates (1 x N x 4H), cont (1 x N);
    tops c and h (1 x N x H)."""
    exact_bottoms = 3
    exact_tops = 2

    def reshape(self, bottom_shapes):
        c_prev, gates, cont = (tuple(s) for s in bottom_shapes)
        if len(c_prev) != 3 or len(gates) != 3 or len(cont) != 2:
            raise self.shape_error(f"expects bottoms of 3, 3 and 2 axes (c_prev, gates, "
                                   f"cont), got {list(c_prev)}, {list(gates)}, {list(cont)}")
        if c_prev[0] != 1 or gates[0] != 1 or cont[0] != 1:
            raise self.shape_error("every bottom must have a first axis of 1 (one time "
                                   f"step), got {list(c_prev)}, {list(gates)}, {list(cont)}")
        n, hidden = c_prev[1], c_prev[2]
        if gates[1] != n or cont[1] != n:
            raise self.shape_error(f"bottoms disagree on the number of streams: "
                                   f"{list(c_prev)}, {list(gates)}, {list(cont)}")
        if gates[2] != 4 * hidden:
            raise self.shape_error(f"gates need 4 x {hidden} = {4 * hidden} channels "
                                   f"(from c_prev), got {gates[2]}")
        return [c_prev, c_prev]

    def forward(self, c_prev, gates, cont):
        return list(lstm_unit(c_prev, gates, cont))

    def allow_force_backward(self, bottom_index):
        return bottom_index != 2


class Recurrent(Layer):
    """Shared machinery of RNN and LSTM; subclasses define the params and one step."""

    state_names: tuple[str, ...] = ()
    gate_factor = 1        # the input projections have gate_factor * num_output rows

    def __init__(self, param, phase=TEST):
        super().__init__(param, phase)
        exposed = len(self.state_names) if param.recurrent_param.expose_hidden else 0
        self.min_bottoms = 2 + exposed
        self.max_bottoms = 3 + exposed
        self.exact_tops = 1 + exposed
        self.carried: list[torch.Tensor] | None = None

    # -- set-up -------------------------------------------------------------------
    @property
    def expose_hidden(self) -> bool:
        return self.param.recurrent_param.expose_hidden

    def setup(self, bottom_shapes):
        rp = self.param.recurrent_param
        if rp.num_output <= 0:
            raise self.error("recurrent_param.num_output must be positive")
        self.hidden = rp.num_output
        exposed = len(self.state_names) if self.expose_hidden else 0
        self.has_static = len(bottom_shapes) > 2 + exposed
        self.first_state_bottom = 2 + int(self.has_static)
        x = tuple(bottom_shapes[0])
        if len(x) < 2:
            raise self.shape_error(f"x needs at least 2 axes (time steps, streams, ...), "
                                   f"got {list(x)}")
        self.num_steps = x[0]
        self.input_dim = math.prod(x[2:])
        self.static_dim = math.prod(bottom_shapes[2][1:]) if self.has_static else 0
        self.create_params(rp)
        self.draw_unrolled_copies(rp)

    def create_params(self, rp) -> None:
        """Add the param blobs in Caffe's order (the caffemodel order)."""
        rows = self.gate_factor * self.hidden
        self.add_blob((rows, self.input_dim), rp.weight_filler)
        self.add_blob((rows,), rp.bias_filler)
        if self.has_static:
            self.add_blob((rows, self.static_dim), rp.weight_filler)
        self.add_blob((rows, self.hidden), rp.weight_filler)

    def step_params(self, rp) -> list:
        """(shape, filler) of the params every unrolled time step's layers have."""
        return [((self.gate_factor * self.hidden, self.hidden), rp.weight_filler)]

    def draw_unrolled_copies(self, rp) -> None:
        """Caffe builds a net unrolled over the T time steps, in which each step's
        layers fill their params before Net::Init shares them with step 1's; with a
        seed set, the stream moves on by those T - 1 discarded fills, in that order."""
        if not rng.seeded():
            return
        for _ in range(self.num_steps - 1):
            for shape, filler in self.step_params(rp):
                fill(filler, shape, self.layer_name)

    def reshape(self, bottom_shapes):
        shapes = [tuple(s) for s in bottom_shapes]
        x, cont = shapes[0], shapes[1]
        if len(x) < 2:
            raise self.shape_error(f"x needs at least 2 axes (time steps, streams, ...), "
                                   f"got {list(x)}")
        steps, n = x[0], x[1]
        if steps != self.num_steps:
            raise self.shape_error(f"the number of time steps changed from "
                                   f"{self.num_steps} to {steps}")
        if math.prod(x[2:]) != self.input_dim:
            raise self.shape_error(f"x has {math.prod(x[2:])} features per step, the "
                                   f"params were made for {self.input_dim}")
        if cont != (steps, n):
            raise self.shape_error(f"cont must be (time steps, streams) = "
                                   f"{[steps, n]}, got {list(cont)}")
        if self.has_static:
            self.check_static(shapes[2], n)
        state_shape = (1, n, self.hidden)
        for name, shape in zip(self.state_names, shapes[self.first_state_bottom:]):
            if shape != state_shape:
                raise self.shape_error(f"initial state {name}_0 must be "
                                       f"{list(state_shape)}, got {list(shape)}")
        exposed = [state_shape] * len(self.state_names) if self.expose_hidden else []
        return [(steps, n, self.hidden)] + exposed

    def check_static(self, shape, n: int) -> None:
        if len(shape) < 1 or shape[0] != n:
            raise self.shape_error(f"the static input must be (streams = {n}, ...), "
                                   f"got {list(shape)}")
        if math.prod(shape[1:]) != self.static_dim:
            raise self.shape_error(f"the static input has {math.prod(shape[1:])} "
                                   f"features, the params were made for {self.static_dim}")

    def allow_force_backward(self, bottom_index):
        return bottom_index == 0 or (self.has_static and bottom_index == 2)

    # -- running ------------------------------------------------------------------
    def forward(self, *bottoms):
        x, cont = bottoms[0], bottoms[1].detach()
        steps, n = x.shape[0], x.shape[1]
        projected = F.linear(x.reshape(steps, n, -1), self.blobs[0], self.blobs[1])
        static = None
        if self.has_static:
            static = F.linear(bottoms[2].reshape(n, -1), self.blobs[2])
        state = self.initial_state(bottoms, n, x)
        debug = self.param.recurrent_param.debug_info
        hiddens = []
        for t in range(steps):
            state = self.step(projected[t], static, cont[t], state)
            hiddens.append(state[0])
            if debug:
                self.log_step(t, state)
        top = self.output(torch.stack(hiddens))
        final = [s.detach() for s in state]
        if self.expose_hidden:
            return [top] + [s.unsqueeze(0) for s in final]
        self.carried = final
        return top

    def initial_state(self, bottoms, n: int, like: torch.Tensor) -> list[torch.Tensor]:
        """The exposed initial states, or the last pass's final states (zeros at first)."""
        if self.expose_hidden:
            return [b.detach().reshape(n, self.hidden)
                    for b in bottoms[self.first_state_bottom:]]
        carried = self.carried
        if carried is None or carried[0].shape[0] != n:
            zeros = like.new_zeros(n, self.hidden)
            return [zeros] * len(self.state_names)
        return [s.to(like.device) for s in carried]

    def gate_input(self, projected_t, static, keep, h_prev, weight):
        """Caffe's sum W * (cont_t h_{t-1}) + (W_x x_t + b) [+ W_static x_static]."""
        total = F.linear(keep.unsqueeze(1) * h_prev, weight) + projected_t
        return total if static is None else total + static

    def log_step(self, t: int, state) -> None:
        values = ", ".join(f"{name}_{t + 1} {s.detach().abs().mean().item():.6g}"
                           for name, s in zip(self.state_names, state))
        log.info("[%s] step %d mean |value|: %s", self.layer_name, t + 1, values)

    def step(self, projected_t, static, cont_t, state):
        raise NotImplementedError

    def output(self, hiddens: torch.Tensor) -> torch.Tensor:
        return hiddens


@register("RNN")
class RNN(Recurrent):
    """Elman RNN: h_t = tanh(W_hh (cont_t h_{t-1}) + W_xh x_t + b_h), o_t = tanh(W_ho h_t + b_o).

    Params: W_xh, b_h, [W_xh_static], W_hh, W_ho, b_o.
    """
    state_names = ("h",)

    def create_params(self, rp):
        super().create_params(rp)
        self.add_blob((self.hidden, self.hidden), rp.weight_filler)
        self.add_blob((self.hidden,), rp.bias_filler)

    def step_params(self, rp):
        """Each step of Caffe's unrolled RNN: W_hh, then W_ho and b_o."""
        square = (self.hidden, self.hidden)
        return [(square, rp.weight_filler), (square, rp.weight_filler),
                ((self.hidden,), rp.bias_filler)]

    def step(self, projected_t, static, cont_t, state):
        (h_prev,) = state
        w_hh = self.blobs[2 + int(self.has_static)]
        return [torch.tanh(self.gate_input(projected_t, static, cont_t, h_prev, w_hh))]

    def output(self, hiddens):
        first = 3 + int(self.has_static)
        return torch.tanh(F.linear(hiddens, self.blobs[first], self.blobs[first + 1]))


@register("LSTM")
class LSTM(Recurrent):
    """LSTM with gates in Caffe's order i, f, o, g; the top is h at every step.

    Params: W_xc (4H x I), b_c (4H), [W_xc_static (4H x S)], W_hc (4H x H).
    """
    state_names = ("h", "c")
    gate_factor = 4

    def step(self, projected_t, static, cont_t, state):
        h_prev, c_prev = state
        w_hc = self.blobs[2 + int(self.has_static)]
        gates = self.gate_input(projected_t, static, cont_t, h_prev, w_hc)
        c, h = lstm_unit(c_prev, gates, cont_t)
        return [h, c]
