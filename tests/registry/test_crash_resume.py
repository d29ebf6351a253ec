"""A registry killed mid-push leaves no partial version; after a restart the push resumes."""

from __future__ import annotations

import hashlib
import json
import math
import socket

import httpx

from tests.registry._util import ADMIN, AUTH, BASE, RegistryProcess, folder_files

PART = 4096


def send_half_a_part(port: int, path: str, body: bytes) -> socket.socket:
    """Start a PUT whose body stops halfway; the socket stays open, as in a dropped transfer."""
    sock = socket.create_connection(("127.0.0.1", port))
    head = (f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ADMIN}\r\n"
            f"Content-Length: {len(body)}\r\nContent-Type: application/octet-stream\r\n\r\n")
    sock.sendall(head.encode() + body[: len(body) // 2])
    return sock


def test_killed_mid_push_then_resumed(tmp_path, tiny_llama, lora_adapter):
    files = folder_files(lora_adapter)
    weights = files["adapter_model.safetensors"]
    w_sha = hashlib.sha256(weights).hexdigest()
    parts = [weights[i:i + PART] for i in range(0, len(weights), PART)]
    n = len(parts)
    assert n >= 3
    manifest = [{"path": p, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                for p, d in files.items()]
    proc = RegistryProcess(tmp_path / "data", QUIVER_PART_SIZE=str(PART)).start()
    try:
        with httpx.Client(base_url=proc.url, headers=AUTH, timeout=30) as c:
            config = json.loads((tiny_llama / "config.json").read_text())
            assert c.post("/api/v1/base-models", json={"name": BASE, "config": config}).is_success
            up = c.post("/api/v1/repos/crashy/-/uploads",
                        json={"metadata": {"base_model": BASE}, "files": manifest}).json()
            uid = up["upload_id"]
            for path, data in files.items():
                sha = hashlib.sha256(data).hexdigest()
                chunks = [data[i:i + PART] for i in range(0, len(data), PART)]
                if path == "adapter_model.safetensors":
                    chunks = chunks[:-1]
                for k, chunk in enumerate(chunks):
                    r = c.put(f"/api/v1/uploads/{uid}/blobs/{sha}/parts/{k}", content=chunk)
                    assert r.status_code == 200, r.text
        sock = send_half_a_part(proc.port, f"/api/v1/uploads/{uid}/blobs/{w_sha}/parts/{n - 1}",
                                parts[-1])
        proc.kill()
        sock.close()
    finally:
        proc.stop()

    with RegistryProcess(tmp_path / "data", QUIVER_PART_SIZE=str(PART)) as proc2:
        with httpx.Client(base_url=proc2.url, headers=AUTH, timeout=30) as c:
            r = c.get("/api/v1/resolve/crashy")
            assert r.status_code == 404 and r.json()["error"]["code"] == "repo_not_found"
            assert c.get("/api/v1/repos/crashy/-/versions").status_code == 404
            state = c.get(f"/api/v1/uploads/{uid}").json()
            assert state["state"] == "open"
            assert state["received"][w_sha] == list(range(n - 1))   # the torn part is not there
            missing = [k for k in range(math.ceil(len(weights) / PART))
                       if k not in state["received"][w_sha]]
            for k in missing:
                r = c.put(f"/api/v1/uploads/{uid}/blobs/{w_sha}/parts/{k}", content=parts[k])
                assert r.status_code == 200
            r = c.post(f"/api/v1/uploads/{uid}/commit")
            assert r.status_code == 201, r.text
            assert r.json()["ref"] == "crashy/1"
            got = c.get(f"/api/v1/blobs/{w_sha}")
            assert got.content == weights
