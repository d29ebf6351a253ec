"""A small HTTP server speaking the registry's blob protocol, for download tests.

``GET /api/v1/blobs/{sha256}`` with ``Range`` support (206 + ``Content-Range``), a log of every
request, and faults a test can arm: cut the connection after some bytes, or send wrong bytes.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from quiver.wire import FileEntry, VersionInfo

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


@dataclass
class Served:
    sha256: str
    range: str | None
    status: int
    sent: int


@dataclass
class BlobServer:
    blobs: dict[str, bytes] = field(default_factory=dict)
    log: list[Served] = field(default_factory=list)
    cut_after: dict[str, int] = field(default_factory=dict)    # sha -> bytes, once
    corrupt: set[str] = field(default_factory=set)             # sha, once
    ignore_range: bool = False                                 # answer 200 with everything
    delay: float = 0.0                                         # seconds per 64 KiB sent
    url: str = ""

    def add(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.blobs[sha] = data
        return sha

    def bytes_sent(self, sha: str | None = None) -> int:
        return sum(s.sent for s in self.log if sha is None or s.sha256 == sha)

    def version(self, files: dict[str, bytes], revision: str = "a" * 40) -> VersionInfo:
        entries = [FileEntry(path=p, sha256=self.add(b), size=len(b)) for p, b in files.items()]
        return VersionInfo(repo="t/blobs", version=1, ref="t/blobs/1", revision=revision,
                           status="ready", base_model="tiny", files=entries,
                           size_bytes=sum(len(b) for b in files.values()),
                           created_at=datetime.now(timezone.utc))


def start_blob_server() -> tuple[BlobServer, ThreadingHTTPServer]:
    state = BlobServer()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            m = re.match(r"^/api/v1/blobs/([0-9a-f]{64})$", self.path)
            data = state.blobs.get(m.group(1)) if m else None
            if data is None:
                body = b'{"error": {"code": "blob_not_found", "message": "no such blob"}}'
                self.send_response(404)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Error-Code", "blob_not_found")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            sha = m.group(1)
            rng = self.headers.get("Range")
            start, end, status = 0, len(data), 200
            if rng and not state.ignore_range:
                rm = _RANGE.match(rng)
                start = int(rm.group(1))
                end = min(len(data), int(rm.group(2)) + 1) if rm.group(2) else len(data)
                status = 206
            payload = data[start:end]
            with lock:
                if sha in state.corrupt:
                    state.corrupt.discard(sha)
                    payload = bytes(b ^ 0xFF for b in payload[:16]) + payload[16:]
                cut = state.cut_after.pop(sha, None)
            self.send_response(status)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{sha}"')
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.end_headers()
            if cut is not None:
                payload = payload[:cut]
            # Logged before sending, so a client that has the bytes sees the entry; a slowed
            # server counts what it actually sent, piece by piece.
            served = Served(sha, rng, status, 0 if state.delay else len(payload))
            with lock:
                state.log.append(served)
            if not state.delay:
                self.wfile.write(payload)
            else:
                for i in range(0, len(payload), 65536):
                    time.sleep(state.delay)
                    try:
                        self.wfile.write(payload[i:i + 65536])
                    except OSError:
                        self.close_connection = True
                        return
                    served.sent += len(payload[i:i + 65536])
            if cut is not None:
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                     daemon=True).start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    return state, server
