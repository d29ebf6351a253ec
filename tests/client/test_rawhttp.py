"""The lean PUT path: a file range sent with sendfile, the answer read back as httpx's."""

from __future__ import annotations

import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from quiver.client._rawhttp import RawHTTP, raw_usable
from quiver.errors import PayloadTooLarge
from quiver.http import raise_for_status


class _Sink:
    """A PUT server: ``mode`` "store" keeps bodies and answers 201 JSON; "refuse" answers 413
    at once without reading the body and closes; "chunked" stores and answers chunked."""

    def __init__(self) -> None:
        self.mode = "store"
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_PUT(self) -> None:
                sink.headers.append({k.lower(): v for k, v in self.headers.items()})
                if sink.mode == "refuse":
                    body = json.dumps({"error": {"code": "payload_too_large",
                                                 "message": "too big", "details": {}}}).encode()
                    self.send_response(413)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_WR)
                    self.close_connection = True
                    return
                data = self.rfile.read(int(self.headers["Content-Length"]))
                sink.bodies.append(data)
                body = json.dumps({"received": len(data), "path": self.path}).encode()
                self.send_response(201)
                self.send_header("Content-Type", "application/json")
                if sink.mode == "chunked":
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    half = len(body) // 2
                    for piece in (body[:half], body[half:]):
                        self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/base"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def sink():
    s = _Sink()
    yield s
    s.close()


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(3 << 20))
    return path


def _raw(url: str) -> RawHTTP:
    return RawHTTP(httpx.URL(url), httpx.Headers({"Authorization": "Bearer t0k"}), timeout=10.0)


@pytest.mark.parametrize("mode", ["store", "chunked"])
def test_put_file_sends_exactly_the_range_and_returns_the_answer(sink, data_file, mode):
    sink.mode = mode
    offset, length = 1000, (2 << 20) + 7
    with open(data_file, "rb") as fh:
        r = _raw(sink.url).put_file("/parts/1", fh, offset, length)
    assert r.status_code == 201
    assert r.json() == {"received": length, "path": "/base/parts/1"}
    assert sink.bodies == [data_file.read_bytes()[offset:offset + length]]
    sent = sink.headers[0]
    assert sent["authorization"] == "Bearer t0k"
    assert sent["content-length"] == str(length)
    assert sent["content-type"] == "application/octet-stream"


def test_an_early_refusal_is_the_answer_returned(sink, tmp_path):
    sink.mode = "refuse"
    big = tmp_path / "big"
    big.write_bytes(os.urandom(64 << 20))   # more than the socket buffers take unread
    with open(big, "rb") as fh:
        r = _raw(sink.url).put_file("/parts/0", fh, 0, big.stat().st_size)
    assert r.status_code == 413
    with pytest.raises(PayloadTooLarge):
        raise_for_status(r)


def test_a_file_shorter_than_the_range_is_an_eoferror(sink, data_file):
    with open(data_file, "rb") as fh, pytest.raises(EOFError):
        _raw(sink.url).put_file("/parts/0", fh, (3 << 20) - 10, 100)


def test_nothing_listening_is_a_connect_error(tmp_path, data_file):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(data_file, "rb") as fh, pytest.raises(httpx.ConnectError):
        _raw(f"http://127.0.0.1:{port}").put_file("/x", fh, 0, 10)


def test_only_plain_http_without_a_proxy_is_usable(monkeypatch):
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    monkeypatch.delenv("all_proxy", raising=False)
    monkeypatch.delenv("ALL_PROXY", raising=False)
    assert raw_usable(httpx.URL("http://127.0.0.1:8080"))
    assert not raw_usable(httpx.URL("https://registry.example"))
    monkeypatch.setenv("http_proxy", "http://proxy.example:3128")
    monkeypatch.setenv("no_proxy", "")
    assert not raw_usable(httpx.URL("http://registry.example"))
