"""`protonet train`: train or fine-tune from a solver prototxt, like `caffe train`.

Flags keep Caffe's meanings: --weights (comma list) and --snapshot are exclusive,
--level/--stage set the train net's state, and SIGINT/SIGHUP are turned into
solver actions checked once per iteration (Caffe's SignalHandler), so Ctrl-C stops
training cleanly and still writes the final snapshot.

Several GPUs (--gpu 0,1 or --gpu all), --workers N on the CPU, or a start by
torchrun train data-parallel as Caffe's multi-GPU training does: one worker process
per device, each on the solver's batch_size, one averaged update per iteration,
rank 0 alone logging, testing and snapshotting (protonet.solver.distributed,
docs/distributed.md).
"""
from __future__ import annotations

import logging
import os
import signal
import sys

from ..errors import ProtonetError
from ..io.upgrade import read_solver
from ..proto import caffe_pb2
from . import PRECISION_NAMES, train_extensions

log = logging.getLogger("protonet")
EFFECTS = ("stop", "snapshot", "none")


def register(sub) -> None:
    p = sub.add_parser("train", help="train or fine-tune a model from a solver",
                       description="Train a net as caffe train does.")
    p.add_argument("--solver", required=True, help="solver prototxt")
    p.add_argument("--weights", help="caffemodel(s) to fine-tune from, comma-separated")
    p.add_argument("--snapshot", help="solverstate to resume training from")
    p.add_argument("--gpu", help="GPU id(s): 0, 1,2 or all; several GPUs train "
                   "data-parallel, one worker process per GPU")
    p.add_argument("--workers", type=int, help="data-parallel worker processes on the "
                   "CPU (gloo), each with the solver's batch_size: for testing and "
                   "multi-socket machines (default 1)")
    p.add_argument("--level", type=int, default=0, help="train net level")
    p.add_argument("--stage", action="append", default=[],
                   help="train net stage (repeat or comma-separate)")
    p.add_argument("--sigint_effect", "--sigint-effect", choices=EFFECTS, default="stop",
                   help="what SIGINT (Ctrl-C) does (default: stop)")
    p.add_argument("--sighup_effect", "--sighup-effect", choices=EFFECTS,
                   default="snapshot", help="what SIGHUP does (default: snapshot)")
    p.add_argument("--nan_effect", "--nan-effect", choices=("stop", "continue"),
                   default="stop", help="what a NaN or Inf loss does: stop, naming the "
                   "iteration and the first non-finite layer (default), or continue")
    p.add_argument("--log-json", dest="log_json",
                   help="JSON-lines log path (default: <snapshot_prefix>.log.jsonl)")
    p.add_argument("--precision", choices=list(PRECISION_NAMES), default="fp32",
                   help="fp32: Caffe's numerics (default); bf16/fp16: mixed precision, "
                        "forward passes under autocast, params and updates in float32. "
                        "bf16 is fast on CPUs with AVX-512 BF16/AMX and on GPUs; fp16 is "
                        "for GPUs (the loss is scaled dynamically)")
    train_extensions.add_arguments(p)
    p.set_defaults(func=run)


class SignalActions:
    """Caffe's SignalHandler: signals only set flags; the solver asks for them."""

    def __init__(self, sigint_effect: str, sighup_effect: str):
        self.effects = {}             # SIGHUP first: Caffe checks it first
        if hasattr(signal, "SIGHUP"):
            self.effects[signal.SIGHUP] = sighup_effect
        self.effects[signal.SIGINT] = sigint_effect
        self.pending: set[int] = set()
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "SignalActions":
        for signum in self.effects:
            self.previous[signum] = signal.signal(signum, self._catch)
        return self

    def __exit__(self, *exc) -> bool:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        return False

    def _catch(self, signum, frame) -> None:
        self.pending.add(signum)

    def __call__(self) -> str:
        """The action for one pending signal (SIGHUP first, as Caffe), else 'none'."""
        for signum, effect in self.effects.items():
            if signum in self.pending:
                self.pending.discard(signum)
                return effect
        return "none"


def gpu_flag(args, param: caffe_pb2.SolverParameter) -> str | None:
    """--gpu, else the solver's solver_mode GPU / device_id (Caffe's order)."""
    if not args.gpu and param.HasField("solver_mode") and \
            param.solver_mode == caffe_pb2.SolverParameter.GPU:
        return str(param.device_id)
    return args.gpu


