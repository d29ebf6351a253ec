"""OpenAI-compatible routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

``model`` is an adapter reference (``repo/3``, ``repo@prod``, ``repo``) or the base model's name
for no adapter. Answers name the adapter version that served them (``repo/N``), also in the
``X-Quiver-Adapter`` header. Streams are server-sent events ending with ``data: [DONE]``; an
error after the stream has started arrives as ``data: {"error": {...}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import StreamingResponse

from quiver.backend.deps import GenerationDep, ResidencyDep
from quiver.backend.generation import (
    Finished,
    Generation,
    finish_reason,
    unless_disconnected,
)
from quiver.errors import InvalidRequest, QuiverError
from quiver.http import openai_error_body
from quiver.logging import get_logger

__all__ = ["router", "CompletionRequest", "ChatRequest", "ManagedStream", "sse"]

router = APIRouter()
_log = get_logger("quiver.backend.openai")
_MAX_N = 16


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(max_length=400)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    n: int = Field(default=1, ge=1, le=_MAX_N)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 8 or any(not s for s in stops):
            raise InvalidRequest("stop takes at most 8 non-empty strings",
                                 details={"param": "stop"})
        return stops


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest("only text content parts are supported",
                                     details={"param": "messages"})
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False


def sse(payload: Any) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


class ManagedStream(StreamingResponse):
    """A stream whose admission (adapter lease, place in line) is released however it ends."""

    def __init__(self, content: AsyncIterator[bytes], on_close: contextlib.AsyncExitStack,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                  **(headers or {})})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[override]
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close.aclose()


async def _admit_all(gen: Generation, stack: contextlib.AsyncExitStack, model: str,
                     prompts: list[list[int]], max_tokens: int | None, n: int,
                     request_id: str) -> list[Any]:
    """Admit ``n`` generations per prompt; raises before anything is streamed."""
    admitted = []
    for p, ids in enumerate(prompts):
        budget = gen.budget(ids, max_tokens)
        for j in range(n):
            rid = request_id if len(prompts) * n == 1 else f"{request_id}-{p * n + j}"
            admitted.append(await stack.enter_async_context(gen.admit(model, ids, budget, rid)))
    return admitted


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


async def _merge(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several event streams as they produce, tagging each event with its index."""
    if len(streams) == 1:
        async for ev in streams[0]:
            yield 0, ev
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(i: int, s: AsyncIterator[Any]) -> None:
        try:
            async for ev in s:
                await queue.put((i, ev))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            await queue.put((i, exc))
            return
        await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _usage_chunk(body: _Sampling, cid: str, created: int, model: str,
                 kind: str) -> Callable[[dict[str, int]], dict[str, Any]] | None:
    """The builder of the last chunk (usage, no choices) when the client asked for it."""
    if not (body.stream_options and body.stream_options.include_usage):
        return None
    return lambda u: {"id": cid, "object": kind, "created": created, "model": model,
                      "choices": [], "usage": u}


def _stream_error(err: QuiverError) -> bytes:
    return sse(openai_error_body(err))


async def _open_all(gen: Generation, stack: contextlib.AsyncExitStack, admitted: list[Any],
                    params_for: dict[str, Any]) -> list[AsyncIterator[Any]]:
    """Start every admitted request and wait for each one's first event; closing ``stack``
    cancels whatever has not finished."""
    opened = await asyncio.gather(*(gen.open(r, params_for[r.request_id]) for r in admitted),
                                  return_exceptions=True)
    failure = next((o for o in opened if isinstance(o, BaseException)), None)
    if failure is not None:
        for o in opened:
            if not isinstance(o, BaseException):
                await o.aclose()
        raise failure
    for o in opened:
        stack.push_async_callback(o.aclose)
    return list(opened)


