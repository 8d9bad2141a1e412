"""`protonet train` options for the opt-in solver extensions: TensorBoard and EMA weights.

`add_arguments(parser)` adds the flags; `attached(solver, args)` hooks what they ask
for into a built solver for the duration of training and closes it afterwards. Only
the worker that logs and snapshots (rank 0) gets them. With none of the flags, nothing
is attached and training runs exactly as without this module.
"""
from __future__ import annotations

import contextlib

from ..errors import ProtonetError


def add_arguments(parser) -> None:
    group = parser.add_argument_group("extensions")
    group.add_argument("--tensorboard", metavar="DIR",
                       help="write TensorBoard scalars (loss, lr, test outputs) to DIR; "
                            "needs pip install 'protonet[tensorboard]'")
    group.add_argument("--tb-histograms", "--tb_histograms", dest="tb_histograms",
                       action="store_true",
                       help="with --tensorboard: also weight and gradient histograms at "
                            "each display")
    group.add_argument("--ema", type=float, metavar="DECAY",
                       help="keep an exponential moving average of the weights (e.g. "
                            "0.999) and write <prefix>_iter_N.ema.caffemodel with each "
                            "snapshot")
    group.add_argument("--ema-test", "--ema_test", dest="ema_test", action="store_true",
                       help="with --ema: after each test pass, test again with the "
                            "averaged weights")
    group.add_argument("--ema-warmup", "--ema_warmup", dest="ema_warmup",
                       action="store_true",
                       help="with --ema: use decay min(DECAY, (1+n)/(10+n)) at update n")


def check(args) -> None:
    """Flag combinations and optional packages, before anything is built."""
    ema = getattr(args, "ema", None)
    if (getattr(args, "ema_test", False) or getattr(args, "ema_warmup", False)) and ema is None:
        raise ProtonetError("--ema-test and --ema-warmup need --ema DECAY")
    if ema is not None:
        from ..solver.ema import check_decay
        try:
            check_decay(ema)
        except ProtonetError as e:
            raise ProtonetError(f"--ema: {e}") from None
    if getattr(args, "tb_histograms", False) and not getattr(args, "tensorboard", None):
        raise ProtonetError("--tb-histograms needs --tensorboard DIR")
    if getattr(args, "tensorboard", None):
        from ..solver.tensorboard import summary_writer_class
        summary_writer_class()


@contextlib.contextmanager
def attached(solver, args):
    """The extensions `args` asks for, hooked into `solver` while the block runs."""
    check(args)
    closers = []
    if solver.rank == 0:
        if getattr(args, "tensorboard", None):
            from ..solver.tensorboard import TensorBoardSink
            sink = TensorBoardSink(args.tensorboard, args.tb_histograms).attach(solver)
            closers.append(sink.close)
        if getattr(args, "ema", None) is not None:
            from ..solver.ema import WeightEMA
            ema = WeightEMA(solver, args.ema, test=args.ema_test,
                            warmup=args.ema_warmup).attach()
            if getattr(args, "snapshot", None):
                ema.resume(args.snapshot)
    try:
        yield
    finally:
        for close in closers:
            close()
