"""`protonet time`: per-layer forward/backward timings, like `caffe time`.

Caffe's flags keep their meaning. Fast paths of protonet.speed: --precision
bf16|fp16 (autocast for the layer-by-layer and training passes, pre-cast weights in
the inference plan), --compile (torch.compile of the inference plan), and NHWC
activations, on by default on the CPU as in training (--no-channels-last for NCHW).
On CPU, freed tensor memory is kept for reuse (protonet.speed.keep_freed_memory), as
Caffe keeps its blobs between iterations.
"""
from __future__ import annotations

import argparse
import logging

from ..io.upgrade import read_net
from ..proto import caffe_pb2
from . import PRECISION_NAMES

log = logging.getLogger("protonet")


def register(sub) -> None:
    p = sub.add_parser("time", help="benchmark a net's forward and backward passes",
                       description="Time each layer's forward and backward, as caffe time.")
    p.add_argument("--model", required=True, help="net prototxt")
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--gpu", help="GPU id to run on (CPU when absent)")
    p.add_argument("--phase", choices=["TRAIN", "TEST"], default="TRAIN")
    p.add_argument("--level", type=int, default=0)
    p.add_argument("--stage", action="append", default=[],
                   help="net stage (repeat or comma-separate)")
    p.add_argument("--precision", choices=list(PRECISION_NAMES), default="fp32",
                   help="fp32 (Caffe's numerics), or bf16/fp16 convolutions and products")
    p.add_argument("--channels-last", "--channels_last", dest="channels_last",
                   action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC activations (default: on for the CPU, as the solver trains)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the inference plan (eager if compiling fails)")
    p.set_defaults(func=run)


def run(args) -> int:
    net = read_net(args.model)      # a missing or broken file fails before torch loads
    from ..device import select_device
    from ..net.module import NetModule
    from ..speed import keep_freed_memory
    from ..timing import TimingOptions, time_net
    device = select_device(args.gpu)
    if device.type == "cpu":
        keep_freed_memory()
    stages = [s for arg in args.stage for s in arg.split(",") if s]
    module = NetModule(net, phase=getattr(caffe_pb2, args.phase), level=args.level,
                       stages=stages).to(device)
    channels_last = device.type == "cpu" if args.channels_last is None else args.channels_last
    options = TimingOptions(args.precision, channels_last, args.compile)
    log.info("*** Benchmark begins ***")
    log.info("Testing for %d iterations (precision %s%s%s).", args.iterations,
             args.precision, ", channels-last" if channels_last else "",
             ", compile" if args.compile else "")
    t = time_net(module, args.iterations, device, options=options,
                 on_iteration=lambda i, ms: log.info(
                     "Iteration: %d forward-backward time: %.3f ms.", i, ms))
    width = max((len(n) for n in t.layer_names), default=10)
    log.info("Average time per layer: ")
    for name, f, b in zip(t.layer_names, t.forward_ms, t.backward_ms):
        log.info("%*s\tforward: %.4f ms.", width, name, f)
        log.info("%*s\tbackward: %.4f ms.", width, name, b)
    log.info("Average Forward pass: %.4f ms.", t.forward_total)
    log.info("Average Backward pass: %.4f ms.", t.backward_total)
    log.info("Average Forward-Backward: %.4f ms.", sum(t.iteration_ms) / max(len(t.iteration_ms), 1))
    log.info("Total Time: %.4f ms.", sum(t.iteration_ms))
    if args.compile and not t.compiled:
        log.info("torch.compile was not used: the inference plan ran eagerly.")
    log.info("Whole net, median: forward (inference plan) %.3f ms, forward+backward %.3f ms.",
             t.net_forward_ms, t.net_forward_backward_ms)
    log.info("*** Benchmark ends ***")
    return 0
