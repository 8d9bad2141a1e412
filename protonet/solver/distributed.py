"""Data-parallel training across processes, with Caffe's multi-GPU semantics.

Caffe (tools/caffe.cpp, parallel.cpp, solver.cpp) trains on several GPUs as N
copies of one solver, and so does protonet, with one process per worker and
torch.distributed between them (NCCL for CUDA devices, gloo on the CPU):

- every worker runs the whole solver on its own `batch_size` (and `iter_size`),
  so one iteration sees N x iter_size x batch_size samples and makes one update;
- before the first iteration rank 0's params are broadcast (NCCL::Broadcast), so
  fillers agree although each worker seeds with `random_seed + rank` as Caffe does;
- after the backward passes, every learnable param's diff is summed over the
  workers in one all-reduce of one flat buffer and scaled by 1/N
  (NCCL::on_gradients_ready); ApplyUpdate then clips, divides by iter_size,
  regularizes and applies the rule on every worker alike. N workers therefore
  match iter_size N on one worker, up to float rounding (clip_gradients sees the
  worker average rather than the iter_size sum, in Caffe as here);
- Data and HDF5Data layers in the TRAIN phase keep record i of their endless
  walk for worker i % N (DataLayer::Skip); TEST nets read everything;
- only rank 0 tests, snapshots, writes the JSON log, draws the progress bar and
  logs at INFO (the others log warnings, prefixed with their rank); the loss it
  displays is its own, as Caffe's root solver's;
- the action rank 0's signal handler asks for (snapshot, stop) travels in the same
  all-reduce, so every worker snapshots or stops at the same iteration;
- with fp16 loss scaling (protonet.solver.loss_scale) the finite check runs on the
  averaged diffs, which every worker holds alike (a NaN or Inf on any worker reaches
  all of them through the sum), so all workers skip an update together and keep one
  loss scale without a collective of their own.

`init` joins the group torchrun (or `spawn`) describes in RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a Solver built afterwards synchronizes
itself. `spawn` starts one such process per worker on this machine.
"""
from __future__ import annotations

import datetime
import logging
import os
import signal
import socket
import sys
import time
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from ..errors import ProtonetError
from ..proto import caffe_pb2
from ..rng import set_random_seed

log = logging.getLogger("protonet")

