"""What both HTTP APIs share: model names to adapters, prompt checks, admission and accounting.

:class:`Generation` turns a request's ``model`` into a residency lease, checks the prompt and
token budget against the context length, admits or refuses the request (back-pressure), runs it
on the engine and counts what it did.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from quiver.backend.metrics import BackendMetrics
from quiver.backend.residency import Lease, Residency
from quiver.errors import ContextLengthExceeded, InvalidRequest, Overloaded, QuiverError

__all__ = ["Generation", "Request", "Finished", "GenerateEngine", "finish_reason",
           "unless_disconnected", "ClientGone"]


class GenerateEngine(Protocol):
    def generate(self, prompt_ids: list[int], *, adapter: str | None, params: Any,
                 request_id: str) -> AsyncIterator[Any]: ...


@dataclass(slots=True)
class Request:
    """One admitted request: the adapter it holds and its token budget."""

    request_id: str
    model: str                  # the name to answer with ("repo/N" or the base model's)
    lease: Lease
    prompt_ids: list[int]
    max_tokens: int
    arrived: float


@dataclass(slots=True)
class Finished:
    """The totals of a finished generation."""

    text: str
    token_ids: list[int]
    logprobs: list[float | None]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


# The engine's finish reasons in OpenAI's words.
_OPENAI_FINISH = {"length": "length", "stop": "stop", "eos": "stop", "eos_token": "stop",
                  "stop_sequence": "stop", "abort": "stop", "cancelled": "stop"}


class ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


async def unless_disconnected(receive: Callable[[], Awaitable[dict[str, Any]]],
                              work: Awaitable[Any]) -> Any:
    """Await ``work``, cancelling it (and so its engine requests) if the client disconnects.

    ``receive`` is the ASGI receive of a request whose body has been read: its next message
    is ``http.disconnect``."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.create_task(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise ClientGone()


def finish_reason(engine_reason: str | None) -> str:
    return _OPENAI_FINISH.get(engine_reason or "stop", "stop")


_FALLBACK_CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