def train_device(args, param: caffe_pb2.SolverParameter,
                 local_rank: int | None = None) -> torch.device:
    """The device of this process: the first GPU named (or the CPU); for the worker
    with `local_rank` on its machine, that worker's GPU of the list."""
    import torch

    from ..device import configure_cuda, parse_gpus, select_device
    flag = gpu_flag(args, param)
    ids = parse_gpus(flag) if torch.cuda.is_available() else []
    if local_rank is None or not ids:
        device = select_device(flag)
    elif len(ids) == 1 and flag == "all":     # one visible GPU per worker process
        device = torch.device("cuda", ids[0])
    elif local_rank >= len(ids):
        raise ProtonetError(f"--gpu {flag} names {len(ids)} GPU(s) but this is worker "
                            f"{local_rank} on this machine; name one GPU per local "
                            "worker, or use --gpu all")
    else:
        device = torch.device("cuda", ids[local_rank])
        if device.index >= torch.cuda.device_count():
            raise ProtonetError(f"--gpu {device.index}: only {torch.cuda.device_count()} "
                                "CUDA device(s) visible")
    if device.type == "cuda":
        param.device_id = device.index
        configure_cuda()
    return device


def _log_device(device: torch.device) -> None:
    import torch
    if device.type == "cuda":
        log.info("Using GPU %d: %s", device.index, torch.cuda.get_device_name(device))
    else:
        log.info("Use CPU.")


def local_workers(args) -> int:
    """How many worker processes to start here: one per GPU named, or --workers."""
    if args.workers is not None and args.workers < 1:
        raise ProtonetError(f"--workers must be at least 1, got {args.workers}")
    import torch

    from ..device import parse_gpus
    param = read_solver(args.solver)
    ids = parse_gpus(gpu_flag(args, param)) if torch.cuda.is_available() else []
    if args.workers is not None and ids:
        raise ProtonetError("--workers starts CPU workers, but this run uses GPU "
                            f"{', '.join(map(str, ids))}; for one worker per GPU name "
                            "them with --gpu (e.g. --gpu 0,1 or all), for the CPU give "
                            "--gpu -1")
    if len(set(ids)) != len(ids):
        raise ProtonetError(f"--gpu {args.gpu}: name each GPU once")
    if len(ids) > 1:
        log.info("Using GPUs %s", ", ".join(map(str, ids)))
        return len(ids)
    return args.workers or 1


def run(args) -> int:
    if args.snapshot and args.weights:
        raise ProtonetError("give a snapshot to resume training or weights to fine-tune, "
                            "not both")
    read_solver(args.solver)        # a missing or broken file fails before torch loads
    from ..solver import distributed
    if distributed.launched():            # torchrun: this process is one worker
        if args.workers is not None:
            raise ProtonetError("--workers starts worker processes itself; under "
                                "torchrun, its --nproc_per_node says how many")
        return train(args)
    workers = local_workers(args)
    if workers > 1:
        log.info("Starting %d data-parallel workers", workers)
        return distributed.spawn(_spawned_worker, workers, (args,))
    return train(args)


def _spawned_worker(args) -> int:
    """One worker process `run` started: logging as the command's, errors one line."""
    from ..cli import _setup_logging
    _setup_logging(getattr(args, "quiet", False))
    try:
        return train(args)
    except ProtonetError as e:
        print(f"protonet train: error: (worker {os.environ.get('RANK')}) {e}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def train(args) -> int:
    """Train in this process: alone, or as the worker the environment names."""
    from ..solver import distributed
    from ..speed import keep_freed_memory
    _, world, local_rank = distributed.env_ranks()
    param = read_solver(args.solver)
    param.train_state.level = args.level
    param.train_state.stage.extend(s for arg in args.stage for s in arg.split(",") if s)
    device = train_device(args, param, local_rank if world > 1 else None)
    if world > 1:
        distributed.init(device)      # before anything is logged or built
    try:
        _log_device(device)
        if device.type == "cpu":      # reuse freed memory every iteration, as Caffe its blobs
            keep_freed_memory()
        if world > 1:
            log.info("Data-parallel training on %d workers (%s); each takes the solver's "
                     "batch_size", world, "NCCL" if device.type == "cuda" else "gloo")
        return _solve(args, param, device)
    finally:
        if world > 1:
            distributed.shutdown()


def _solve(args, param: caffe_pb2.SolverParameter, device: torch.device) -> int:
    from ..solver import get_solver
    if args.snapshot or args.weights:
        del param.weights[:]
    if args.weights:
        param.weights.append(args.weights)
    log_json = args.log_json or f"{param.snapshot_prefix}.log.jsonl"
    actions = SignalActions(args.sigint_effect, args.sighup_effect)
    solver = get_solver(param, device, action=actions, log_json=log_json,
                        progress=sys.stderr.isatty(), source=args.solver,
                        nan_effect=args.nan_effect,
                        precision=args.precision)
    with actions, train_extensions.attached(solver, args):
        if args.snapshot:
            log.info("Resuming from %s", args.snapshot)
        log.info("Starting Optimization")
        solver.solve(args.snapshot)
    return 0
