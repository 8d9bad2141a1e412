"""`protonet train`: train or fine-tune from a solver prototxt, like `caffe train`.

Flags keep Caffe's meanings: --weights (comma list) and --snapshot are exclusive,
--level/--stage set the train net's state, and SIGINT/SIGHUP are turned into
solver actions checked once per iteration (Caffe's SignalHandler), so Ctrl-C stops
training cleanly and still writes the final snapshot.
"""
from __future__ import annotations

import logging
import signal
import sys

import torch

from ..device import parse_gpus, select_device
from ..errors import ProtonetError
from ..io.upgrade import read_solver
from ..proto import caffe_pb2
from ..solver import get_solver

log = logging.getLogger("protonet")
EFFECTS = ("stop", "snapshot", "none")


def register(sub) -> None:
    p = sub.add_parser("train", help="train or fine-tune a model from a solver",
                       description="Train a net as caffe train does.")
    p.add_argument("--solver", required=True, help="solver prototxt")
    p.add_argument("--weights", help="caffemodel(s) to fine-tune from, comma-separated")
    p.add_argument("--snapshot", help="solverstate to resume training from")
    p.add_argument("--gpu", help="GPU id(s): 0, 1,2 or all (only the first is used)")
    p.add_argument("--level", type=int, default=0, help="train net level")
    p.add_argument("--stage", action="append", default=[],
                   help="train net stage (repeat or comma-separate)")
    p.add_argument("--sigint_effect", "--sigint-effect", choices=EFFECTS, default="stop",
                   help="what SIGINT (Ctrl-C) does (default: stop)")
    p.add_argument("--sighup_effect", "--sighup-effect", choices=EFFECTS,
                   default="snapshot", help="what SIGHUP does (default: snapshot)")
    p.add_argument("--log-json", dest="log_json",
                   help="JSON-lines log path (default: <snapshot_prefix>.log.jsonl)")
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


def train_device(args, param: caffe_pb2.SolverParameter) -> torch.device:
    """--gpu, else the solver's solver_mode GPU / device_id, else the CPU."""
    flag = args.gpu
    if not flag and param.HasField("solver_mode") and \
            param.solver_mode == caffe_pb2.SolverParameter.GPU:
        flag = str(param.device_id)
    ids = parse_gpus(flag) if torch.cuda.is_available() else []
    if len(ids) > 1:
        log.warning("training on several GPUs is not supported; using GPU %d only", ids[0])
    device = select_device(flag)
    if device.type == "cuda":
        param.device_id = device.index
        log.info("Using GPU %d: %s", device.index, torch.cuda.get_device_name(device))
    else:
        log.info("Use CPU.")
    return device


def run(args) -> int:
    if args.snapshot and args.weights:
        raise ProtonetError("give a snapshot to resume training or weights to fine-tune, "
                            "not both")
    param = read_solver(args.solver)
    param.train_state.level = args.level
    param.train_state.stage.extend(s for arg in args.stage for s in arg.split(",") if s)
    device = train_device(args, param)
    if args.snapshot or args.weights:
        del param.weights[:]
    if args.weights:
        param.weights.append(args.weights)
    log_json = args.log_json or f"{param.snapshot_prefix}.log.jsonl"
    actions = SignalActions(args.sigint_effect, args.sighup_effect)
    solver = get_solver(param, device, action=actions, log_json=log_json,
                        progress=sys.stderr.isatty())
    with actions:
        if args.snapshot:
            log.info("Resuming from %s", args.snapshot)
        log.info("Starting Optimization")
        solver.solve(args.snapshot)
    return 0
