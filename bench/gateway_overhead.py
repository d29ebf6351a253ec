"""Gateway overhead: Quiver's gateway vs the backend directly vs LiteLLM's proxy, in one run.

Against the instant stand-in backend of ``tests/gateway/standin.py`` on loopback, with one
worker process each, 100 concurrent keep-alive clients send ``/v1/chat/completions`` requests:

- directly to the backend,
- through the Quiver gateway with an explicit adapter (``bench/adapter@prod``, resolved by a
  stand-in registry) and with ``model=auto`` (a stand-in router decides),
- through LiteLLM's proxy (``litellm[proxy]``, installed on first use into
  ``.bench-venv/litellm``) configured with the same backend as an OpenAI-compatible provider.

The targets take turns, three rounds each, so that other load on the machine falls on all of
them alike; latencies are pooled over the rounds and req/s is the median round.
Added latency = p50/p99 through a proxy minus p50/p99 direct, at the same concurrency. For auto,
the router's own p50 (measured directly at the same concurrency) is subtracted as well.
Then 1,000 concurrent streaming requests go through the gateway at once; a stream counts as an
error unless it ends with ``data: [DONE]`` within the time limit.

    python bench/gateway_overhead.py [--quick] [--json] [--no-litellm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
LITELLM_VENV = ROOT / ".bench-venv" / "litellm"
ROUNDS = 3
BASE = "bench-base"
ADAPTER = "bench/adapter"


# --- a minimal HTTP/1.1 keep-alive client: the load generator must not be the bottleneck -----

@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    elapsed: float = 0.0

    rounds_rps: list[float] = field(default_factory=list)

    @property
    def rps(self) -> float:
        if self.rounds_rps:
            return statistics.median(self.rounds_rps)
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0

    @classmethod
    def pooled(cls, parts: list[Result]) -> Result:
        return cls(latencies=[x for p in parts for x in p.latencies],
                   errors=sum(p.errors for p in parts),
                   elapsed=sum(p.elapsed for p in parts), rounds_rps=[p.rps for p in parts])

    def pct(self, q: float) -> float:
        data = sorted(self.latencies)
        if not data:
            return float("nan")
        return data[min(len(data) - 1, int(q * len(data)))] * 1000.0


class Conn:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port,
                                                                 limit=1 << 20)

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length, chunked, close = None, False, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                close = True
        if chunked:
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                parts.append(await self.reader.readexactly(size + 2))
            body = b"".join(p[:-2] for p in parts)
        elif length is not None:
            body = await self.reader.readexactly(length)
        else:
            body = await self.reader.read()
            close = True
        if close:
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def build_request(port: int, path: str, payload: dict, headers: dict[str, str] | None = None
                  ) -> bytes:
    body = json.dumps(payload).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
            ).encode() + body


async def closed_loop(port: int, raw: bytes, concurrency: int, total: int,
                      check: bytes = b"") -> Result:
    """``concurrency`` clients send ``total`` requests, one after the other each."""
    result = Result()
    remaining = total

    async def client() -> None:
        nonlocal remaining
        conn = Conn("127.0.0.1", port)
        try:
            while remaining > 0:
                remaining -= 1
                t0 = time.perf_counter()
                try:
                    status, body = await asyncio.wait_for(conn.request(raw), 120)
                except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
                    conn.close()
                    result.errors += 1
                    continue
                if status != 200 or (check and check not in body):
                    result.errors += 1
                else:
                    result.latencies.append(time.perf_counter() - t0)
        finally:
            conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    result.elapsed = time.perf_counter() - t0
    return result


async def streams_at_once(port: int, raw: bytes, n: int, limit_s: float) -> dict:
    """``n`` streaming requests at once, each on its own connection."""
    ok = stuck = 0
    reasons: dict[str, int] = {}

    def failed(reason: str) -> None:
        reasons[reason] = reasons.get(reason, 0) + 1

    async def one() -> None:
        nonlocal ok, stuck
        conn = Conn("127.0.0.1", port)
        try:
            status, body = await asyncio.wait_for(conn.request(raw), limit_s)
            if status != 200:
                failed(f"http {status}")
            elif b'"error"' in body:
                failed("error event")
            elif not body.rstrip().endswith(b"data: [DONE]"):
                failed("no [DONE]")
            else:
                ok += 1
        except asyncio.TimeoutError:
            stuck += 1
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            failed(type(exc).__name__)
        finally:
            conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    return {"ok": ok, "errors": sum(reasons.values()), "stuck": stuck, "reasons": reasons,
            "seconds": round(time.perf_counter() - t0, 2)}


# --- processes ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(port: int, path: str, timeout: float,
              proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process for port {port} exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"nothing healthy on port {port}{path} after {timeout}s")


def start(stack: ExitStack, args: list[str], env: dict[str, str] | None = None,
          log: Path | None = None) -> subprocess.Popen:
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                 **(env or {})},
                            stdout=out, stderr=subprocess.STDOUT)

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    stack.callback(stop)
    return proc


def ensure_litellm() -> Path:
    exe = LITELLM_VENV / "bin" / "litellm"
    if not exe.exists():
        print("installing litellm[proxy] into .bench-venv/litellm ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"],
                       check=True)
    return exe


# --- the run -----------------------------------------------------------------------------------

def run(quick: bool, with_litellm: bool) -> dict:
    total = 2000 if quick else 8000
    litellm_total = 300 if quick else 1000
    n_streams = 1000
    conc = 100
    tmp = Path(tempfile.mkdtemp(prefix="quiver-bench-"))
    py = sys.executable
    messages = [{"role": "user", "content": "Say something short about lighthouses."}]
    admin_token = "bench-admin-" + secrets.token_hex(8)
    litellm_key = "sk-" + secrets.token_hex(32)
    with ExitStack() as stack:
        ports = {k: free_port() for k in ("backend", "registry", "router", "gateway", "litellm")}
        start(stack, [py, "-m", "tests.gateway.standin", "backend", "--port",
                      str(ports["backend"]), "--id", "bench-1", "--base-model", BASE,
                      "--tokens", "16"])
        (tmp / "registry.json").write_text(json.dumps({
            "base_models": [],
            "versions": [{"repo": ADAPTER, "version": 1, "ref": f"{ADAPTER}/1",
                          "revision": "1" * 40, "status": "ready", "base_model": BASE,
                          "aliases": ["prod"]}]}))
        start(stack, [py, "-m", "tests.gateway.standin", "registry", "--port",
                      str(ports["registry"]), "--data", str(tmp / "registry.json")])
        start(stack, [py, "-m", "tests.gateway.standin", "router", "--port", str(ports["router"]),
                      "--base-model", BASE, "--routes", json.dumps({"lighthouse": f"{ADAPTER}/1"})])
        gw_proc = start(stack, [py, "-m", "quiver.gateway", "--port", str(ports["gateway"]),
                                "--backend", f"http://127.0.0.1:{ports['backend']}",
                                "--registry", f"http://127.0.0.1:{ports['registry']}",
                                "--router", f"http://127.0.0.1:{ports['router']}"],
                        env={"QUIVER_LOG_LEVEL": "WARNING", "QUIVER_ADMIN_TOKEN": admin_token},
                        log=tmp / "gateway.log")
        if with_litellm:
            exe = ensure_litellm()
            (tmp / "litellm.yaml").write_text(
                "model_list:\n"
                f"  - model_name: {ADAPTER}@prod\n"
                "    litellm_params:\n"
                f"      model: openai/{ADAPTER}/1\n"
                f"      api_base: http://127.0.0.1:{ports['backend']}/v1\n"
                "      api_key: unused\n")
            lt_proc = start(stack, [str(exe), "--config", str(tmp / "litellm.yaml"),
                                    "--host", "127.0.0.1", "--port", str(ports["litellm"]),
                                    "--num_workers", "1"],
                            env={"LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False",
                                 "LITELLM_MASTER_KEY": litellm_key, "PYTHONPATH": ""},
                            log=tmp / "litellm.log")
        wait_http(ports["backend"], "/health", 30)
        wait_http(ports["registry"], "/api/v1/health", 30)
        wait_http(ports["gateway"], "/ready", 30, gw_proc)
        if with_litellm:
            wait_http(ports["litellm"], "/health/liveliness", 240, lt_proc)
        gw_key = httpx.post(f"http://127.0.0.1:{ports['gateway']}/admin/keys",
                            json={"name": "bench"},
                            headers={"Authorization": f"Bearer {admin_token}"}).json()["key"]
        gw_auth = {"Authorization": f"Bearer {gw_key}"}

        explicit = {"model": f"{ADAPTER}@prod", "messages": messages, "max_tokens": 16}
        auto = {"model": "auto", "messages": messages, "max_tokens": 16}
        req = {
            "direct": build_request(ports["backend"], "/v1/chat/completions",
                                    {**explicit, "model": f"{ADAPTER}/1"}),
            "gateway": build_request(ports["gateway"], "/v1/chat/completions", explicit, gw_auth),
            "auto": build_request(ports["gateway"], "/v1/chat/completions", auto, gw_auth),
            "router": build_request(ports["router"], "/v1/route", {"messages": messages}),
            "litellm": build_request(ports["litellm"], "/v1/chat/completions", explicit,
                                     {"Authorization": f"Bearer {litellm_key}"}),
            "stream": build_request(ports["gateway"], "/v1/chat/completions",
                                    {**explicit, "stream": True}, gw_auth),
        }

        async def measure() -> dict:
            # Targets take turns, ROUNDS times, so that load from anything else on the machine
            # falls on all of them alike; latencies are pooled, req/s is the median round.
            check = f"{ADAPTER}/1".encode()
            targets = [("direct", ports["backend"], total), ("gateway", ports["gateway"], total),
                       ("auto", ports["gateway"], total), ("router", ports["router"], total)]
            if with_litellm:
                targets.append(("litellm", ports["litellm"], litellm_total))
            for name, port, _ in targets:  # warm-up
                await closed_loop(port, req[name], conc if name != "litellm" else 10,
                                  500 if name != "litellm" else 50,
                                  check if name != "router" else b"")
            rounds: dict[str, list[Result]] = {name: [] for name, _, _ in targets}
            for _ in range(ROUNDS):
                for name, port, n in targets:
                    rounds[name].append(await closed_loop(port, req[name], conc, n // ROUNDS,
                                                          check if name != "router" else b""))
            out: dict = {name: Result.pooled(parts) for name, parts in rounds.items()}
            out["streams"] = await streams_at_once(ports["gateway"], req["stream"], n_streams,
                                                   120)
            return out

        results = asyncio.run(measure())
        stack.close()

    d, g, a, r = (results[k] for k in ("direct", "gateway", "auto", "router"))
    report: dict = {"machine": "2-core CPU VM, no GPU", "concurrency": conc,
                    "requests": total, "quick": quick}
    for name, res in (("direct", d), ("gateway", g), ("auto", a), ("router", r)):
        report[name] = {"p50_ms": round(res.pct(0.5), 2), "p99_ms": round(res.pct(0.99), 2),
                        "rps": round(res.rps, 1), "errors": res.errors}
    p50_over = g.pct(0.5) - d.pct(0.5)
    p99_over = g.pct(0.99) - d.pct(0.99)
    auto_over = a.pct(0.5) - d.pct(0.5) - r.pct(0.5)
    report.update(p50_overhead_ms=round(p50_over, 2), p99_overhead_ms=round(p99_over, 2),
                  auto_p50_overhead_beyond_router_ms=round(auto_over, 2),
                  rps=round(g.rps, 1), rps_vs_direct=round(g.rps / d.rps, 3))
    if with_litellm:
        lt = results["litellm"]
        report["litellm"] = {"p50_ms": round(lt.pct(0.5), 2), "p99_ms": round(lt.pct(0.99), 2),
                             "rps": round(lt.rps, 1), "errors": lt.errors}
        l50, l99 = lt.pct(0.5) - d.pct(0.5), lt.pct(0.99) - d.pct(0.99)
        report.update(
            litellm_p50_overhead_ms=round(l50, 2), litellm_p99_overhead_ms=round(l99, 2),
            overhead_vs_litellm=round(max(p50_over / l50, p99_over / l99), 4),
            overhead_p50_vs_litellm=round(p50_over / l50, 4),
            overhead_p99_vs_litellm=round(p99_over / l99, 4),
            auto_overhead_vs_litellm=round(auto_over / l50, 4),
            rps_vs_litellm=round(g.rps / lt.rps, 2))
    s = results["streams"]
    report.update(streams=s, stream_errors=s["errors"] + s["stuck"])
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests")
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    parser.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM peer")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    report = run(args.quick, not args.no_litellm)
    for name in ("direct", "gateway", "auto", "router", "litellm"):
        if name in report:
            r = report[name]
            print(f"{name:>8}: p50 {r['p50_ms']:8.2f} ms  p99 {r['p99_ms']:8.2f} ms  "
                  f"{r['rps']:8.1f} req/s  errors {r['errors']}")
    print(f"gateway added latency: p50 {report['p50_overhead_ms']} ms, "
          f"p99 {report['p99_overhead_ms']} ms; auto beyond router: "
          f"{report['auto_p50_overhead_beyond_router_ms']} ms")
    if "rps_vs_litellm" in report:
        print(f"vs LiteLLM: added latency ratio {report['overhead_vs_litellm']} "
              f"(p50 {report['overhead_p50_vs_litellm']}, p99 {report['overhead_p99_vs_litellm']},"
              f" auto {report['auto_overhead_vs_litellm']}), throughput "
              f"{report['rps_vs_litellm']}x")
    print(f"throughput vs direct: {report['rps_vs_direct']}x; 1000 streams: {report['streams']}")
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