async def _event_stream(gen: Generation, stack: contextlib.AsyncExitStack, admitted: list[Any],
                        streams: list[AsyncIterator[Any]],
                        chunk: Callable[[int, Any], dict[str, Any] | None],
                        first: Callable[[int], dict[str, Any] | None],
                        last: Callable[[int, str], dict[str, Any]],
                        usage_chunk: Callable[[dict[str, int]], dict[str, Any]] | None
                        ) -> AsyncIterator[bytes]:
    prompt_total = sum(len(r.prompt_ids) for r in admitted)
    completion = [0] * len(admitted)
    try:
        for i in range(len(admitted)):
            head = first(i)
            if head is not None:
                yield sse(head)
        async for i, ev in _merge(streams):
            if ev.token_id is not None:
                completion[i] = ev.completion_tokens or completion[i] + 1
            body = chunk(i, ev)
            if body is not None:
                yield sse(body)
            if ev.finished:
                completion[i] = ev.completion_tokens
                yield sse(last(i, finish_reason(ev.finish_reason)))
        if usage_chunk is not None:
            yield sse(usage_chunk(_usage(prompt_total, sum(completion))))
        yield b"data: [DONE]\n\n"
    except Exception as exc:  # after the 200: the error can only travel inside the stream
        err = exc if isinstance(exc, QuiverError) else QuiverError(f"generation failed: {exc}")
        if not isinstance(exc, QuiverError):
            _log.exception("stream failed", exc_info=exc)
        gen.count_error(err)
        yield _stream_error(err)
        yield b"data: [DONE]\n\n"
    finally:
        await stack.aclose()


def _headers(admitted: list[Any], request_id: str) -> dict[str, str]:
    return {"X-Quiver-Adapter": admitted[0].model, "X-Request-Id": request_id}


def _request_id(request: Request) -> str:
    rid = request.headers.get("x-request-id", "")
    return rid if 0 < len(rid) <= 128 else uuid.uuid4().hex


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, gen: GenerationDep):
    prompts = _prompts(gen, body.prompt)
    if body.echo:
        raise InvalidRequest("echo is not supported", details={"param": "echo"})
    request_id = _request_id(request)
    cid, created = f"cmpl-{request_id}", int(time.time())
    stack = contextlib.AsyncExitStack()
    try:
        admitted = await _admit_all(gen, stack, body.model, prompts, body.max_tokens, body.n,
                                    request_id)
        params_for = _per_request(gen, body, admitted)
    except BaseException:
        await stack.aclose()
        raise
    model = admitted[0].model

    if body.stream:
        def chunk(i: int, ev: Any) -> dict[str, Any] | None:
            if not ev.text:
                return None
            return {"id": cid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": i, "text": ev.text, "logprobs": None,
                                 "finish_reason": None}]}

        def last(i: int, reason: str) -> dict[str, Any]:
            return {"id": cid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": i, "text": "", "logprobs": None,
                                 "finish_reason": reason}]}

        usage = _usage_chunk(body, cid, created, model, "text_completion")
        try:
            streams = await _open_all(gen, stack, admitted, params_for)
        except BaseException:
            await stack.aclose()
            raise
        return ManagedStream(_event_stream(gen, stack, admitted, streams, chunk,
                                           lambda i: None, last, usage),
                             on_close=stack, headers=_headers(admitted, request_id))
    async with stack:
        results = await _run_all(gen, request, admitted, params_for)
    choices = []
    for i, res in enumerate(results):
        lp = None
        if body.logprobs is not None:
            lp = {"tokens": [gen.tokenizer.decode([t]) for t in res.token_ids],
                  "token_logprobs": res.logprobs, "top_logprobs": None, "text_offset": None}
        choices.append({"index": i, "text": res.text, "logprobs": lp,
                        "finish_reason": finish_reason(res.finish_reason)})
    return JSONResponse({"id": cid, "object": "text_completion", "created": created,
                         "model": model, "choices": choices,
                         "usage": _usage(sum(len(r.prompt_ids) for r in admitted),
                                         sum(r.completion_tokens for r in results))},
                        headers=_headers(admitted, request_id))


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request, gen: GenerationDep):
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    ids = gen.encode_chat(messages)
    max_tokens = body.max_completion_tokens or body.max_tokens
    request_id = _request_id(request)
    cid, created = f"chatcmpl-{request_id}", int(time.time())
    stack = contextlib.AsyncExitStack()
    try:
        admitted = await _admit_all(gen, stack, body.model, [ids], max_tokens, body.n, request_id)
        params_for = _per_request(gen, body, admitted)
    except BaseException:
        await stack.aclose()
        raise
    model = admitted[0].model

    if body.stream:
        def base(i: int, delta: dict[str, Any], reason: str | None) -> dict[str, Any]:
            return {"id": cid, "object": "chat.completion.chunk", "created": created,
                    "model": model, "choices": [{"index": i, "delta": delta, "logprobs": None,
                                                 "finish_reason": reason}]}

        def chunk(i: int, ev: Any) -> dict[str, Any] | None:
            return base(i, {"content": ev.text}, None) if ev.text else None

        usage = _usage_chunk(body, cid, created, model, "chat.completion.chunk")
        try:
            streams = await _open_all(gen, stack, admitted, params_for)
        except BaseException:
            await stack.aclose()
            raise
        return ManagedStream(
            _event_stream(gen, stack, admitted, streams, chunk,
                          lambda i: base(i, {"role": "assistant", "content": ""}, None),
                          lambda i, reason: base(i, {}, reason), usage),
            on_close=stack, headers=_headers(admitted, request_id))
    async with stack:
        results = await _run_all(gen, request, admitted, params_for)
    choices = []
    for i, res in enumerate(results):
        lp = None
        if body.logprobs:
            lp = {"content": [{"token": gen.tokenizer.decode([t]), "logprob": p,
                               "top_logprobs": []}
                              for t, p in zip(res.token_ids, res.logprobs)]}
        choices.append({"index": i, "message": {"role": "assistant", "content": res.text},
                        "logprobs": lp, "finish_reason": finish_reason(res.finish_reason)})
    return JSONResponse({"id": cid, "object": "chat.completion", "created": created,
                         "model": model, "choices": choices,
                         "usage": _usage(len(ids) * len(admitted),
                                         sum(r.completion_tokens for r in results))},
                        headers=_headers(admitted, request_id))


