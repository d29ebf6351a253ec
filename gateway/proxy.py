"""The hot path: ``POST /v1/chat/completions`` and ``/v1/completions`` as a plain ASGI app.

One request: read the body (413 past ``max_body_bytes``), authenticate, parse only what is
needed, resolve the model, check the key's permission and limits, then try the backends the
balancer orders, at most ``max_attempts`` of them. A request is sent again to the next backend
only while nothing has reached the client: on connection failures, timeouts, 502/503/504, or a
stream that breaks before its first event. Once a stream has started, bytes pass through
unchanged, whole SSE events at a time; if the backend fails after that, the stream ends with an
OpenAI error event, so no text is ever sent twice. A client that goes away cancels the upstream
request, which closes its connection and stops the backend's generation.

Upstream traffic goes through one long-lived ``aiohttp.ClientSession`` (``state.upstream``)
rather than the process's ``httpx.AsyncClient``: httpcore's pool scans every pooled connection
on each request, which at a hundred concurrent streams cost ten times the throughput of aiohttp's
per-host pool on the same machine. The control plane (registry, router, backend state) stays on
httpx.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from typing import Any

import aiohttp

from quiver.errors import (InvalidRequest, NoBackendAvailable, PayloadTooLarge, QuiverError,
                           Timeout, UpstreamError)
from quiver.gateway.keys import ApiKey
from quiver.gateway.resolver import Target
from quiver.gateway.state import GatewayState
from quiver.http import openai_error_body

__all__ = ["Proxy", "ENDPOINTS"]

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
_RETRY_STATUSES = frozenset({502, 503, 504})
_TOTAL_TOKENS = re.compile(rb'"total_tokens"\s*:\s*(\d+)')
_JSON = b"application/json"
# Every way an upstream exchange can fail; aiohttp's read timeouts are asyncio.TimeoutErrors.
_UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


class _Retry(Exception):
    """One attempt failed before anything reached the client; try the next backend."""

    def __init__(self, error: QuiverError, response: tuple[int, bytes, bytes] | None = None):
        super().__init__(error.message)
        self.error = error
        self.response = response  # the upstream's own error answer, passed on if it is the last


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _estimate_tokens(payload: dict[str, Any]) -> int:
    """A rough count for the rate-limit pre-check: 4 characters a token, plus max_tokens."""
    chars = 0
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        chars += len(prompt)
    elif isinstance(prompt, list):
        chars += sum(len(p) for p in prompt if isinstance(p, str))
    for message in payload.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(part.get("text", "")) for part in content if isinstance(part, dict))
    limit = payload.get("max_completion_tokens") or payload.get("max_tokens") or 16
    return chars // 4 + (limit if isinstance(limit, int) and limit > 0 else 16)


def _event_end(data: bytes) -> int:
    """Index just past the last complete SSE event in ``data`` (0 if none is complete)."""
    lf = data.rfind(b"\n\n")
    crlf = data.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


class Proxy:
    """The ASGI app of the two generation endpoints; ``state`` is set by the lifespan."""

    def __init__(self) -> None:
        self.state: GatewayState | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        state = self.state
        assert state is not None, "the gateway lifespan has not run"
        endpoint = ENDPOINTS[scope["path"]]
        request_id = _header(scope, b"x-request-id") or os.urandom(16).hex()
        started = time.perf_counter()
        metrics = state.metrics
        try:
            body = await self._read_body(scope, receive, state.settings.max_body_bytes)
            key = await state.authenticate(_header(scope, b"authorization"))
            payload, target = await self._prepare(state, scope, body, key)
        except QuiverError as exc:
            await self._send_error(send, exc, request_id)
            metrics.count(endpoint, str(exc.status))
            return

        # The watcher cancels this task if the client goes away; it can only run while this
        # task waits inside _forward, so the cancellation always lands there.
        task = asyncio.current_task()
        assert task is not None
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            task.cancel()

        watcher = asyncio.ensure_future(watch())
        tokens = 0
        try:
            tokens = await self._forward(state, scope, send, endpoint, payload, body, target,
                                         request_id, started, count=bool(key and key.tpm))
        except asyncio.CancelledError:
            if not gone:
                raise
            task.uncancel()
            metrics.client_disconnects.inc()
            metrics.count(endpoint, "499")
        finally:
            watcher.cancel()
        if tokens and key is not None:
            await state.limiter.add_tokens(key, tokens)

    # --- before forwarding ---------------------------------------------------------------------

    @staticmethod
    async def _read_body(scope: dict[str, Any], receive: Any, limit: int) -> bytes:
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"request body over {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise InvalidRequest("client disconnected while sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body over {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    @staticmethod
    async def _prepare(state: GatewayState, scope: dict[str, Any], body: bytes,
                       key: ApiKey | None) -> tuple[dict[str, Any], Target]:
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise InvalidRequest("the request body is not valid JSON") from None
        if not isinstance(payload, dict):
            raise InvalidRequest("the request body must be a JSON object")
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("`model` is required", details={"param": "model"})
        base = payload.pop("base_model", None)  # Quiver's own field: never sent upstream
        if model == state.settings.auto_model:
            base = base or _header(scope, b"x-quiver-base-model")
            target = await state.resolver.route(payload, base if isinstance(base, str) else None)
            target = state.narrow_to_key(key, target)
            state.metrics.routed_as("auto")
        else:
            target = await state.resolver.resolve(model)
            state.metrics.routed_as("adapter" if target.adapter else "base")
        state.check_allowed(key, target)
        if key is not None and (key.rpm or key.tpm):
            await state.limiter.admit(key, _estimate_tokens(payload) if key.tpm else 0)
        return payload, target

    # --- forwarding ----------------------------------------------------------------------------

    async def _forward(self, state: GatewayState, scope: dict[str, Any], send: Any,
                       endpoint: str, payload: dict[str, Any], body: bytes, target: Target,
                       request_id: str, started: float, count: bool) -> int:
        """Send the request to the backends in turn; the tokens it used when ``count``."""
        metrics = state.metrics
        upstream_model = target.upstream_model
        if payload.get("model") != upstream_model or b'"base_model"' in body:
            payload["model"] = upstream_model
            body = json.dumps(payload, separators=(",", ":")).encode()
        stream = payload.get("stream") is True
        path = scope["path"]
        headers = {"content-type": "application/json", "x-request-id": request_id}
        order = state.fleet.choose(target.base_model, target.adapter)
        if not order:
            exc = NoBackendAvailable(f"no backend serves base model {target.base_model!r}",
                                     retry_after=1)
            await self._send_error(send, exc, request_id, target)
            metrics.count(endpoint, "503")
            return 0
        last: _Retry | None = None
        for attempt, hb in enumerate(order[:state.settings.max_attempts]):
            if attempt:
                metrics.retries.inc()
            ours = [(b"x-request-id", request_id.encode()),
                    (b"x-quiver-backend", hb.backend_id.encode()),
                    (b"x-quiver-adapter", (target.adapter or "").encode()),
                    (b"x-quiver-route-confidence", f"{target.confidence:.4f}".encode())]
            state.fleet.acquire(hb.backend_id)
            try:
                if stream:
                    tokens = await self._stream(state, send, hb.url + path, body, headers, ours,
                                                hb.backend_id, endpoint, started)
                else:
                    tokens = await self._unary(state, send, hb.url + path, body, headers, ours,
                                               hb.backend_id, endpoint, started, count)
            except _Retry as retry:
                last = retry
                continue
            finally:
                state.fleet.release(hb.backend_id)
            return tokens
        assert last is not None
        if last.response is not None:
            status, content_type, content = last.response
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", content_type), *ours]})
            await send({"type": "http.response.body", "body": content})
        else:
            await self._send_error(send, last.error, request_id, target)
        metrics.count(endpoint, str(last.response[0] if last.response else last.error.status))
        return 0

    async def _unary(self, state: GatewayState, send: Any, url: str, body: bytes,
                     headers: dict[str, str], ours: list[tuple[bytes, bytes]], backend_id: str,
                     endpoint: str, started: float, count: bool) -> int:
        try:
            async with state.upstream.post(url, data=body, headers=headers) as resp:
                content = await resp.read()
                status = resp.status
                content_type = resp.headers.get("content-type", "application/json").encode()
        except _UPSTREAM_ERRORS as exc:
            raise self._transport_failure(state, backend_id, exc) from None
        if status in _RETRY_STATUSES:
            self._upstream_status_failure(state, backend_id, status)
            raise _Retry(UpstreamError(f"backend answered {status}"),
                         (status, content_type, content))
        state.fleet.record_success(backend_id)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type),
                                (b"content-length", str(len(content)).encode()), *ours]})
        await send({"type": "http.response.body", "body": content})
        state.metrics.first_byte(endpoint, time.perf_counter() - started)
        state.metrics.count(endpoint, str(status))
        if count and status == 200:
            found = _TOTAL_TOKENS.search(content)
            return int(found.group(1)) if found else 0
        return 0

    async def _stream(self, state: GatewayState, send: Any, url: str, body: bytes,
                      headers: dict[str, str], ours: list[tuple[bytes, bytes]], backend_id: str,
                      endpoint: str, started: float) -> int:
        try:
            resp = await state.upstream.post(url, data=body, headers=headers)
        except _UPSTREAM_ERRORS as exc:
            raise self._transport_failure(state, backend_id, exc) from None
        try:
            content_type = resp.headers.get("content-type", "text/event-stream").encode()
            if resp.status != 200:
                try:
                    content = await resp.read()
                except _UPSTREAM_ERRORS as exc:
                    raise self._transport_failure(state, backend_id, exc) from None
                if resp.status in _RETRY_STATUSES:
                    self._upstream_status_failure(state, backend_id, resp.status)
                    raise _Retry(UpstreamError(f"backend answered {resp.status}"),
                                 (resp.status, content_type, content))
                await send({"type": "http.response.start", "status": resp.status,
                            "headers": [(b"content-type", content_type), *ours]})
                await send({"type": "http.response.body", "body": content})
                state.metrics.count(endpoint, str(resp.status))
                return 0
            reader = resp.content
            pending = b""
            first = b""
            try:
                while not first:  # hold back until one whole event: a retry is still possible
                    chunk = await reader.readany()
                    if not chunk:
                        first, pending = pending, b""
                        break
                    pending += chunk
                    cut = _event_end(pending)
                    first, pending = pending[:cut], pending[cut:]
            except _UPSTREAM_ERRORS as exc:
                raise self._transport_failure(state, backend_id, exc) from None
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", content_type),
                                    (b"cache-control", b"no-cache"),
                                    (b"x-accel-buffering", b"no"), *ours]})
            await send({"type": "http.response.body", "body": first, "more_body": True})
            state.metrics.first_byte(endpoint, time.perf_counter() - started)
            events = first.count(b"data:")
            usage = _TOTAL_TOKENS.search(first)
            try:
                while chunk := await reader.readany():
                    pending += chunk
                    cut = _event_end(pending)
                    if cut:
                        out, pending = pending[:cut], pending[cut:]
                        events += out.count(b"data:")
                        if b'"total_tokens"' in out:
                            usage = _TOTAL_TOKENS.search(out) or usage
                        await send({"type": "http.response.body", "body": out,
                                    "more_body": True})
            except _UPSTREAM_ERRORS as exc:
                error = (Timeout(f"backend {backend_id} went silent mid-stream")
                         if isinstance(exc, asyncio.TimeoutError)
                         else UpstreamError(f"backend {backend_id} failed mid-stream: "
                                            f"{type(exc).__name__}"))
                state.fleet.record_failure(backend_id, "mid_stream")
                state.metrics.stream_errors.inc()
                event = b"data: " + json.dumps(openai_error_body(error)).encode() + b"\n\n"
                await send({"type": "http.response.body", "body": event})
                state.metrics.count(endpoint, "200")
                return events
            state.fleet.record_success(backend_id)
            await send({"type": "http.response.body", "body": pending})
            state.metrics.count(endpoint, "200")
            return int(usage.group(1)) if usage else events
        finally:
            resp.close()

    # --- failures ------------------------------------------------------------------------------

    @staticmethod
    def _transport_failure(state: GatewayState, backend_id: str, exc: Exception) -> _Retry:
        if isinstance(exc, asyncio.TimeoutError):
            kind, error = "timeout", Timeout(f"backend {backend_id} did not answer in time")
        else:
            kind = ("connect" if isinstance(exc, aiohttp.ClientConnectorError)
                    else "transport")
            error = NoBackendAvailable(f"backend {backend_id} failed: {type(exc).__name__}",
                                       retry_after=1)
        state.fleet.record_failure(backend_id, kind)
        return _Retry(error)

    @staticmethod
    def _upstream_status_failure(state: GatewayState, backend_id: str, status: int) -> None:
        if status == 503:  # overloaded or draining: healthy, just busy
            state.metrics.upstream_failures.labels(backend_id, "busy").inc()
        else:
            state.fleet.record_failure(backend_id, f"http_{status}")

    @staticmethod
    async def _wait_disconnect(receive: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    @staticmethod
    async def _send_error(send: Any, exc: QuiverError, request_id: str,
                          target: Target | None = None) -> None:
        headers = [(b"content-type", _JSON), (b"x-error-code", exc.code.encode()),
                   (b"x-request-id", request_id.encode())]
        if exc.retry_after is not None:
            headers.append((b"retry-after", str(max(1, round(exc.retry_after))).encode()))
        if target is not None:
            headers.append((b"x-quiver-adapter", (target.adapter or "").encode()))
        content = json.dumps(openai_error_body(exc)).encode()
        headers.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

