"""An asyncio facade over :class:`Engine`: one background thread runs every engine call.

Requests, cancellations and adapter loads are handed to that thread as operations and run
between steps, so the engine itself never sees two threads. Token events flow back to each
request's ``asyncio.Queue`` through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from quiver.backend.engine.engine import Engine
from quiver.backend.engine.lora import PreparedAdapter
from quiver.backend.engine.types import SamplingParams, TokenEvent
from quiver.errors import Unavailable

__all__ = ["AsyncEngine"]

log = logging.getLogger(__name__)


class AsyncEngine:
    """Thread-safe asyncio interface: ``generate`` streams :class:`TokenEvent` objects."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._ops: deque[Callable[[], None]] = deque()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._running = False
        self._accepting = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, asyncio.Queue[TokenEvent]] = {}
        self._stats: dict[str, Any] = engine.stats()
        self._ids = itertools.count()

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._running = self._accepting = True
        self._thread = threading.Thread(target=self._run, name="quiver-engine", daemon=True)
        self._thread.start()

    async def stop(self, drain_timeout: float = 30) -> None:
        """Stop accepting, let in-flight requests finish within ``drain_timeout``, cancel
        the rest, then stop the engine thread."""
        if self._thread is None:
            return
        self._accepting = False
        deadline = time.monotonic() + drain_timeout
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._streams:
            self._submit(lambda: self.engine.abort_all("cancelled"))
        while self._streams and time.monotonic() < deadline + 5:
            await asyncio.sleep(0.02)
        self._running = False
        self._wake.set()
        thread, self._thread = self._thread, None
        await asyncio.to_thread(thread.join, 10)

    # -- the engine thread ------------------------------------------------------------------

    def _submit(self, op: Callable[[], None]) -> None:
        self._ops.append(op)
        self._wake.set()

    def _run(self) -> None:
        while self._running:
            while self._ops:
                op = self._ops.popleft()
                try:
                    op()
                except Exception:  # an op reports its own errors to its caller
                    log.exception("engine operation failed")
            if self.engine.has_work():
                try:
                    events = self.engine.step()
                except Exception:
                    log.exception("engine step failed; failing every request")
                    self.engine.abort_all("error")
                    events = self.engine.step()
                self._stats = self.engine.stats()
                if events:
                    assert self._loop is not None
                    self._loop.call_soon_threadsafe(self._dispatch, events)
            else:
                self._stats = self.engine.stats()
                self._wake.wait(0.05)
                self._wake.clear()

    def _dispatch(self, events: list[TokenEvent]) -> None:
        for ev in events:
            q = self._streams.get(ev.request_id)
            if q is not None:
                q.put_nowait(ev)

    async def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine thread between steps and return its result."""
        if self._thread is None:
            raise Unavailable("the engine is not started")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def op() -> None:
            try:
                result = fn()
            except BaseException as exc:  # handed to the awaiting caller
                loop.call_soon_threadsafe(_set_exception, fut, exc)
            else:
                loop.call_soon_threadsafe(_set_result, fut, result)

        self._submit(op)
        return await fut

    # -- public API -------------------------------------------------------------------------

    async def generate(self, prompt_ids: list[int], *, adapter: str | None,
                       params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[TokenEvent]:
        """Stream the request's events; closing the iterator cancels the request."""
        if not self._accepting:
            raise Unavailable("the engine is shutting down", retry_after=1.0)
        rid = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._streams[rid] = queue
        finished = False
        try:
            await self._call(lambda: self.engine.add_request(rid, list(prompt_ids), adapter,
                                                             params))
            while True:
                ev = await queue.get()
                finished = ev.finished
                yield ev
                if finished:
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished and self._thread is not None:
                self._submit(lambda: self.engine.cancel(rid))

    async def load_adapter(self, key: str, prepared: PreparedAdapter) -> int:
        return await self._call(lambda: self.engine.load_adapter(key, prepared))

    async def unload_adapter(self, key: str) -> None:
        await self._call(lambda: self.engine.unload_adapter(key))

    def stats(self) -> dict[str, Any]:
        return dict(self._stats)


def _set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
