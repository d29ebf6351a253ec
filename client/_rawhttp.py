"""Lean HTTP/1.1 for blob bytes over plain ``http://``: ranged GETs and PUTs of file ranges.

The general client (httpx) allocates a new bytes object per 64 KiB read and parses each through
h11, and sends a body only from bytes it was handed; for a multi-hundred-megabyte blob that is
most of the client's CPU time. ``fetch`` reads a body straight into one reusable buffer and
hands memoryviews to the caller; ``put_file`` sends a range of a file with ``sendfile``, so its
bytes go from the page cache to the socket without passing through Python. Only the plain case
is taken: a GET answered ``206`` with ``Content-Length`` and no content or transfer coding;
anything else (redirects to S3, errors, TLS, proxies) returns ``None`` so the caller uses
httpx, which also turns errors into typed exceptions. A PUT's answer, whatever its status,
comes back as an ``httpx.Response`` for the caller to check as it would any other; failures
to connect, send or receive are raised as httpx transport errors.
"""

from __future__ import annotations

import socket
import threading
import urllib.request
from typing import BinaryIO, Callable

import httpx

__all__ = ["RawHTTP", "raw_usable"]

_BUF = 1 << 20
_MAX_HEADER = 64 * 1024
_MAX_ANSWER = 1 << 20
"""The most bytes of a PUT's answer that are read (answers are small JSON documents)."""


def raw_usable(base_url: httpx.URL) -> bool:
    """True when blobs under ``base_url`` can be moved without httpx (plain http, no proxy)."""
    if base_url.scheme != "http" or not base_url.host:
        return False
    proxies = urllib.request.getproxies()
    if "http" in proxies or "all" in proxies:
        return bool(urllib.request.proxy_bypass(base_url.host))
    return True


class RawHTTP:
    """Requests for blob bytes under one ``http://`` base, for one worker thread."""

    def __init__(self, base_url: httpx.URL, headers: httpx.Headers, timeout: float):
        self.host = base_url.host
        self.port = base_url.port or 80
        self.prefix = base_url.raw_path.decode().rstrip("/")
        self.timeout = timeout
        skip = {"host", "connection", "accept-encoding", "range", "content-length",
                "content-type", "transfer-encoding"}
        self.header_lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items()
                                    if k.lower() not in skip)
        self._buf: bytearray | None = None

    @property
    def _host_header(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"{host}:{self.port}"

    def fetch(self, path: str, start: int, end: int,
              write: Callable[[int, memoryview], None], stop: threading.Event) -> int | None:
        """Stream bytes ``[start, end)`` of ``path`` to ``write(pos, view)``; returns the
        position reached, or ``None`` when this answer needs the general client."""
        request = (f"GET {self.prefix}{path} HTTP/1.1\r\nHost: {self._host_header}\r\n"
                   f"Range: bytes={start}-{end - 1}\r\nAccept-Encoding: identity\r\n"
                   f"Connection: close\r\n{self.header_lines}\r\n").encode("latin-1")
        with socket.create_connection((self.host, self.port), timeout=self.timeout) as sock:
            sock.sendall(request)
            head, body = self._read_head(sock)
            if head is None:
                return None
            status, fields, _raw = head
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
            if self._buf is None:
                self._buf = bytearray(_BUF)
            view, size = memoryview(self._buf), len(self._buf)
            while remaining > 0 and not stop.is_set():
                n = sock.recv_into(view, min(size, remaining))
                if n == 0:
                    break
                write(pos, view[:n])
                pos += n
                remaining -= n
            return pos

    def put_file(self, path: str, file: BinaryIO, offset: int, length: int, *,
                 content_type: str = "application/octet-stream") -> httpx.Response:
        """PUT bytes ``[offset, offset + length)`` of ``file`` to ``path``; returns the answer.

        Raises :class:`EOFError` when the file holds fewer bytes than that."""
        url = f"http://{self._host_header}{self.prefix}{path}"
        request = (f"PUT {self.prefix}{path} HTTP/1.1\r\nHost: {self._host_header}\r\n"
                   f"Content-Type: {content_type}\r\nContent-Length: {length}\r\n"
                   f"Connection: close\r\n{self.header_lines}\r\n").encode("latin-1")
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connecting to {url}: {exc}") from exc
        except OSError as exc:
            raise httpx.ConnectError(f"connecting to {url}: {exc}") from exc
        with sock:
            try:
                sock.sendall(request)
                sent = sock.sendfile(file, offset, length) if length else 0
            except TimeoutError as exc:
                raise httpx.WriteTimeout(f"sending to {url}: {exc}") from exc
            except OSError as exc:
                # The server may have answered and closed before taking the whole body, as
                # it does when it refuses a part early: that answer is the one to report.
                answer = self._answer_after_failed_send(sock, url)
                if answer is None:
                    raise httpx.WriteError(f"sending to {url}: {exc}") from exc
                return answer
            if sent != length:
                raise EOFError(f"the file ended {length - sent} bytes before the part did")
            try:
                return self._read_answer(sock, url)
            except TimeoutError as exc:
                raise httpx.ReadTimeout(f"waiting for {url}: {exc}") from exc
            except OSError as exc:
                raise httpx.ReadError(f"reading from {url}: {exc}") from exc

    def _answer_after_failed_send(self, sock: socket.socket, url: str) -> httpx.Response | None:
        try:
            return self._read_answer(sock, url)
        except (OSError, httpx.HTTPError):
            return None

    def _read_answer(self, sock: socket.socket, url: str) -> httpx.Response:
        """The whole answer to a ``Connection: close`` request, as an httpx response."""
        head, body = self._read_head(sock)
        if head is None:
            raise httpx.RemoteProtocolError(f"{url} answered with an unreadable response head")
        status, fields, raw_fields = head
        length = fields.get("content-length")
        want = int(length) if length is not None and length.isdigit() else _MAX_ANSWER
        data = bytearray(body)
        while len(data) < min(want, _MAX_ANSWER):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        if length is not None and len(data) < min(want, _MAX_ANSWER):
            raise httpx.RemoteProtocolError(f"{url} closed the connection mid-answer")
        if fields.get("content-encoding", "identity").lower() != "identity":
            raise httpx.RemoteProtocolError(f"{url} answered with an encoded body")
        content = bytes(data[:want])
        if "chunked" in fields.get("transfer-encoding", "").lower():
            content = _dechunk(content)
        headers = [(k, v) for k, v in raw_fields
                   if k.lower() not in ("transfer-encoding", "content-length")]
        return httpx.Response(status, headers=headers, content=content,
                              request=httpx.Request("PUT", url))

    @staticmethod
    def _read_head(sock: socket.socket
                   ) -> tuple[tuple[int, dict[str, str], list[tuple[str, str]]] | None, bytes]:
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
        raw_fields = []
        for line in lines[1:]:
            key, sep, value = line.partition(":")
            if sep:
                raw_fields.append((key.strip(), value.strip()))
        fields = {k.lower(): v for k, v in raw_fields}
        return (int(parts[1]), fields, raw_fields), body


def _dechunk(data: bytes) -> bytes:
    """The body of a ``Transfer-Encoding: chunked`` message."""
    out, pos = bytearray(), 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            raise httpx.RemoteProtocolError("a chunked answer ended mid-chunk")
        size = int(data[pos:end].split(b";")[0] or b"0", 16)
        if size == 0:
            return bytes(out)
        start = end + 2
        if start + size > len(data):
            raise httpx.RemoteProtocolError("a chunked answer ended mid-chunk")
        out += data[start:start + size]
        pos = start + size + 2