ENV_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Requests rank 0 sends with the gradients (values of the solver's SolverAction).
ACTIONS = ("none", "snapshot", "stop")
DEFAULT_TIMEOUT_S = 1800.0


class _State:
    rank = 0
    world = 1
    device: torch.device | None = None
    owns_group = False
    log_level: int | None = None
    log_filter: logging.Filter | None = None


_state = _State()
_shared_rng = np.random.RandomState()


# -- where this process stands -------------------------------------------------------
def rank_world() -> tuple[int, int]:
    """(rank, number of workers) of this process; (0, 1) outside `init`."""
    return _state.rank, _state.world


def is_root() -> bool:
    return _state.rank == 0


def data_shard(phase: int) -> tuple[int, int]:
    """(rank, workers) a data layer of `phase` reads for: record i belongs to worker
    i % workers in TRAIN; a TEST net reads every record (only rank 0 tests)."""
    if phase == caffe_pb2.TEST:
        return 0, 1
    return _state.rank, _state.world


def shared_rng() -> np.random.RandomState:
    """A generator that draws the same numbers on every worker (for shuffles that
    must agree so that the workers' shards stay disjoint)."""
    return _shared_rng


def seed(random_seed: int) -> None:
    """Caffe's Solver::Init seeding: `random_seed + rank` for this worker's own
    draws; the shared generator gets `random_seed` itself. Negative: no seeding."""
    if random_seed < 0:
        return
    set_random_seed(random_seed + _state.rank)
    _shared_rng.seed(random_seed % 2**32)


def launched() -> bool:
    """Whether torchrun (or `spawn`) started this process as one worker of a group."""
    return all(key in os.environ for key in ENV_KEYS)


def env_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the environment; (0, 1, 0) without it."""
    if not launched():
        return 0, 1, 0
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise ProtonetError("RANK, WORLD_SIZE and LOCAL_RANK must be integers; got "
                            f"{os.environ.get('RANK')!r}, {os.environ.get('WORLD_SIZE')!r}, "
                            f"{os.environ.get('LOCAL_RANK')!r}") from None
    if not 0 <= rank < world:
        raise ProtonetError(f"RANK {rank} is not within WORLD_SIZE {world}")
    return rank, world, local


# -- joining and leaving ---------------------------------------------------------------
def init(device: torch.device, timeout: float | None = None) -> tuple[int, int]:
    """Join the process group the environment describes (backend NCCL for a CUDA
    device, gloo otherwise); returns (rank, workers). Build solvers afterwards.

    `timeout` (seconds; default $PROTONET_DIST_TIMEOUT, else 1800) bounds how long
    a collective waits, e.g. the other workers while rank 0 alone tests."""
    rank, world, _ = env_ranks()
    if timeout is None:
        text = os.environ.get("PROTONET_DIST_TIMEOUT") or str(DEFAULT_TIMEOUT_S)
        try:
            timeout = float(text)
        except ValueError:
            raise ProtonetError(f"PROTONET_DIST_TIMEOUT must be seconds, got {text!r}") \
                from None
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
        _state.owns_group = True
    _state.rank, _state.world = dist.get_rank(), dist.get_world_size()
    _state.device = device
    if _state.rank != 0:
        _quiet_logging(_state.rank)
    # Unseeded shuffles still agree: rank 0's entropy seeds the shared generator.
    entropy = torch.tensor([int.from_bytes(os.urandom(4), "little")], dtype=torch.int64,
                           device=device)
    dist.broadcast(entropy, 0)
    _shared_rng.seed(int(entropy.item()) % 2**32)
    return _state.rank, _state.world


def shutdown() -> None:
    """Leave the group `init` joined and return to single-process behaviour."""
    if _state.owns_group and dist.is_initialized():
        dist.destroy_process_group()
    logger = logging.getLogger("protonet")
    if _state.log_level is not None:
        logger.setLevel(_state.log_level)
    if _state.log_filter is not None:
        logger.removeFilter(_state.log_filter)
    _state.rank, _state.world, _state.device = 0, 1, None
    _state.owns_group, _state.log_level, _state.log_filter = False, None, None


class _RankPrefix(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.prefix = f"[rank {rank}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and not record.msg.startswith(self.prefix):
            record.msg = self.prefix + record.msg
        return True


def _quiet_logging(rank: int) -> None:
    """Workers other than rank 0 log warnings and errors only (Caffe's
    LOG_IF(INFO, root_solver())), marked with their rank."""
    logger = logging.getLogger("protonet")
    _state.log_level = logger.level
    if logger.getEffectiveLevel() < logging.WARNING:
        logger.setLevel(logging.WARNING)
    _state.log_filter = _RankPrefix(rank)
    logger.addFilter(_state.log_filter)


# -- the solver's side -------------------------------------------------------------------
class GradientSync:
    """Caffe's NCCL solver callback for one worker's solver (installed by Solver
    when `init` has made several workers): `on_start` broadcasts rank 0's params
    before the first iteration, `on_gradients_ready` averages the diffs and shares
    rank 0's requested action, `request` hands that action to the solver loop."""

    def __init__(self, solver):
        self.solver = solver
        self.rank, self.world = rank_world()
        self.device = solver.device
        # Params with lr_mult 0 have zero diffs everywhere; they need no reduction.
        self._reduced = [i for i, p in enumerate(solver._params) if p.requires_grad]
        sizes = [solver._params[i].numel() for i in self._reduced]
        total = sum(sizes)
        # One buffer, one collective: the diffs, then the action slot.
        self._flat = torch.zeros(total + 1, dtype=torch.float32, device=self.device)
        self._views = [view.view(solver._params[i].shape) for i, view in
                       zip(self._reduced, self._flat[:total].split(sizes))]
        self._diffs = self._flat[:total]
        self._action_slot = self._flat[total:]
        self._scale = float(np.float32(1) / np.float32(self.world))
        cuda = self.device.type == "cuda"
        self._host = torch.zeros(1, dtype=torch.float32, pin_memory=cuda)
        self._event = torch.cuda.Event() if cuda else None
        self._pending = False
        self._started = False

    def on_start(self) -> None:
        if not self._started:
            self.broadcast_params()
            self._started = True

    def broadcast_params(self) -> None:
        """Every learnable param takes rank 0's values (NCCL::Broadcast)."""
        params = self.solver._params
        if not params:
            return
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1).float() for p in params])
            dist.broadcast(flat, 0)
            for param, value in zip(params, flat.split([p.numel() for p in params])):
                param.copy_(value.view(param.shape))

    def on_gradients_ready(self) -> None:
        """diff = (sum over workers of diff) / workers, as one all-reduce."""
        grads = self.solver._grads()
        mine = [grads[i] for i in self._reduced]
        with torch.no_grad():
            if mine:
                _copy_all(self._views, mine)
            code = ACTIONS.index(self._own_request()) if self.rank == 0 else 0
            self._action_slot.fill_(code)
            dist.all_reduce(self._flat)
            if mine:
                self._diffs.mul_(self._scale)
                _copy_all(mine, self._views)
            self._host.copy_(self._action_slot, non_blocking=self._event is not None)
            if self._event is not None:
                self._event.record()
        self._pending = True

    def _own_request(self) -> str:
        action = self.solver.action
        request = action() if action is not None else "none"
        return request if request in ACTIONS else "none"

    def request(self) -> str:
        """The action for the solver loop: after an update, the one rank 0 sent with
        its gradients (the same on every worker); otherwise (rank 0 testing) rank
        0's own handler's, and nothing for the other workers."""
        if self._pending:
            self._pending = False
            if self._event is not None:
                self._event.synchronize()      # the all-reduce, not the update
            return ACTIONS[int(round(float(self._host[0])))]
        return self._own_request() if self.rank == 0 else "none"

    def agree(self, flag: bool) -> bool:
        """Rank 0's flag on every worker (whether testing asked training to stop)."""
        value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.broadcast(value, 0)
        return bool(value.item())


