"""Background batch loading, so that decoding overlaps the net's compute.

Caffe's prefetching data layers fill a queue of `data_param.prefetch` batches on
an internal thread while the net runs. `Loader` does the same with one daemon
thread per layer calling the layer's `next_batch` (which itself decodes the
records of a batch on a thread pool); batches come out in production order, so
TEST batches stay deterministic. For a CUDA net a batch is left as pinned uint8
and copied with `non_blocking=True` (a quarter of the float32 bytes), and the mean
and scale arithmetic runs on the GPU; for a CPU net the worker does that arithmetic
too, off the main thread.

Shutdown: `Loader.close()` (also run when its layer is garbage collected) stops
the thread; the threads are daemons, so a program that never closes still exits.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import Executor
from typing import Callable, Iterable, Iterator, TypeVar

import torch

from .transformer import Batch, DataTransformer

CLOSE_TIMEOUT_S = 30.0   # a batch being decoded is finished first; a daemon past this
T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """Decode threads: the CPU count, at most 8 (OpenCV and numpy release the GIL)."""
    return max(1, min(8, os.cpu_count() or 1))


def ordered_map(pool: Executor, function: Callable[[T], R], items: Iterable[T],
                window: int = 64) -> Iterator[R]:
    """`function` over `items` on `pool`, results in item order, at most `window`
    in flight (so a million-image list does not become a million futures)."""
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


class _Failure:
    """An exception raised by the producer, handed to the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


class Loader:
    """Batches from `produce`, staged for `device`, ahead on a thread or on demand."""

    def __init__(self, produce: Callable[[], Batch], transformer: DataTransformer | None,
                 device: torch.device, depth: int, background: bool = True,
                 name: str = "protonet-prefetch"):
        self._produce = produce
        self._transformer = transformer
        self._pin = device.type == "cuda" and torch.cuda.is_available()
        self._failure: _Failure | None = None
        self._thread = None
        if background:
            self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

    def next(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next batch's (data, label) on `device`."""
        batch = self._take() if self._thread is not None else self._stage(self._produce())
        return self._deliver(batch, device)

    def close(self) -> None:
        """Stop the thread (if any); batches still queued are dropped."""
        if self._thread is None:
            return
        self._stop.set()
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.05)
        self._thread = None

    # -- worker side ----------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._stage(self._produce())
            except BaseException as error:  # handed over to the consumer, not printed
                item = _Failure(error)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, _Failure):
                return

    def _stage(self, batch: Batch) -> Batch:
        if self._pin:
            batch.data = batch.data.pin_memory()
            if batch.label is not None:
                batch.label = batch.label.pin_memory()
        elif not batch.normalized:
            batch.data = self._transformer.normalize(batch)
            batch.normalized = True
        return batch

    # -- consumer side --------------------------------------------------------------
    def _take(self) -> Batch:
        while self._failure is None:
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                if self._thread is None or not self._thread.is_alive():
                    raise RuntimeError("the data prefetch thread is not running") from None
                continue
            if isinstance(item, _Failure):
                self._failure = item
                break
            return item
        raise self._failure.error

    def _deliver(self, batch: Batch, device: torch.device):
        data = batch.data.to(device, non_blocking=True)
        label = None if batch.label is None else batch.label.to(device, non_blocking=True)
        if not batch.normalized:
            batch.data = data
            data = self._transformer.normalize(batch)
        return data, label
