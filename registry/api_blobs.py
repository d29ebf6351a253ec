"""Blob downloads: streamed, ``Range``-aware, ``ETag`` = sha256, or a redirect to S3.

:func:`blob_response` is shared with the Hugging Face routes, which add their own headers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse

from quiver.errors import BlobNotFound, RangeNotSatisfiable
from quiver.http import error_response
from quiver.registry.deps import Reader, RegistryDep
from quiver.registry.models import Blob
from quiver.registry.state import Registry
from quiver.registry.storage.base import check_sha256

__all__ = ["router", "blob_response", "parse_range"]

router = APIRouter(tags=["blobs"])

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive (start, end) a single-range ``Range`` header asks for, None for the whole
    blob (no header, or one this server ignores as RFC 9110 allows); 416 when unsatisfiable."""
    if not header:
        return None
    m = _RANGE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if not first:                                    # suffix: the last N bytes
        n = int(last)
        if n == 0:
            raise RangeNotSatisfiable("empty suffix range", details={"size": size})
        return max(0, size - n), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if last and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable(f"range starts at {start}, past the end of {size} bytes",
                                  details={"size": size, "range": header})
    return start, end


async def blob_response(reg: Registry, request: Request, sha256: str, size: int,
                        headers: Mapping[str, str] | None = None) -> Response:
    """Answer GET or HEAD for one blob with its headers, honouring ``Range``."""
    base = {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes", **(headers or {})}
    if reg.settings.s3_redirect:
        url = await reg.store.presigned_get_url(sha256, reg.settings.presign_expires_s)
        if url:
            return RedirectResponse(url, status_code=302, headers=base)
    try:
        wanted = parse_range(request.headers.get("range"), size)
    except RangeNotSatisfiable as exc:
        resp = error_response(exc)
        resp.headers["Content-Range"] = f"bytes */{size}"
        return resp
    status, start, end = 200, 0, size - 1
    if wanted is not None:
        status, (start, end) = 206, wanted
        base["Content-Range"] = f"bytes {start}-{end}/{size}"
    base["Content-Length"] = str(max(0, end - start + 1))
    if request.method == "HEAD":
        return Response(status_code=status, headers=base, media_type="application/octet-stream")
    if size == 0:
        return Response(content=b"", status_code=status, headers=base,
                        media_type="application/octet-stream")
    stream = await reg.store.open_range(sha256, start, end)
    return StreamingResponse(stream, status_code=status, headers=base,
                             media_type="application/octet-stream")


@router.api_route("/api/v1/blobs/{sha256}", methods=["GET", "HEAD"])
async def get_blob(sha256: str, request: Request, reg: RegistryDep, _: Reader) -> Response:
    check_sha256(sha256)
    row = await reg.db.run(lambda s: s.get(Blob, sha256))
    if row is None:
        raise BlobNotFound(f"blob {sha256} not found", details={"sha256": sha256})
    return await blob_response(reg, request, sha256, row.size)
