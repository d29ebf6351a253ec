"""Error mapping for Quiver's HTTP services and clients, once in each direction.

Servers call :func:`install_error_handlers`; the registry and router answer in Quiver's shape
``{"error": {"code", "message", "details"}}``, the backend and gateway in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``. Both carry ``X-Error-Code``. Clients call
:func:`raise_for_status` to turn either shape back into the typed error.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import httpx

from quiver.errors import InvalidRequest, QuiverError, error_from_code

__all__ = ["install_error_handlers", "error_response", "openai_error_body", "raise_for_status"]

_log = logging.getLogger("quiver.http")

_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                 403: "permission_error", 404: "not_found_error", 413: "invalid_request_error",
                 422: "invalid_request_error", 429: "rate_limit_error"}


def openai_error_body(exc: QuiverError) -> dict[str, Any]:
    return {"error": {"message": exc.message,
                      "type": _OPENAI_TYPES.get(exc.status, "server_error"),
                      "param": (exc.details or {}).get("param") if isinstance(exc.details, dict) else None,
                      "code": exc.code,
                      "details": exc.details}}


def error_response(exc: QuiverError, shape: Literal["quiver", "openai"] = "quiver"):
    from fastapi.responses import JSONResponse

    body = openai_error_body(exc) if shape == "openai" else {"error": exc.to_dict()}
    headers = {"X-Error-Code": exc.code}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, int(round(exc.retry_after))))
    return JSONResponse(body, status_code=exc.status, headers=headers)


def install_error_handlers(app, shape: Literal["quiver", "openai"] = "quiver") -> None:
    """Map Quiver errors, request-validation errors and unexpected errors to JSON responses."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(QuiverError)
    async def _quiver(_request, exc: QuiverError):
        return error_response(exc, shape)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request, exc: RequestValidationError):
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in exc.errors()]
        return error_response(InvalidRequest("request validation failed", details=errors), shape)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request, exc: StarletteHTTPException):
        err = error_from_code("", str(exc.detail), status=exc.status_code)
        err.message = str(exc.detail)
        resp = error_response(err, shape)
        resp.status_code = exc.status_code
        return resp

    @app.exception_handler(Exception)
    async def _unexpected(_request, exc: Exception):
        _log.exception("unhandled error", exc_info=exc)
        return error_response(QuiverError("internal server error"), shape)


def raise_for_status(response: httpx.Response) -> None:
    """Raise the typed Quiver error a response carries; do nothing on success."""
    if response.is_success or response.is_redirect:
        return
    code, message, details = "", response.reason_phrase or f"HTTP {response.status_code}", None
    try:
        body = response.json()
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            code = str(err.get("code") or "")
            message = str(err.get("message") or message)
            details = err.get("details")
        elif isinstance(err, str):
            message = err
    except Exception:  # not JSON (a proxy's HTML page, an empty body)
        pass
    code = code or response.headers.get("x-error-code", "")
    retry = response.headers.get("retry-after")
    raise error_from_code(code, message, details=details, status=response.status_code,
                          retry_after=float(retry) if retry and retry.replace(".", "").isdigit() else None)
