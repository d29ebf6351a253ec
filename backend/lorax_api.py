"""LoRAX-compatible routes: ``POST /generate``, ``POST /generate_stream`` and ``POST /``.

Existing LoRAX clients work unchanged: ``parameters.adapter_id`` is a Quiver adapter reference
(the registry plays the role of LoRAX's ``hub`` source), and ``POST /`` dispatches on ``stream``
the way the ``lorax-client`` package expects. Errors use LoRAX's shape ``{"error", "error_type"}``
(plus Quiver's stable ``code``): a bad or unknown adapter fails with 424 as in LoRAX, invalid
parameters with 422, back-pressure with 429, an unreachable registry with 503 and Retry-After.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from quiver.backend.deps import GenerationDep
from quiver.backend.generation import Generation, unless_disconnected
from quiver.backend.openai_api import ManagedStream, sse
from quiver.errors import (
    IncompatibleAdapter,
    InvalidAdapter,
    InvalidRequest,
    NotFound,
    Overloaded,
    QuiverError,
    Unavailable,
    UnservableAdapter,
    UpstreamError,
)

__all__ = ["router", "LoraxParameters", "LoraxRequest", "lorax_error"]

router = APIRouter()
_SOURCES = {None, "hub", "quiver"}


class LoraxParameters(BaseModel):
    model_config = ConfigDict(extra="ignore")

    adapter_id: str | None = Field(default=None, max_length=400)
    adapter_source: str | None = None
    api_token: str | None = None
    merged_adapters: dict[str, Any] | None = None
    max_new_tokens: int | None = Field(default=None, ge=1)
    do_sample: bool = False
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0)
    stop: list[str] = Field(default_factory=list, max_length=8)
    ignore_eos_token: bool = False
    details: bool = False
    decoder_input_details: bool = False
    return_full_text: bool = False
    best_of: int | None = Field(default=None, ge=1)
    response_format: dict[str, Any] | None = None


class LoraxRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: str = Field(min_length=1)
    parameters: LoraxParameters = Field(default_factory=LoraxParameters)
    stream: bool = False


_ADAPTER_ERRORS = (NotFound, IncompatibleAdapter, UnservableAdapter, InvalidAdapter, UpstreamError)


def lorax_error(exc: QuiverError) -> tuple[int, str]:
    """LoRAX's status and ``error_type`` for a Quiver error."""
    if isinstance(exc, _ADAPTER_ERRORS):
        return 424, "generation"
    if isinstance(exc, InvalidRequest):
        return 422, "validation"
    if isinstance(exc, Overloaded):
        return 429, "overloaded"
    if isinstance(exc, Unavailable):
        return 503, "overloaded"
    return exc.status, "generation"


def _error_body(exc: QuiverError) -> dict[str, Any]:
    _, kind = lorax_error(exc)
    return {"error": exc.message, "error_type": kind, "code": exc.code, "details": exc.details}


def _error_response(exc: QuiverError) -> JSONResponse:
    status, _ = lorax_error(exc)
    headers = {"X-Error-Code": exc.code}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, int(round(exc.retry_after))))
    return JSONResponse(_error_body(exc), status_code=status, headers=headers)


async def _parse(request: Request) -> LoraxRequest:
    try:
        raw = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the body is not JSON: {exc}") from None
    try:
        req = LoraxRequest.model_validate(raw)
    except ValidationError as exc:
        msgs = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise InvalidRequest("; ".join(msgs), details={"errors": msgs}) from None
    p = req.parameters
    if p.adapter_source not in _SOURCES:
        raise UnservableAdapter(f"adapter_source {p.adapter_source!r} is not served here; "
                                "adapters come from the Quiver registry (source 'hub')",
                                details={"param": "adapter_source"})
    if p.merged_adapters:
        raise UnservableAdapter("merged_adapters is not supported by this backend",
                                details={"param": "merged_adapters"})
    if p.response_format:
        raise InvalidRequest("response_format is not supported by this backend",
                             details={"param": "response_format"})
    if p.best_of not in (None, 1):
        raise InvalidRequest("best_of > 1 is not supported", details={"param": "best_of"})
    return req


def _sampling(gen: Generation, p: LoraxParameters, max_tokens: int) -> Any:
    sample = p.do_sample or (p.temperature not in (None, 0.0)) or p.top_p is not None \
        or p.top_k is not None
    return gen.make_params(max_tokens=max_tokens,
                           temperature=(p.temperature if p.temperature is not None else 1.0)
                           if sample else 0.0,
                           top_p=p.top_p if sample and p.top_p is not None else 1.0,
                           top_k=p.top_k if sample and p.top_k is not None else 0,
                           seed=p.seed, stop=list(p.stop), ignore_eos=p.ignore_eos_token)


