"""A small process supervisor for a Quiver on one machine, and the ``quiver up`` demo built on it.

    with Stack(Path(".quiver")) as stack:
        reg = stack.start("registry", ["registry", "--data-dir", "d/registry"], port=8700,
                          ready_path="/api/v1/health")
        stack.start("gateway", ["gateway", "--registry", reg.url], ready_path="/health")
        stack.kill("gateway")          # SIGKILL, as a crash would
        stack.restart("registry")      # same command, same port, waits until it answers

Every component is ``python -m quiver.client.cli serve KIND ...`` in its own process group,
with its own ``QUIVER_*`` environment and its log in ``<data dir>/logs/<name>.log``. Stopping
sends SIGTERM, then SIGKILL after a deadline.

:func:`run_demo` is the main job on embedded defaults: registry (SQLite and local blobs), a CPU
backend serving the tiny demo model, the router and the gateway; it pushes the demo adapters
(only those the registry does not already hold byte for byte), routes a handful of prompts
with ``model="auto"`` through the ``openai`` client and prints what happened.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import httpx

__all__ = ["Component", "Stack", "StackError", "DEFAULT_PORTS", "free_port", "port_is_free",
           "DemoRow", "DemoStack", "start_demo_stack", "push_demo_adapters", "demo_prompts",
           "route_prompts", "format_table", "run_demo"]

DEFAULT_PORTS = {"registry": 8700, "backend": 8300, "router": 8900, "gateway": 8080}


class StackError(RuntimeError):
    """A component did not start, or exited while it was expected to serve."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``host:port`` can be bound now."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


