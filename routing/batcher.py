"""Micro-batching of encoder calls across concurrent requests.

Callers ``await batcher.embed(text)``; one worker task drains the queue, encodes up to
``max_batch`` distinct texts in one call on a worker thread, and resolves each caller's own
future with its own row. While a batch is being encoded the next one gathers, so batches grow
with load without any added wait; ``window_ms`` can add a short wait to gather more.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["MicroBatcher"]


class MicroBatcher:
    def __init__(self, encode: Callable[[Sequence[str]], np.ndarray], *, max_batch: int = 32,
                 window_ms: float = 0.0) -> None:
        self._encode = encode
        self.max_batch = max(1, max_batch)
        self.window = max(0.0, window_ms) / 1000.0
        self._queue: asyncio.Queue[tuple[str, asyncio.Future]] | None = None
        self._worker: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quiver-encode")
        self.batches = 0
        self.items = 0
        self.largest_batch = 0

    async def start(self) -> None:
        if self._worker is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._run(), name="quiver-router-batcher")

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        if self._queue is not None:
            while not self._queue.empty():
                _, fut = self._queue.get_nowait()
                if not fut.done():
                    fut.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def embed(self, text: str) -> np.ndarray:
        """The embedding of ``text``, encoded together with whatever else is waiting."""
        if self._worker is None:
            await self.start()
        assert self._queue is not None
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        await self._queue.put((text, fut))
        return await fut

    def _drain(self, batch: list[tuple[str, asyncio.Future]]) -> None:
        assert self._queue is not None
        while len(batch) < self.max_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            self._drain(batch)
            if self.window and len(batch) < self.max_batch:
                deadline = time.monotonic() + self.window
                while len(batch) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                    try:
                        batch.append(await asyncio.wait_for(self._queue.get(), left))
                    except TimeoutError:
                        break
                    self._drain(batch)
            live = [(t, f) for t, f in batch if not f.done()]
            if not live:
                continue
            texts = list(dict.fromkeys(t for t, _ in live))
            try:
                emb = await loop.run_in_executor(self._pool, self._encode, texts)
            except Exception as exc:  # noqa: BLE001 - the error belongs to the callers
                for _, f in live:
                    if not f.done():
                        f.set_exception(exc)
                continue
            row = {t: emb[i] for i, t in enumerate(texts)}
            for t, f in live:
                if not f.done():
                    f.set_result(row[t])
            self.batches += 1
            self.items += len(live)
            self.largest_batch = max(self.largest_batch, len(texts))