class Generation:
    """Admission, adapter leases and accounting around the engine, shared by both APIs."""

    def __init__(self, *, engine: GenerateEngine, tokenizer: Any, residency: Residency,
                 metrics: BackendMetrics, base_model_name: str, aliases: tuple[str, ...] = (),
                 max_context: int, max_running: int, max_queue: int, vocab_size: int,
                 params_factory: Callable[..., Any]) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.residency = residency
        self.metrics = metrics
        self.base_model_name = base_model_name
        self._base_names = {"", base_model_name, *aliases}
        self.max_context = max_context
        self.max_running = max_running
        self.max_queue = max_queue
        self.vocab_size = vocab_size
        self._params_factory = params_factory
        self.active = 0          # admitted, not finished (waiting for an adapter or generating)
        self.generating = 0      # holding an adapter and running on the engine
        self.draining = False

    # --- names and prompts -----------------------------------------------------------------

    def adapter_of(self, model: str | None) -> str | None:
        """The adapter reference a request's ``model`` names, or None for the base model."""
        if model is None or model.strip() in self._base_names:
            return None
        return model.strip()

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequest("this model has no tokenizer: send token ids as the prompt",
                                 details={"param": "prompt"})
        self._check_chars(len(text))
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def _check_chars(self, n: int) -> None:
        # Refuse before tokenizing: no tokenizer averages 32 characters a token, and
        # tokenizing megabytes would stall every other request on this event loop.
        if n > self.max_context * 32:
            raise ContextLengthExceeded(
                f"a prompt of {n} characters cannot fit this model's context of "
                f"{self.max_context} tokens", details={"param": "prompt", "characters": n,
                                                       "max_context": self.max_context})

    def check_ids(self, ids: list[int]) -> list[int]:
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise InvalidRequest(f"token ids must lie in [0, {self.vocab_size})",
                                 details={"param": "prompt"})
        return list(ids)

    def make_params(self, **fields: Any) -> Any:
        """The engine's sampling parameters; their own checks become a 400."""
        params = self._params_factory(**fields)
        problems = params.problems() if hasattr(params, "problems") else []
        if problems:
            raise InvalidRequest("; ".join(problems), details={"problems": problems})
        return params

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequest("this model has no tokenizer, so it cannot chat",
                                 details={"param": "messages"})
        self._check_chars(sum(len(str(m.get("content") or "")) for m in messages))
        template = getattr(self.tokenizer, "chat_template", None) or _FALLBACK_CHAT
        try:
            out = self.tokenizer.apply_chat_template(messages, chat_template=template,
                                                     add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # a template's own errors (TemplateError, KeyError, ...)
            raise InvalidRequest(f"messages do not fit the model's chat template: {exc}",
                                 details={"param": "messages"}) from exc
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return list(out)

    def budget(self, prompt_ids: list[int], max_tokens: int | None) -> int:
        """The number of tokens to generate; raises when the request cannot fit the context."""
        n = len(prompt_ids)
        if n == 0:
            raise InvalidRequest("the prompt is empty", details={"param": "prompt"})
        if n >= self.max_context:
            raise ContextLengthExceeded(
                f"the prompt has {n} tokens; this model's context length is {self.max_context}",
                details={"param": "messages", "prompt_tokens": n,
                         "max_context": self.max_context})
        room = self.max_context - n
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise ContextLengthExceeded(
                f"this model's context length is {self.max_context} tokens; the prompt has {n} "
                f"and max_tokens asks for {max_tokens} more",
                details={"param": "max_tokens", "prompt_tokens": n, "max_tokens": max_tokens,
                         "max_context": self.max_context})
        return max_tokens

    # --- admission -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def admit(self, model: str | None, prompt_ids: list[int], max_tokens: int,
                    request_id: str | None = None) -> AsyncIterator[Request]:
        """Hold a place and the adapter's slot for one request; everything is released after."""
        if self.draining:
            raise Overloaded("this backend is shutting down", retry_after=1.0)
        if self.active >= self.max_running + self.max_queue:
            raise Overloaded(f"{self.active} requests in flight; try again shortly",
                             retry_after=1.0)
        arrived = time.perf_counter()
        self.active += 1
        try:
            lease = await self.residency.acquire(self.adapter_of(model))
            with lease:
                self.generating += 1
                try:
                    # The engine's id must be unique even when a client reuses its own.
                    rid = f"{request_id}-{uuid.uuid4().hex[:8]}" if request_id \
                        else uuid.uuid4().hex
                    yield Request(request_id=rid, model=lease.ref
                                  or self.base_model_name, lease=lease, prompt_ids=prompt_ids,
                                  max_tokens=max_tokens, arrived=arrived)
                finally:
                    self.generating -= 1
        finally:
            self.active -= 1

    async def open(self, req: Request, params: Any) -> AsyncIterator[Any]:
        """Start ``req`` on the engine and wait for its first event, so that a refusal is
        raised here (and becomes an HTTP error) rather than in the middle of a stream."""
        gen = self.engine.generate(req.prompt_ids, adapter=req.lease.key, params=params,
                                   request_id=req.request_id)
        try:
            first = await anext(gen)
        except BaseException:
            await gen.aclose()
            raise
        self.metrics.ttft.observe(time.perf_counter() - req.arrived)
        return self._continue(first, gen)

    async def _continue(self, first: Any, gen: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async with contextlib.aclosing(gen):
            event = first
            while True:
                if event.finished:
                    if event.finish_reason == "error":
                        raise QuiverError("the engine failed while generating this request")
                    self.metrics.count_tokens(event.prompt_tokens, event.completion_tokens)
                    yield event
                    return
                yield event
                try:
                    event = await anext(gen)
                except StopAsyncIteration:
                    return

    async def stream(self, req: Request, params: Any) -> AsyncIterator[Any]:
        """The engine's token events for ``req`` (see :meth:`open`)."""
        events = await self.open(req, params)
        async with contextlib.aclosing(events):
            async for event in events:
                yield event

    async def run(self, req: Request, params: Any) -> Finished:
        """Generate to the end and collect the text."""
        parts: list[str] = []
        ids: list[int] = []
        logprobs: list[float | None] = []
        reason, prompt_tokens, completion_tokens = "stop", len(req.prompt_ids), 0
        async for ev in self.stream(req, params):
            if ev.token_id is not None and ev.token_id >= 0:
                ids.append(ev.token_id)
                logprobs.append(ev.logprob)
            parts.append(ev.text or "")
            if ev.finished:
                reason = ev.finish_reason or "stop"
                prompt_tokens = ev.prompt_tokens or prompt_tokens
                completion_tokens = ev.completion_tokens
        return Finished("".join(parts), ids, logprobs, reason, prompt_tokens,
                        completion_tokens or len(ids))

    def count_error(self, exc: QuiverError) -> None:
        self.metrics.errors.labels(code=exc.code).inc()

    @property
    def queue_depth(self) -> int:
        return max(0, self.active - self.generating)
