"""Dynamic batching: requests that arrive together share one forward pass.

Requests wait in a queue. The batch loop takes the first, then whatever else arrives
within `max_wait` (or is queued already) up to `max_batch` requests (images; one
with ?oversample=1 brings its ten crops), and runs the
predictor on them in one dedicated thread, so the event loop keeps accepting and
decoding while the net runs; requests that arrive during a forward form the next
batch. With max_batch 1 every image runs alone.

A batch of several images gives each image the same answer as running it alone up to
the float rounding of the kernels: oneDNN may pick another convolution algorithm for
another batch size (open_nsfw: scores within 1e-8 of a batch-1 run, not bitwise).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import Any, Callable, Sequence

log = logging.getLogger("protonet")


class Batcher:
    def __init__(self, run: Callable[[Sequence[Any]], list], max_batch: int = 8,
                 max_wait_s: float = 0.005):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.run, self.max_batch, self.max_wait_s = run, max_batch, max(0.0, max_wait_s)
        self.batches = 0          # forward passes run, and images in them (for /healthz)
        self.images = 0
        self.waiting = 0          # images submitted and not yet answered
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="protonet-forward")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """After the server has drained: nothing is queued any more."""
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._pool.shutdown(wait=True)

    async def submit(self, item: Any) -> Any:
        """The answer for one prepared image, from whichever batch it joins."""
        future = asyncio.get_running_loop().create_future()
        self.waiting += 1
        try:
            await self._queue.put((item, future))
            return await future
        finally:
            self.waiting -= 1

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except TimeoutError:
                    break
            batch = [(item, f) for item, f in batch if not f.done()]   # gone clients
            if batch:
                await self._run(loop, batch)

    async def _run(self, loop, batch) -> None:
        try:
            answers = await loop.run_in_executor(self._pool, self.run,
                                                 [item for item, _ in batch])
        except Exception as e:                      # the batch fails, the server goes on
            log.error("forward pass of %d image(s) failed: %s", len(batch), e)
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
            return
        self.batches += 1
        self.images += len(batch)
        for (_, future), answer in zip(batch, answers):
            if not future.done():
                future.set_result(answer)
