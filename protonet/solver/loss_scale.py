"""Dynamic loss scaling for fp16 mixed-precision training.

float16 has a narrow range (smallest normal 6e-5, largest 65504): the small
gradients of an autocast backward underflow to zero unless the loss, and with it
every gradient, is first multiplied by a large scale. The scale is found by trial,
as torch.amp.GradScaler does; this is the same scheme written for protonet's
Solver, which updates its float32 master params itself rather than through a
torch.optim optimizer:

- the loss of every forward/backward pass is multiplied by `scale` before backward;
- before the update one fused check (a max-abs norm per gradient, one host sync)
  asks whether every gradient is finite. If so, the gradients are divided by the
  scale in place (a power of two: exact) and the update runs; after
  `growth_interval` finite steps in a row the scale grows by `growth_factor`;
- if not, that iteration's update is skipped (params and solver history are left
  as they were) and the scale shrinks by `backoff_factor`.

Between the backward passes and the update the diffs are still scaled (what
debug_info's backward lines and pycaffe's on_gradients_ready callbacks see).
bf16 has float32's range and fp32 needs nothing, so only fp16 uses a scaler. The
scaler's state is not written to solverstate files (Caffe's SolverState has no field
for it): a resumed fp16 run starts again from `init_scale` and finds its scale
within a few iterations.
"""
from __future__ import annotations

import torch


class LossScaler:
    """The dynamic loss scale of one solver: `scale_loss` before backward,
    `unscale` before the update (False: skip the update)."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        if not (init_scale > 0 and growth_factor > 1 and 0 < backoff_factor < 1
                and growth_interval >= 1):
            raise ValueError("LossScaler needs init_scale > 0, growth_factor > 1, "
                             "0 < backoff_factor < 1 and growth_interval >= 1")
        self.scale = float(init_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.finite_steps = 0          # consecutive finite steps at the current scale

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    @staticmethod
    def all_finite(grads: list[torch.Tensor]) -> bool:
        """Whether every element of every gradient is finite (one host sync): the
        max-abs norm of a tensor is NaN or Inf exactly when an element is."""
        if not grads:
            return True
        norms = torch._foreach_norm(grads, float("inf"))
        return bool(torch.isfinite(torch.stack(norms)).all())

    def unscale(self, grads: list[torch.Tensor]) -> bool:
        """Check `grads`; when finite, divide them by the scale in place and return
        True. Either way, adjust the scale for the next iteration."""
        finite = self.all_finite(grads)
        if finite:
            if grads:
                torch._foreach_mul_(grads, 1.0 / self.scale)
            self.finite_steps += 1
            if self.finite_steps >= self.growth_interval:
                self.scale *= self.growth_factor
                self.finite_steps = 0
        else:
            self.scale *= self.backoff_factor
            self.finite_steps = 0
        return finite
