"""TensorBoard scalars (and optionally histograms) from a solver's display and test events.

The sink is fed the records the JSON-lines log gets (Solver.add_hook("record", ...)),
so TensorBoard shows exactly what the log says, at the iterations the log says it:

    train/loss            the smoothed loss of a display (Caffe's "loss = ...")
    train/lr              the learning rate of that iteration
    train/iter_per_s      training speed since the previous display
    train_outputs/NAME    each train net output at the display (NAME#k for element k
                          of a multi-element output)
    test/NAME             each output of test net #0, averaged over test_iter batches
                          (test_net1/NAME, ... for further test nets)
    test/total_loss       with test_compute_loss, the summed test loss
    test_ema/NAME         the same with EMA weights (protonet.solver.ema, --ema-test)

With `histograms`, each display also writes `weights/LAYER/i` and `gradients/LAYER/i`
for every param the solver updates (gradients as they stand before the update: after
backward, iter_size accumulation and data-parallel averaging, before clipping and
weight decay). TensorBoard itself is optional: `pip install 'protonet[tensorboard]'`.

    solver = protonet.get_solver("solver.prototxt")
    with TensorBoardSink("runs/tb").attach(solver):
        solver.solve()
"""
from __future__ import annotations

import logging

from ..errors import ProtonetError

log = logging.getLogger("protonet")

INSTALL_HINT = ("TensorBoard logging needs the tensorboard package: "
                "pip install 'protonet[tensorboard]' (or pip install tensorboard)")


def summary_writer_class():
    """torch's SummaryWriter, imported only when asked for."""
    try:
        import tensorboard  # noqa: F401  (torch's own message is less direct)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ProtonetError(INSTALL_HINT) from None
    return SummaryWriter


def _scalars(prefix: str, outputs: dict) -> list[tuple[str, float]]:
    """(tag, value) per output element; multi-element outputs as NAME#k."""
    pairs = []
    for name, value in outputs.items():
        if isinstance(value, list):
            pairs += [(f"{prefix}/{name}#{k}", v) for k, v in enumerate(value)]
        else:
            pairs.append((f"{prefix}/{name}", value))
    return pairs


class TensorBoardSink:
    """Writes a solver's display/test records to a TensorBoard event file in `logdir`."""

    def __init__(self, logdir: str, histograms: bool = False, writer=None):
        self.logdir = logdir
        self.histograms = histograms
        self.writer = writer if writer is not None else summary_writer_class()(logdir)
        self.solver = None

    def attach(self, solver) -> "TensorBoardSink":
        self.solver = solver
        solver.add_hook("record", self.record)
        log.info("Writing TensorBoard events to %s", self.logdir)
        return self

    def record(self, record: dict) -> None:
        event, step = record.get("event"), int(record.get("iter", 0))
        if event == "train":
            pairs = [("train/loss", record["loss"])]
            if "lr" in record:
                pairs.append(("train/lr", record["lr"]))
            if "iter_per_s" in record:
                pairs.append(("train/iter_per_s", record["iter_per_s"]))
            pairs += _scalars("train_outputs", record.get("outputs", {}))
        elif event in ("test", "test_ema"):
            net = int(record.get("net", 0))
            prefix = event if net == 0 else f"{event}_net{net}"
            pairs = _scalars(prefix, record.get("outputs", {}))
            if "loss" in record:
                pairs.append((f"{prefix}/total_loss", record["loss"]))
        else:
            return
        for tag, value in pairs:
            self.writer.add_scalar(tag, float(value), step)
        if event == "train" and self.histograms and self.solver is not None:
            self._histograms(step)
        self.writer.flush()

    def _histograms(self, step: int) -> None:
        for entry in self.solver.train_module.learnable:
            name = f"{entry.layer}/{entry.index}"
            param = entry.param.detach()
            if param.numel() == 0:
                continue
            self.writer.add_histogram(f"weights/{name}", param.float().cpu(), step)
            if entry.param.requires_grad and entry.param.grad is not None:
                self.writer.add_histogram(f"gradients/{name}",
                                          entry.param.grad.detach().float().cpu(), step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()

    def __enter__(self) -> "TensorBoardSink":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False