class _Tokens:
    """Token ids to LoRAX's token objects and finish reasons."""

    def __init__(self, gen: Generation) -> None:
        tok = gen.tokenizer
        self.special = set(getattr(tok, "all_special_ids", []) or [])
        eos = getattr(tok, "eos_token_id", None)
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}

    def token(self, token_id: int, text: str | None, logprob: float | None) -> dict[str, Any]:
        return {"id": token_id, "text": text or "",
                "logprob": logprob if logprob is not None else 0.0,
                "special": token_id in self.special}

    def finish(self, reason: str | None, last_id: int | None) -> str:
        if reason == "length":
            return "length"
        return "eos_token" if last_id in self.eos else "stop_sequence"


async def _admit(gen: Generation, req: LoraxRequest, stack: contextlib.AsyncExitStack,
                 request: Request) -> Any:
    ids = gen.encode(req.inputs)
    budget = gen.budget(ids, req.parameters.max_new_tokens)
    rid = request.headers.get("x-request-id") or None
    return await stack.enter_async_context(
        gen.admit(req.parameters.adapter_id, ids, budget, rid))


async def _generate(gen: Generation, req: LoraxRequest,
                    request: Request) -> tuple[dict[str, Any], str]:
    p = req.parameters
    async with contextlib.AsyncExitStack() as stack:
        adm = await _admit(gen, req, stack, request)
        params = _sampling(gen, p, adm.max_tokens)
        toks = _Tokens(gen)
        started = time.perf_counter()
        res = await unless_disconnected(request.receive, gen.run(adm, params))
    text = req.inputs + res.text if p.return_full_text else res.text
    body: dict[str, Any] = {"generated_text": text}
    if p.details:
        tokens = [toks.token(tid, gen.tokenizer.decode([tid]), lp)
                  for tid, lp in zip(res.token_ids, res.logprobs)]
        body["details"] = {
            "finish_reason": toks.finish(res.finish_reason,
                                         res.token_ids[-1] if res.token_ids else None),
            "prompt_tokens": res.prompt_tokens, "generated_tokens": res.completion_tokens,
            "seed": p.seed, "prefill": [], "tokens": tokens,
            "inference_time_ms": round((time.perf_counter() - started) * 1000, 3)}
    return body, adm.model


async def _generate_stream(gen: Generation, req: LoraxRequest, request: Request):
    p = req.parameters
    stack = contextlib.AsyncExitStack()
    try:
        adm = await _admit(gen, req, stack, request)
        stream = await gen.open(adm, _sampling(gen, p, adm.max_tokens))
        stack.push_async_callback(stream.aclose)
    except BaseException:
        await stack.aclose()
        raise
    toks = _Tokens(gen)

    def token_of(ev: Any) -> dict[str, Any]:
        return toks.token(ev.token_id, ev.text, ev.logprob)

    async def events() -> AsyncIterator[bytes]:
        text: list[str] = [req.inputs] if p.return_full_text else []
        held: Any = None
        try:
            async for ev in stream:
                if ev.token_id is not None:
                    if held is not None:
                        yield sse({"token": token_of(held), "generated_text": None,
                                   "details": None})
                    held = ev
                    text.append(ev.text or "")
                if ev.finished:
                    if held is None:
                        raise QuiverError("the engine finished without a token")
                    yield sse({"token": token_of(held), "generated_text": "".join(text),
                               "details": {"finish_reason": toks.finish(ev.finish_reason,
                                                                        held.token_id),
                                           "prompt_tokens": ev.prompt_tokens,
                                           "generated_tokens": ev.completion_tokens,
                                           "seed": p.seed}})
                    return
        except Exception as exc:  # after the 200: the error travels inside the stream
            err = exc if isinstance(exc, QuiverError) else QuiverError(
                f"generation failed: {exc}")
            gen.count_error(err)
            yield sse(_error_body(err))
        finally:
            await stack.aclose()

    return ManagedStream(events(), on_close=stack, headers={"X-Quiver-Adapter": adm.model})


async def _dispatch(request: Request, gen: Generation, stream: bool | None):
    try:
        req = await _parse(request)
        if stream if stream is not None else req.stream:
            return await _generate_stream(gen, req, request)
        body, model = await _generate(gen, req, request)
        # POST / answers a list of one response, as LoRAX does.
        return JSONResponse(body if stream is not None else [body],
                            headers={"X-Quiver-Adapter": model})
    except QuiverError as exc:
        return _error_response(exc)


@router.post("/generate")
async def generate(request: Request, gen: GenerationDep):
    return await _dispatch(request, gen, False)


@router.post("/generate_stream")
async def generate_stream(request: Request, gen: GenerationDep):
    return await _dispatch(request, gen, True)


@router.post("/")
async def compat_generate(request: Request, gen: GenerationDep):
    return await _dispatch(request, gen, None)
