"""A lean HTTP/1.1 GET for blob ranges over plain ``http://``: ``recv_into`` one buffer.

The general client (httpx) allocates a new bytes object per 64 KiB read and parses each through
h11; for a multi-hundred-megabyte blob that is most of the client's CPU time. This path reads
the body straight into one reusable buffer and hands memoryviews to the caller. It only takes
the plain case, a ``200``/``206`` answer with ``Content-Length`` and no content or transfer
coding; anything else (redirects to S3, errors, TLS, proxies) returns ``None`` so the caller
uses httpx, which also turns errors into typed exceptions.
"""

from __future__ import annotations

import socket
import threading
import urllib.request
from typing import Callable

import httpx

__all__ = ["RawRange", "raw_fetch_usable"]

_BUF = 1 << 20
_MAX_HEADER = 64 * 1024


def raw_fetch_usable(base_url: httpx.URL) -> bool:
    """True when blobs under ``base_url`` can be fetched without httpx (plain http, no proxy)."""
    if base_url.scheme != "http" or not base_url.host:
        return False
    proxies = urllib.request.getproxies()
    if "http" in proxies or "all" in proxies:
        return bool(urllib.request.proxy_bypass(base_url.host))
    return True


class RawRange:
    """Fetch byte ranges of URLs under one ``http://`` base, for one worker thread."""

    def __init__(self, base_url: httpx.URL, headers: httpx.Headers, timeout: float):
        self.host = base_url.host
        self.port = base_url.port or 80
        self.prefix = base_url.raw_path.decode().rstrip("/")
        self.timeout = timeout
        skip = {"host", "connection", "accept-encoding", "range", "content-length"}
        self.header_lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items()
                                    if k.lower() not in skip)
        self.buf = bytearray(_BUF)
        self.view = memoryview(self.buf)

    def fetch(self, path: str, start: int, end: int,
              write: Callable[[int, memoryview], None], stop: threading.Event) -> int | None:
        """Stream bytes ``[start, end)`` of ``path`` to ``write(pos, view)``; returns the
        position reached, or ``None`` when this answer needs the general client."""
        host = self.host if ":" not in self.host else f"[{self.host}]"
        request = (f"GET {self.prefix}{path} HTTP/1.1\r\nHost: {host}:{self.port}\r\n"
                   f"Range: bytes={start}-{end - 1}\r\nAccept-Encoding: identity\r\n"
                   f"Connection: close\r\n{self.header_lines}\r\n").encode("latin-1")
        with socket.create_connection((self.host, self.port), timeout=self.timeout) as sock:
            sock.sendall(request)
            head, body = self._read_head(sock)
            if head is None:
                return None
            status, fields = head
            length = fields.get("content-length")
            if status not in (200, 206) or length is None or not length.isdigit() \
                    or fields.get("transfer-encoding") \
                    or fields.get("content-encoding", "identity") != "identity":
                return None
            if status == 206:
                if not fields.get("content-range", "").startswith(f"bytes {start}-"):
                    return None
                pos, remaining = start, int(length)
            else:
                return None  # the whole blob although we asked for a range: let httpx skip
            remaining = min(remaining, end - pos)
            if body:
                take = body[:remaining]
                write(pos, memoryview(take))
                pos += len(take)
                remaining -= len(take)
            view, size = self.view, len(self.buf)
            while remaining > 0 and not stop.is_set():
                n = sock.recv_into(view, min(size, remaining))
                if n == 0:
                    break
                write(pos, view[:n])
                pos += n
                remaining -= n
            return pos

    @staticmethod
    def _read_head(sock: socket.socket) -> tuple[tuple[int, dict[str, str]] | None, bytes]:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(16384)
            if not chunk:
                raise httpx.RemoteProtocolError("connection closed before the response head")
            data += chunk
            if len(data) > _MAX_HEADER:
                return None, b""
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            return None, b""
        fields: dict[str, str] = {}
        for line in lines[1:]:
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip().lower()] = value.strip()
        return (int(parts[1]), fields), body
