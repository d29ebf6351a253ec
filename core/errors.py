"""Every error Quiver raises on purpose, in one shallow tree.

    QuiverError                      500 internal
    ├── InvalidRequest (ValueError)  400 invalid_request
    │   ├── InvalidReference         400 invalid_reference
    │   ├── InvalidAdapter           422 invalid_adapter        (bad files, bad config, bad safetensors)
    │   ├── IncompatibleAdapter      422 incompatible_adapter   (shapes/modules vs the base model)
    │   ├── UnservableAdapter        422 unservable_adapter     (valid, but this backend cannot serve it)
    │   ├── UnsafeFile               422 unsafe_file            (pickles, path traversal)
    │   ├── ContextLengthExceeded    400 context_length_exceeded
    │   └── RangeNotSatisfiable      416 range_not_satisfiable
    ├── PayloadTooLarge (ValueError) 413 payload_too_large
    ├── Unauthorized (PermissionError)  401 unauthorized
    ├── Forbidden (PermissionError)  403 forbidden
    ├── NotFound (LookupError)       404 not_found
    │   ├── RepoNotFound             404 repo_not_found
    │   ├── VersionNotFound          404 version_not_found
    │   ├── AliasNotFound            404 alias_not_found
    │   ├── BaseModelNotFound        404 base_model_not_found
    │   ├── BlobNotFound             404 blob_not_found
    │   ├── UploadNotFound           404 upload_not_found
    │   └── ModelNotFound            404 model_not_found        (gateway/backend: unknown `model`)
    ├── Conflict                     409 conflict
    │   └── VersionImmutable         409 version_immutable
    ├── ChecksumMismatch (ValueError) 422 checksum_mismatch
    ├── RateLimited                  429 rate_limited           (carries retry_after)
    ├── Unavailable (ConnectionError) 503 unavailable           (carries retry_after)
    │   ├── RegistryUnavailable      503 registry_unavailable
    │   ├── NoBackendAvailable       503 no_backend_available
    │   └── Overloaded               503 overloaded             (back-pressure: queue or KV cache full)
    ├── UpstreamError                502 upstream_error
    ├── Timeout (TimeoutError)       504 timeout
    └── RoutingAbstained (LookupError) 422 routing_abstained    (router refused and the policy is "error")

Servers turn these into ``{"error": {"code", "message", "details"}}`` with an ``X-Error-Code``
header (:func:`error_body`); clients turn the code back into the class (:func:`error_from_code`).
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "QuiverError", "InvalidRequest", "InvalidReference", "InvalidAdapter", "IncompatibleAdapter",
    "UnservableAdapter", "UnsafeFile", "ContextLengthExceeded", "PayloadTooLarge", "Unauthorized",
    "Forbidden", "NotFound", "RepoNotFound", "VersionNotFound", "AliasNotFound",
    "BaseModelNotFound", "BlobNotFound", "UploadNotFound", "ModelNotFound", "Conflict",
    "VersionImmutable", "ChecksumMismatch", "RateLimited", "Unavailable", "RegistryUnavailable",
    "NoBackendAvailable", "Overloaded", "UpstreamError", "Timeout", "RoutingAbstained",
    "RangeNotSatisfiable", "error_body", "error_from_code",
]


class QuiverError(Exception):
    """Base class. ``status`` is the HTTP status, ``code`` the stable machine-readable code."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"

    def __init__(self, message: str, *, details: Any = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.details = details
        self.retry_after = retry_after

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


class InvalidRequest(QuiverError, ValueError):
    status, code = 400, "invalid_request"


class InvalidReference(InvalidRequest):
    status, code = 400, "invalid_reference"


class InvalidAdapter(InvalidRequest):
    status, code = 422, "invalid_adapter"


class IncompatibleAdapter(InvalidRequest):
    """``details`` is a list of ``{"tensor"|"module"|"field", "expected", "found", "problem"}``."""

    status, code = 422, "incompatible_adapter"


class UnservableAdapter(InvalidRequest):
    status, code = 422, "unservable_adapter"


class UnsafeFile(InvalidRequest):
    status, code = 422, "unsafe_file"


class ContextLengthExceeded(InvalidRequest):
    status, code = 400, "context_length_exceeded"


class PayloadTooLarge(QuiverError, ValueError):
    status, code = 413, "payload_too_large"


class Unauthorized(QuiverError, PermissionError):
    status, code = 401, "unauthorized"


class Forbidden(QuiverError, PermissionError):
    status, code = 403, "forbidden"


class NotFound(QuiverError, LookupError):
    status, code = 404, "not_found"


class RepoNotFound(NotFound):
    code = "repo_not_found"


class VersionNotFound(NotFound):
    code = "version_not_found"


class AliasNotFound(NotFound):
    code = "alias_not_found"


class BaseModelNotFound(NotFound):
    code = "base_model_not_found"


class BlobNotFound(NotFound):
    code = "blob_not_found"


class UploadNotFound(NotFound):
    code = "upload_not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(QuiverError):
    status, code = 409, "conflict"


class VersionImmutable(Conflict):
    code = "version_immutable"


class ChecksumMismatch(QuiverError, ValueError):
    status, code = 422, "checksum_mismatch"


class RangeNotSatisfiable(InvalidRequest):
    """An HTTP ``Range`` past the end of a blob (416); ``details`` carries the blob's size."""

    status, code = 416, "range_not_satisfiable"


class RateLimited(QuiverError):
    status, code = 429, "rate_limited"


class Unavailable(QuiverError, ConnectionError):
    status, code = 503, "unavailable"


class RegistryUnavailable(Unavailable):
    code = "registry_unavailable"


class NoBackendAvailable(Unavailable):
    code = "no_backend_available"


class Overloaded(Unavailable):
    code = "overloaded"


class UpstreamError(QuiverError):
    status, code = 502, "upstream_error"


class Timeout(QuiverError, TimeoutError):
    status, code = 504, "timeout"


class RoutingAbstained(QuiverError, LookupError):
    status, code = 422, "routing_abstained"


def _all_subclasses(cls: type[QuiverError]) -> list[type[QuiverError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


def error_body(exc: QuiverError) -> dict[str, Any]:
    """The JSON body a Quiver service sends for ``exc``."""
    return {"error": exc.to_dict()}


def error_from_code(code: str, message: str, *, details: Any = None,
                    retry_after: float | None = None, status: int | None = None) -> QuiverError:
    """Rebuild the typed error a server sent. Unknown codes map by HTTP status."""
    by_code = {c.code: c for c in _all_subclasses(QuiverError)}
    cls = by_code.get(code)
    if cls is None:
        by_status: dict[int, type[QuiverError]] = {}
        for c in _all_subclasses(QuiverError):
            by_status.setdefault(c.status, c)
        cls = by_status.get(status or 500, QuiverError)
    return cls(message, details=details, retry_after=retry_after)