def _per_request(gen: Generation, body: _Sampling, admitted: list[Any]) -> dict[str, Any]:
    """Sampling parameters per admitted request (their budgets can differ by prompt)."""
    out = {}
    for k, r in enumerate(admitted):
        seed = body.seed + k if body.seed is not None else None
        out[r.request_id] = gen.make_params(max_tokens=r.max_tokens,
                                            temperature=body.temperature, top_p=body.top_p,
                                            top_k=body.top_k, seed=seed, stop=body.stops(),
                                            ignore_eos=body.ignore_eos)
    return out


async def _run_all(gen: Generation, request: Request, admitted: list[Any],
                   params_for: dict[str, Any]) -> list[Finished]:
    """Run every admitted request to the end; a client that leaves cancels them all."""
    work = asyncio.gather(*(gen.run(r, params_for[r.request_id]) for r in admitted))
    return list(await unless_disconnected(request.receive, work))


def _prompts(gen: Generation, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        return [gen.encode(prompt)]
    if not prompt:
        raise InvalidRequest("the prompt is empty", details={"param": "prompt"})
    if all(isinstance(p, int) for p in prompt):
        return [gen.check_ids(prompt)]
    if len(prompt) > _MAX_N:
        raise InvalidRequest(f"at most {_MAX_N} prompts per request", details={"param": "prompt"})
    return [gen.encode(p) if isinstance(p, str) else gen.check_ids(p) for p in prompt]


@router.get("/v1/models")
async def list_models(gen: GenerationDep, residency: ResidencyDep):
    created = int(time.time())
    data = [{"id": gen.base_model_name, "object": "model", "created": created,
             "owned_by": "quiver", "root": gen.base_model_name, "parent": None}]
    for e in sorted(residency.entries(), key=lambda e: e.ref):
        tiers = e.tiers()
        if tiers:                                   # held here: in a slot, in memory or on disk
            data.append({"id": e.ref, "object": "model", "created": created,
                         "owned_by": "quiver", "root": gen.base_model_name,
                         "parent": gen.base_model_name, "tier": tiers[0], "tiers": tiers,
                         "revision": e.revision})
    return {"object": "list", "data": data}
