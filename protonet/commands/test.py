"""`protonet test`: score trained weights over N batches, like `caffe test`.

Every batch's output values are logged, then the mean of each output element over
the batches (loss outputs with their loss weight), which is what Caffe prints.

Several comma-separated --weights are copied in order into the one net (later files
overwrite same-named layers), as training's --weights. With --ensemble each file, or
each match of a glob such as 'snap/lenet_iter_*.caffemodel', is scored as a member of
an ensemble instead: see protonet.ensemble.
"""
from __future__ import annotations

import logging
import os
import re

from ..errors import ProtonetError
from ..io.upgrade import read_net
from ..proto import caffe_pb2
from . import PRECISION_NAMES

log = logging.getLogger("protonet")


def register(sub) -> None:
    p = sub.add_parser("test", help="score a model's outputs over test batches",
                       description="Run the TEST phase net as caffe test does.")
    p.add_argument("--model", required=True, help="net prototxt")
    p.add_argument("--weights", required=True,
                   help="caffemodel(s), comma-separated: copied in order into the net; "
                        "with --ensemble, the members (globs allowed)")
    p.add_argument("--iterations", type=int, default=50, help="batches to run (default 50)")
    p.add_argument("--gpu", help="GPU id to run on (CPU when absent)")
    p.add_argument("--level", type=int, default=0, help="net level")
    p.add_argument("--stage", action="append", default=[],
                   help="net stage (repeat or comma-separate)")
    p.add_argument("--ensemble", action="store_true",
                   help="score each weights file as an ensemble member: each member's "
                        "outputs, their mean, and the accuracy/loss of the averaged "
                        "predictions")
    p.add_argument("--precision", choices=list(PRECISION_NAMES), default="fp32",
                   help="fp32: Caffe's numerics (default); bf16/fp16: forward under "
                        "autocast. bf16 is fast on CPUs with AVX-512 BF16/AMX and on GPUs; "
                        "fp16 is for GPUs")
    p.add_argument("--ensemble-mean", "--ensemble_mean", dest="ensemble_mean",
                   choices=("prob", "score"), default="prob",
                   help="average softmax probabilities (prob, default) or raw "
                        "predictions (score)")
    p.set_defaults(func=run)


def run(args) -> int:
    net = read_net(args.model)      # a missing or broken file fails before torch loads
    import numpy as np
    import torch

    from ..device import select_device
    from ..net.module import NetModule
    from ..solver.nets import load_weights
    from ..solver.scoring import flat_outputs, output_labels, score_line
    from ..solver.updates import f32
    from ..speed import autocast, keep_freed_memory
    device = select_device(args.gpu)
    if device.type == "cuda":
        log.info("Use GPU with device ID %d", device.index)
    else:
        log.info("Use CPU.")
    stages = [s for arg in args.stage for s in arg.split(",") if s]
    module = NetModule(net, phase=caffe_pb2.TEST, level=args.level,
                       stages=stages).to(device)
    if device.type == "cpu":      # as the solver's test nets: NHWC convolution and pooling
        module.use_channels_last()
        keep_freed_memory()
    if args.ensemble:
        return _run_ensemble(args, module, device)
    if any(re.search(r"[*?\[]", item) and not os.path.exists(item)
           for item in args.weights.split(",")):
        raise ProtonetError(f"--weights {args.weights}: patterns are expanded only with "
                            "--ensemble (to score the matches as an ensemble)")
    load_weights(module, args.weights)
    log.info("Running for %d iterations%s.", args.iterations,
             "" if args.precision == "fp32" else f" in {args.precision} (autocast)")
    sums, labels, loss = None, [], np.float32(0)
    # fp32: the inference plan that keeps every blob (folded BatchNorm, packed weights),
    # the same outputs as module() to float rounding; bf16/fp16: autocast on module().
    # Only the outputs are read, so blobs the plan would make on demand (the tops of
    # convolutions joined with a shortcut sum) are never made.
    fast = args.precision == "fp32"
    with torch.no_grad():
        for i in range(args.iterations):
            if fast:
                values, batch_loss = module.forward_for_inference(pending={})
            else:
                with autocast(args.precision, device):
                    values, batch_loss = module()
            if batch_loss is not None:
                loss += np.float32(float(batch_loss))
            flat = flat_outputs(module, values)
            if sums is None:
                sums, labels = flat.clone(), output_labels(module, values)
            else:
                sums += flat
            for (name, _), score in zip(labels, flat.tolist()):
                log.info("Batch %d, %s = %g", i, name, score)
    log.info("Loss: %g", f32(loss / max(args.iterations, 1)))
    means = (sums / args.iterations).tolist() if sums is not None else []
    for (name, weight), mean in zip(labels, means):
        log.info("%s", score_line(mean, name, weight))
    return 0


def _run_ensemble(args, module: NetModule, device: torch.device) -> int:
    from .. import ensemble
    from ..speed import autocast
    files = ensemble.expand_weights(args.weights)
    scorer = ensemble.Ensemble(module, files, args.ensemble_mean)
    log.info("Running %d member(s) for %d iterations, averaging %s.", len(files),
             args.iterations, "probabilities" if args.ensemble_mean == "prob" else "scores")
    with autocast(args.precision, device):
        ensemble.log_result(scorer.run(args.iterations))
    return 0