def _copy_all(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(targets, sources)
    else:                                   # torch < 2.1
        for target, source in zip(targets, sources):
            target.copy_(source)


# -- starting workers on this machine ----------------------------------------------------------
def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker: Callable[..., int | None], workers: int, args: tuple = ()) -> int:
    """Run `worker(*args)` in `workers` fresh processes forming one group on this
    machine (MASTER_ADDR 127.0.0.1, a free port); returns the exit status: 0 when
    every worker succeeded, else the first failure's.

    SIGINT and SIGHUP reaching this process are passed on to the workers, where
    rank 0's handler decides (a terminal's Ctrl-C reaches them anyway; a worker
    counts one pending signal once). A second SIGINT ends the workers at once.
    """
    import torch.multiprocessing as mp
    port = free_port()
    context = mp.start_processes(_entry, args=(worker, args, workers, port),
                                 nprocs=workers, join=False, start_method="spawn")
    interrupts = [0]

    def forward(signum, frame) -> None:
        if signum == signal.SIGINT:
            interrupts[0] += 1
        for process in context.processes:
            if process.is_alive() and process.pid is not None:
                try:
                    os.kill(process.pid, signum)
                except ProcessLookupError:
                    pass

    forwarded = [signal.SIGINT] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {signum: signal.signal(signum, forward) for signum in forwarded}
    try:
        while not context.join(timeout=0.5):
            if interrupts[0] > 1:
                log.warning("interrupted again: ending the %d workers", workers)
                _terminate(context.processes)
                return 130
        return 0
    except mp.ProcessExitedException as e:
        # join has ended the other workers; the failed one printed its error.
        if e.signal_name:
            print(f"protonet: worker {e.error_index} was killed by {e.signal_name}; the "
                  "others were ended", file=sys.stderr)
            return 1
        return e.exit_code or 1
    except mp.ProcessRaisedException as e:
        print(f"protonet: worker {e.error_index} failed; the others were ended\n{e}",
              file=sys.stderr)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _terminate(context.processes)


def _terminate(processes, grace: float = 10.0) -> None:
    """End the workers still running: SIGTERM, then SIGKILL after `grace` seconds."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + grace
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def _entry(local_rank: int, worker, args: tuple, workers: int, port: int) -> None:
    """One spawned worker: the torchrun environment, sensible threads, the job."""
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank),
                      WORLD_SIZE=str(workers), LOCAL_WORLD_SIZE=str(workers),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if "OMP_NUM_THREADS" not in os.environ:     # the workers share this machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    status = worker(*args)
    if status:
        sys.exit(status)
