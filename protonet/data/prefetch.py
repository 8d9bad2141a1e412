"""Background batch loading, so that decoding overlaps the net's compute.

Caffe's prefetching data layers fill a queue of `data_param.prefetch` batches on
an internal thread while the net runs. `Loader` does the same with one daemon
thread per layer calling the layer's `next_batch` (which itself decodes the
records of a batch on a thread pool); batches come out in production order, so
TEST batches stay deterministic. For a CUDA net a batch is left as pinned uint8
and copied with `non_blocking=True` (a quarter of the float32 bytes), and the mean
and scale arithmetic runs on the GPU; for a CPU net the loader thread does that
arithmetic too, with numpy. Never with torch there: a torch op large enough to run
in parallel on a second thread starts a second OpenMP thread team, and from then on
the two teams contend for the cores (measured: LeNet training steps 30% slower for
the rest of the run, even while the loader waits on a full queue).

Shutdown: `Loader.close()` (also run when its layer is garbage collected) stops
the thread after the batch in hand; at interpreter exit every loader is closed that
way, so no thread is inside torch or OpenCV while they are torn down. All threads
are daemons, so nothing else can hold the exit up.
"""
from __future__ import annotations

import atexit
import os
import queue
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Executor
from typing import Callable, Iterable, Iterator, TypeVar

import torch

from .transformer import Batch, DataTransformer

CLOSE_TIMEOUT_S = 30.0   # how long close() waits for the batch in hand to be finished
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


class DecodePool:
    """Daemon threads that map a function over one batch's items, results in order.

    Not a ThreadPoolExecutor: those are stopped when the interpreter starts shutting
    down, which would strand a loader thread in the middle of a batch; these keep
    working until `close_all_loaders` (run at exit) has let every loader finish.
    """

    def __init__(self, workers: int, name: str):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}",
                                          daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            task()

    def map(self, function: Callable[[T], R], items: Iterable[T]) -> list[R]:
        items = list(items)
        outcomes: list = [None] * len(items)
        remaining = [len(items)]
        lock, finished = threading.Lock(), threading.Event()

        def run(index: int) -> None:
            try:
                outcomes[index] = (True, function(items[index]))
            except BaseException as error:
                outcomes[index] = (False, error)
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    finished.set()

        for index in range(len(items)):
            self._tasks.put(lambda index=index: run(index))
        if items:
            finished.wait()
        for ok, value in outcomes:
            if not ok:
                raise value
        return [value for _, value in outcomes]

    def close(self) -> None:
        for _ in self._threads:
            self._tasks.put(None)
        for thread in self._threads:
            if thread is not threading.current_thread():   # a finalizer may run here
                thread.join(timeout=CLOSE_TIMEOUT_S)


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
            _LIVE.add(self)

    def next(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next batch's (data, label) on `device`."""
        batch = self._take() if self._thread is not None else self._stage(self._produce())
        return self._deliver(batch, device)

    def close(self) -> None:
        """Stop the thread (if any); batches still queued are dropped."""
        if self._thread is None:
            return
        self._stop.set()
        if self._thread is threading.current_thread():    # a finalizer may run here
            return
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
            batch.data = self._transformer.normalize_on_host(batch)
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


_LIVE: "weakref.WeakSet[Loader]" = weakref.WeakSet()


@atexit.register
def close_all_loaders() -> None:
    """Let every loader thread finish its batch and stop before the interpreter
    tears down the libraries they call into (torch, OpenCV)."""
    for loader in list(_LIVE):
        loader.close()