@dataclass
class Component:
    """One supervised process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    host: str
    port: int
    ready_path: str
    log_path: Path
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Stack:
    """Start, watch, restart and stop Quiver processes on loopback.

    ``env`` is added to every component's environment (on top of this process's); each
    ``start`` may add more. Ports default to free ones.
    """

    data_dir: Path
    host: str = "127.0.0.1"
    env: dict[str, str] = field(default_factory=dict)
    inherit_quiver_env: bool = True
    stop_timeout: float = 15.0
    components: dict[str, Component] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self, name: str, serve_args: Sequence[str], *, port: int | None = None,
              env: dict[str, str] | None = None, ready_path: str = "/health",
              timeout: float = 120.0, wait: bool = True) -> Component:
        """Run ``quiver serve <serve_args> --host H --port P`` as ``name``, then wait for it."""
        if name in self.components and self.components[name].alive:
            raise StackError(f"{name} is already running")
        port = port or free_port(self.host)
        argv = [sys.executable, "-m", "quiver.client.cli", "serve", *serve_args,
                "--host", self.host, "--port", str(port)]
        inherited = {k: v for k, v in os.environ.items()
                     if self.inherit_quiver_env or not k.startswith("QUIVER_")}
        full_env = {**inherited, "PYTHONUNBUFFERED": "1", **self.env, **(env or {})}
        comp = Component(name=name, argv=argv, env=full_env, host=self.host, port=port,
                         ready_path=ready_path, log_path=self.data_dir / "logs" / f"{name}.log")
        self.components[name] = comp
        self._spawn(comp)
        if wait:
            self.wait_ready(name, timeout)
        return comp

    def _spawn(self, comp: Component) -> None:
        with open(comp.log_path, "ab") as log:
            log.write(f"--- start {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                      f"{' '.join(comp.argv)}\n".encode())
            log.flush()
            comp.proc = subprocess.Popen(comp.argv, env=comp.env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        comp.started_at = time.monotonic()

    def wait_ready(self, name: str, timeout: float = 120.0, path: str | None = None) -> None:
        """Poll ``path`` (the component's ready path) until it answers 2xx."""
        comp = self.components[name]
        deadline = time.monotonic() + timeout
        url = comp.url + (path or comp.ready_path)
        last = ""
        with httpx.Client(timeout=2.0) as http:
            while True:
                if not comp.alive:
                    code = comp.proc.returncode if comp.proc else None
                    raise StackError(f"{name} exited with code {code}; log {comp.log_path}:\n"
                                     f"{comp.log_tail()}")
                try:
                    r = http.get(url)
                    if r.status_code < 300:
                        return
                    last = f"HTTP {r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as exc:
                    last = type(exc).__name__
                if time.monotonic() > deadline:
                    raise StackError(f"{name} not ready at {url} after {timeout:.0f}s ({last}); "
                                     f"log {comp.log_path}:\n{comp.log_tail()}")
                time.sleep(0.2)

    def stop(self, name: str, timeout: float | None = None) -> int | None:
        """SIGTERM ``name``'s process group, SIGKILL after ``timeout``; its exit code."""
        comp = self.components[name]
        if comp.proc is None:
            return None
        if comp.proc.poll() is None:
            self._signal(comp, signal.SIGTERM)
            try:
                comp.proc.wait(timeout=self.stop_timeout if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                self._signal(comp, signal.SIGKILL)
                comp.proc.wait()
        return comp.proc.returncode

    def kill(self, name: str) -> None:
        """SIGKILL ``name`` at once, as a crash would."""
        comp = self.components[name]
        if comp.alive:
            self._signal(comp, signal.SIGKILL)
            comp.proc.wait()

    def restart(self, name: str, *, timeout: float = 120.0, hard: bool = False) -> Component:
        """Stop (or kill with ``hard``) and start ``name`` again with the same command and port."""
        comp = self.components[name]
        if hard:
            self.kill(name)
        else:
            self.stop(name)
        deadline = time.monotonic() + 10
        while not port_is_free(comp.port, comp.host) and time.monotonic() < deadline:
            time.sleep(0.1)
        comp.restarts += 1
        self._spawn(comp)
        self.wait_ready(name, timeout)
        return comp

    def stop_all(self) -> None:
        """Stop every component, the last started first, all sent SIGTERM before any wait."""
        running = [c for c in reversed(self.components.values()) if c.alive]
        for comp in running:
            self._signal(comp, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for comp in running:
            try:
                comp.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._signal(comp, signal.SIGKILL)
                comp.proc.wait()

    def check_alive(self) -> None:
        """Raise StackError naming the first component that has exited."""
        for comp in self.components.values():
            if comp.proc is not None and not comp.alive:
                raise StackError(f"{comp.name} exited with code {comp.proc.returncode}; "
                                 f"log {comp.log_path}:\n{comp.log_tail()}")

    def url(self, name: str) -> str:
        return self.components[name].url

    @staticmethod
    def _signal(comp: Component, sig: int) -> None:
        try:
            os.killpg(comp.proc.pid, sig)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_all()


# --- the demo ------------------------------------------------------------------------------------

@dataclass
class DemoRow:
    """One routed prompt of the demo table."""

    prompt: str
    adapter: str
    confidence: float | None
    answer: str
    expected_adapter: str | None = None
    expected_answer: str | None = None


@dataclass
class DemoStack:
    """A running demo: the supervisor, the demo files and the URLs."""

    stack: Stack
    demo: Any
    pushed: list[str]
    timings: dict[str, float]

    def urls(self) -> dict[str, str]:
        return {name: comp.url for name, comp in self.stack.components.items()}


def _pick_port(wanted: int, host: str, taken: set[int]) -> int:
    if wanted and wanted not in taken and port_is_free(wanted, host):
        return wanted
    port = free_port(host)
    while port in taken:
        port = free_port(host)
    return port


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _folder_digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): _sha256(p)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def push_demo_adapters(client: Any, demo: Any, *, alias: str = "prod",
                       log: Callable[[str], None] = print) -> list[str]:
    """Register the demo base model and push each demo adapter the registry lacks.

    An adapter is skipped when the version ``repo@alias`` resolves to has the same files (by
    sha256) as the local folder. Returns the refs pushed now.
    """
    from quiver.errors import NotFound

    try:
        client.get_base_model(demo.base_model)
    except NotFound:
        client.add_base_model(demo.base_dir / "config.json", demo.base_model)
        log(f"registered base model {demo.base_model}")
    pushed = []
    for adapter in demo.adapters:
        local = _folder_digests(adapter.dir)
        try:
            current = client.resolve(f"{adapter.repo}@{alias}")
            remote = {f.path: f.sha256 for f in current.files}
        except NotFound:
            remote = None
        if remote is not None and all(remote.get(p) == d for p, d in local.items()):
            continue
        info = client.push(adapter.dir, adapter.repo, base_model=demo.base_model,
                           examples=list(adapter.examples),
                           task_description=adapter.task_description,
                           description=adapter.task_description, aliases=[alias])
        pushed.append(info.ref)
        log(f"pushed {info.ref} ({len(adapter.examples)} example prompts)")
    return pushed


def demo_prompts(demo: Any, per_adapter: int = 2) -> list[tuple[str, str | None, str]]:
    """(prompt, expected adapter repo or None for the base model, expected answer)."""
    out: list[tuple[str, str | None, str]] = []
    for adapter in demo.adapters:
        for prompt, answer in adapter.test_pairs[:per_adapter]:
            out.append((prompt, adapter.repo, answer))
    for prompt, answer in demo.base_test_pairs:
        if prompt.lower().startswith("tell me"):
            out.append((prompt, None, answer))
            break
    else:
        if demo.base_test_pairs:
            prompt, answer = demo.base_test_pairs[-1]
            out.append((prompt, None, answer))
    return out


def route_prompts(gateway_url: str, prompts: Sequence[tuple[str, str | None, str]], *,
                  max_tokens: int = 48, timeout: float = 120.0) -> list[DemoRow]:
    """Send each prompt with ``model="auto"`` through the openai client; one row per prompt."""
    from openai import OpenAI

    from quiver.backend.demo import render_prompt

    client = OpenAI(base_url=gateway_url + "/v1", api_key="quiver-demo", timeout=timeout,
                    max_retries=2)
    rows = []
    for prompt, expected_adapter, expected in prompts:
        raw = client.completions.with_raw_response.create(
            model="auto", prompt=render_prompt(prompt), max_tokens=max_tokens, temperature=0.0)
        completion = raw.parse()
        conf = raw.headers.get("x-quiver-route-confidence")
        rows.append(DemoRow(prompt=prompt, adapter=raw.headers.get("x-quiver-adapter") or "(base)",
                            confidence=float(conf) if conf else None,
                            answer=completion.choices[0].text.strip(),
                            expected_adapter=expected_adapter, expected_answer=expected))
    return rows


def format_table(rows: Sequence[DemoRow]) -> str:
    """A plain-text table: prompt | adapter | confidence | answer."""
    head = ("prompt", "adapter", "confidence", "answer")
    cells = [(r.prompt, r.adapter, "-" if r.confidence is None else f"{r.confidence:.2f}",
              r.answer) for r in rows]
    widths = [max(len(head[i]), *(len(c[i]) for c in cells)) if cells else len(head[i])
              for i in range(4)]
    line = "+".join("-" * (w + 2) for w in widths)

    def fmt(values: Sequence[str]) -> str:
        return "|".join(f" {v:<{w}} " for v, w in zip(values, widths))

    return "\n".join([fmt(head), line, *(fmt(c) for c in cells)])


def start_demo_stack(data_dir: Path, *, host: str = "127.0.0.1", port_offset: int = 0,
                     demo: Any = None, gateway_port: int | None = None,
                     log: Callable[[str], None] = print) -> DemoStack:
    """Start registry, backend, router and gateway on embedded defaults; push the demo.

    Ports are the defaults plus ``port_offset``, or free ones where those are taken.
    """
    from quiver.backend.demo import demo_paths
    from quiver.client import Client

    data_dir = Path(data_dir).resolve()
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    if demo is None:
        from quiver.backend.demo import ASSETS
        from quiver.backend.demo.paths import MANIFEST

        if not (ASSETS / MANIFEST).exists() and not (data_dir / "demo" / MANIFEST).exists():
            log(f"building the demo model into {data_dir / 'demo'} (first run only; CPU minutes)")
        demo = demo_paths(data_dir / "demo")
    timings["demo"] = time.monotonic() - t0
    taken: set[int] = set()
    ports = {}
    for name, default in DEFAULT_PORTS.items():
        wanted = gateway_port if name == "gateway" and gateway_port else default + port_offset
        ports[name] = _pick_port(wanted, host, taken)
        taken.add(ports[name])
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # Embedded defaults: no Redis, database or S3 settings leak in from this shell.
    stack = Stack(data_dir, host=host, env=env, inherit_quiver_env=False)
    try:
        t = time.monotonic()
        admin = _admin_token(data_dir)
        registry = stack.start("registry", ["registry", "--data-dir", str(data_dir / "registry")],
                               port=ports["registry"], ready_path="/api/v1/health",
                               env={"QUIVER_ADMIN_TOKEN": admin}, wait=False)
        stack.start("backend", ["backend", "--model", str(demo.base_dir), "--registry",
                                registry.url, "--base-model-name", demo.base_model],
                    port=ports["backend"], ready_path="/ready", timeout=300,
                    env={"QUIVER_DISK_CACHE_DIR": str(data_dir / "backend-cache"),
                         "QUIVER_DEVICE": "cpu"}, wait=False)
        router = stack.start("router", ["router", "--registry", registry.url],
                             port=ports["router"], ready_path="/health", timeout=300,
                             env={"QUIVER_ARTIFACT_DIR": str(data_dir / "router"),
                                  "QUIVER_DEFAULT_BASE_MODEL": demo.base_model}, wait=False)
        stack.wait_ready("registry", timeout=60)
        timings["registry_start"] = time.monotonic() - t
        t_push = time.monotonic()
        with Client(registry.url, admin) as client:
            pushed = push_demo_adapters(client, demo, log=log)
        timings["push"] = time.monotonic() - t_push
        stack.start("gateway", ["gateway", "--registry", registry.url, "--backend",
                                stack.url("backend"), "--router", router.url],
                    port=ports["gateway"], ready_path="/ready", timeout=300, wait=False)
        stack.wait_ready("router", timeout=300)
        with httpx.Client(timeout=300) as http:
            http.post(router.url + "/v1/routers/refresh").raise_for_status()
        stack.wait_ready("router", timeout=300, path="/ready")
        stack.wait_ready("backend", timeout=300)
        stack.wait_ready("gateway", timeout=120)
        timings["services_start"] = time.monotonic() - t
    except BaseException:
        stack.stop_all()
        raise
    return DemoStack(stack=stack, demo=demo, pushed=pushed, timings=timings)


def _admin_token(data_dir: Path) -> str:
    """The demo's admin token, made once and kept (mode 0600) under the data dir."""
    import secrets

    path = data_dir / "admin-token"
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = "qv_admin_" + secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def run_demo(data_dir: Path = Path(".quiver"), *, host: str = "127.0.0.1", port_offset: int = 0,
             once: bool = False, as_json: bool = False, demo_dir: Path | None = None,
             gateway_port: int | None = None) -> int:
    """``quiver up``: start everything, push the demo, route prompts, print the table; serve."""
    log = (lambda msg: print(msg, file=sys.stderr)) if as_json else print
    # Ctrl-C and SIGTERM both stop the children first, whatever this process inherited.
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run_demo(Path(data_dir), host=host, port_offset=port_offset, once=once,
                         as_json=as_json, demo_dir=demo_dir, gateway_port=gateway_port, log=log)
    except KeyboardInterrupt:
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_demo(data_dir: Path, *, host: str, port_offset: int, once: bool, as_json: bool,
              demo_dir: Path | None, gateway_port: int | None, log: Callable[[str], None]) -> int:
    import json

    t0 = time.monotonic()
    demo = None
    if demo_dir is not None:
        from quiver.backend.demo import load_demo

        demo = load_demo(Path(demo_dir))
    running = start_demo_stack(Path(data_dir), host=host, port_offset=port_offset, demo=demo,
                               gateway_port=gateway_port, log=log)
    shown = False
    try:
        rows = route_prompts(running.stack.url("gateway"), demo_prompts(running.demo))
        running.timings["total"] = time.monotonic() - t0
        urls = running.urls()
        # Set before printing: with unbuffered output (PYTHONUNBUFFERED) a reader may see the
        # table, and send Ctrl-C, before the next statement runs.
        shown = True
        if as_json:
            print(json.dumps({"urls": urls, "pushed": running.pushed,
                              "timings_s": {k: round(v, 2) for k, v in running.timings.items()},
                              "rows": [r.__dict__ for r in rows]}))
        else:
            print()
            print(format_table(rows))
            print()
            print(f"ready in {running.timings['total']:.1f}s; pushed "
                  f"{', '.join(running.pushed) or 'nothing (all adapters up to date)'}")
            for name, url in urls.items():
                print(f"  {name:<9} {url}")
            gw = urls["gateway"]
            print(f"\nTry: curl {gw}/v1/completions -H 'content-type: application/json' "
                  f"-d '{{\"model\": \"auto\", \"prompt\": \"SHOUT this: hello\\n\"}}'")
        sys.stdout.flush()
        if once:
            return 0
        if not as_json:
            print("Serving; Ctrl-C stops every part.", flush=True)
        _serve_until_interrupted(running.stack)
        return 0
    except KeyboardInterrupt:
        if shown:
            return 0  # once the table is out, Ctrl-C is the normal way to stop
        raise
    finally:
        running.stack.stop_all()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _serve_until_interrupted(stack: Stack) -> None:
    """Watch the components until Ctrl-C or SIGTERM; a component that dies ends the wait."""
    try:
        while True:
            stack.check_alive()
            time.sleep(0.5)
    except KeyboardInterrupt:
        return


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m quiver.client.stack [--data-dir D] [--port-offset N] [--once] [--json]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="quiver up", description=run_demo.__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path(".quiver"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port-offset", type=int, default=0)
    parser.add_argument("--once", action="store_true")
    parser.add_argument("--json", dest="as_json", action="store_true")
    parser.add_argument("--demo-dir", type=Path, default=None,
                        help="A demo built by `python -m quiver.backend.demo.build`.")
    args = parser.parse_args(argv)
    try:
        return run_demo(args.data_dir, host=args.host, port_offset=args.port_offset,
                        once=args.once, as_json=args.as_json, demo_dir=args.demo_dir)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
