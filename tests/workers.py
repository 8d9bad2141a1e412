"""Spawning data-parallel worker processes in tests, with a deadline."""
from __future__ import annotations

import time

import torch.multiprocessing as mp

from protonet.solver import distributed


def run_workers(worker, folder: str, nprocs: int = 2, deadline_s: float = 60.0) -> None:
    """Run worker(rank, nprocs, port, folder) in `nprocs` spawned processes; fail the
    test if they overrun the deadline (killing any that are left)."""
    context = mp.start_processes(worker, args=(nprocs, distributed.free_port(), folder),
                                 nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, "the workers overran their deadline"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
