"""Registry transfer benchmark: Quiver's client against raw HTTP and huggingface_hub.

One run, on loopback, with the registry started as a real server process:

- pull: ``Client.pull`` (cold cache) of a ~200 MB adapter vs a raw streaming GET of the same
  blob to a file vs ``huggingface_hub.snapshot_download`` of the same version from the registry;
- push: ``Client.push`` of a fresh ~200 MB adapter vs a raw streaming PUT of the same bytes to
  a sink server (uvicorn, writes to disk) run by this script, which keeps each file until the
  repetition ends, as the registry keeps its blob;
- lookups and listings: p50 with 10,000 versions vs 10, on SQLite and PostgreSQL (versions are
  created through the registry's crud layer);
- the registry's resident memory while a ~1 GB adapter is pushed and pulled.

Every timed transfer, Quiver's or a peer's, starts right after this script has written and
deleted twice the adapter's size (``prefault_page_cache``). The VMs this runs on hand freed
guest memory back to their host within seconds (virtio-balloon free page reporting), and the
first touch of such a page costs several times a recycled one; without the refill, whichever
transfer happens to allocate after memory has been handed back pays for the VM, not for its
own work. A collection of this script's garbage runs before each timed transfer as well.

    python bench/registry_transfer.py [--quick] [--json] [--repeat N] [--no-postgres]
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import secrets
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    bench_args, percentile, prefault_page_cache, ratio, report, rss_bytes,
)

MiB = 1 << 20
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
_MODULES = {  # name -> (in_features, out_features) for a Llama-7B-shaped layer (GQA, 8 kv heads)
    "q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024),
    "o_proj": (4096, 4096), "gate_proj": (4096, 11008), "up_proj": (4096, 11008),
    "down_proj": (11008, 4096),
}
_RANK = 16


# --- synthetic adapters --------------------------------------------------------------------------

def base_config(layers: int) -> dict[str, Any]:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 11008, "num_hidden_layers": layers, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}


def layers_for(size_bytes: int) -> int:
    per_layer = sum(_RANK * (i + o) for i, o in _MODULES.values()) * 4
    return max(1, math.ceil(size_bytes / per_layer))


def write_adapter(folder: Path, layers: int, seed: int) -> Path:
    """A rank-16 fp32 LoRA on all seven projections, streamed to a safetensors file."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    shapes = []
    offset = 0
    for layer in range(layers):
        for m, (fin, fout) in _MODULES.items():
            for kind, shape in (("lora_A", (_RANK, fin)), ("lora_B", (fout, _RANK))):
                name = f"base_model.model.model.layers.{layer}.mlp.{m}" if m in (
                    "gate_proj", "up_proj", "down_proj") else \
                    f"base_model.model.model.layers.{layer}.self_attn.{m}"
                n = shape[0] * shape[1] * 4
                header[f"{name}.{kind}.weight"] = {"dtype": "F32", "shape": list(shape),
                                                   "data_offsets": [offset, offset + n]}
                shapes.append(shape)
                offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    with open(folder / "adapter_model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for shape in shapes:
            (rng.random(shape, dtype=np.float32) * 0.02 - 0.01).tofile(fh)
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": _RANK, "lora_alpha": 32,
        "target_modules": list(_MODULES), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False}))
    return folder


# --- processes ---------------------------------------------------------------------------------

def start_registry(data_dir: Path, token: str, database_url: str | None = None):
    from quiver.client.up import start_registry as start

    env = {"QUIVER_LOG_LEVEL": "WARNING"}
    if database_url:
        env["QUIVER_DATABASE_URL"] = database_url
    return start(data_dir, "127.0.0.1", 0, admin_token=token, timeout=60, extra_env=env)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def sink_main(port: int, folder: str) -> None:
    """The PUT sink: a minimal ASGI app on uvicorn writing each request body to a file it keeps.

    Keeping the file matters on a VM: freed page-cache pages are reused far more cheaply than
    fresh guest memory is touched, so a sink that deletes before answering runs on recycled
    memory while the registry, which keeps its blobs, does not."""
    import uvicorn

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        path = Path(folder) / uuid.uuid4().hex
        with open(path, "wb") as fh:
            more = True
            while more:
                msg = await receive()
                fh.write(msg.get("body", b""))
                more = msg.get("more_body", False)
        size = path.stat().st_size   # kept, as the registry keeps its blob; removed by the caller
        body = json.dumps({"received": size}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def start_sink(folder: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    from quiver.client.up import _free_port

    port = _free_port("127.0.0.1")
    proc = subprocess.Popen([sys.executable, __file__, "--sink", str(port), str(folder)])
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            httpx.get(url, timeout=1.0)
            return proc, url
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError("sink did not start")


# --- measurements ------------------------------------------------------------------------------

def raw_get(url: str, sha: str, dest: Path) -> None:
    import httpx

    # Plain http: verify=False spares the peer loading a CA bundle it never uses (35-60 ms
    # per client here).
    with httpx.Client(timeout=120, verify=False) as http, open(dest, "wb") as fh:
        with http.stream("GET", f"{url}/api/v1/blobs/{sha}") as r:
            r.raise_for_status()
            for data in r.iter_raw():
                fh.write(data)


def raw_put(url: str, path: Path) -> None:
    import httpx

    def chunks():
        with open(path, "rb") as fh:
            while data := fh.read(4 * MiB):
                yield data

    with httpx.Client(timeout=120, verify=False) as http:    # plain http, as in raw_get
        r = http.put(f"{url}/upload", content=chunks(),
                     headers={"Content-Length": str(path.stat().st_size)})
        r.raise_for_status()


def bench_pull(url: str, ref: str, info, work: Path, repeat: int) -> dict[str, list[float]]:
    from huggingface_hub import snapshot_download

    from quiver.client import Client

    big = max(info.files, key=lambda f: f.size)
    times: dict[str, list[float]] = {"quiver": [], "raw": [], "hf": []}

    def quiver_pull(d: Path) -> None:
        with Client(url, cache_dir=d) as c:
            c.pull(ref)

    def hf_pull(d: Path) -> None:
        snapshot_download(info.repo, revision=info.revision, endpoint=url, cache_dir=str(d))

    runs = {"quiver": quiver_pull, "raw": lambda d: raw_get(url, big.sha256, d / "blob"),
            "hf": hf_pull}
    refill = 2 * math.ceil(info.size_bytes / MiB)
    for rep in range(repeat):
        order = list(runs)
        random.Random(rep).shuffle(order)
        for name in order:
            d = work / f"pull-{name}-{rep}"
            d.mkdir(parents=True)
            prefault_page_cache(work, refill)
            gc.collect()
            t0 = time.perf_counter()
            runs[name](d)
            times[name].append(time.perf_counter() - t0)
            shutil.rmtree(d)
    return times


def bench_push(url: str, token: str, sink: str, base: str, layers: int, work: Path,
               repeat: int) -> dict[str, list[float]]:
    from quiver.client import Client

    times: dict[str, list[float]] = {"quiver": [], "raw": []}
    for rep in range(repeat):
        folder = write_adapter(work / f"push-{rep}", layers, seed=1000 + rep)
        weights = folder / "adapter_model.safetensors"
        refill = 2 * math.ceil(weights.stat().st_size / MiB)
        order = ["quiver", "raw"] if rep % 2 == 0 else ["raw", "quiver"]
        for name in order:
            prefault_page_cache(work, refill)
            gc.collect()
            t0 = time.perf_counter()
            if name == "raw":
                raw_put(sink, weights)
            else:
                with Client(url, token, cache_dir=work / f"push-cache-{rep}") as c:
                    c.push(folder, "bench/push", base_model=base)
            times[name].append(time.perf_counter() - t0)
        shutil.rmtree(folder)
        shutil.rmtree(work / f"push-cache-{rep}", ignore_errors=True)
        for received in (work / "sink").iterdir():
            received.unlink()
    return times


def populate(database_url: str, repo: str, base: str, count: int) -> None:
    """Create ``count`` ready versions of ``repo``: the first through the registry's crud
    layer, the rest as bulk inserts of the same rows into its tables."""
    from datetime import datetime, timezone

    from sqlalchemy import insert, select, update

    from quiver.registry import crud
    from quiver.registry.db import Database
    from quiver.registry.models import Alias, ManifestFile, PushMetadata, Repo, Version, VersionFile

    def manifest(n: int) -> list[ManifestFile]:
        return [ManifestFile(path="adapter_model.safetensors", sha256=f"{n:064x}", size=1000 + n)]

    db = Database(database_url)
    try:
        with db.write_session() as session:
            first = crud.create_version(session, repo=repo, meta=PushMetadata(base_model=base),
                                        files=manifest(1), facts={}, pushed_by="bench")
            crud.publish_version(session, version_id=first.id, aliases=["prod"])
            now = datetime.now(timezone.utc)
            rows = [{"repo_id": first.repo_id, "number": n, "status": "ready",
                     "revision": crud.make_revision(repo, n, manifest(n)), "base_model": base,
                     "adapter_type": "lora", "size_bytes": 1000 + n, "created_at": now,
                     "description": f"version {n}", "examples": [f"example {n}"], "labels": {},
                     "pushed_by": "bench"} for n in range(2, count + 1)]
            if rows:
                session.execute(insert(Version.__table__), rows)
                ids = dict(session.execute(select(Version.number, Version.id).where(
                    Version.repo_id == first.repo_id)).all())
                session.execute(insert(VersionFile.__table__), [
                    {"version_id": ids[n], "path": f.path, "sha256": f.sha256, "size": f.size}
                    for n in range(2, count + 1) for f in manifest(n)])
                session.execute(update(Repo).where(Repo.id == first.repo_id).values(
                    next_version=count + 1, latest_version=count, version_count=count))
                session.execute(update(Alias).where(Alias.repo_id == first.repo_id).values(
                    version_id=ids[max(1, count // 2)]))
            session.commit()
    finally:
        db.dispose()


def lookup_p50(urls: dict[int, str], repo: str, samples: int) -> dict[int, dict[str, float]]:
    """p50 ms per operation for each registry (keyed by version count), requests interleaved
    so that every registry sees the same machine load."""
    import httpx

    def ops(count: int, rng: random.Random) -> dict[str, Any]:
        return {
            "resolve_number": lambda: f"/api/v1/resolve/{repo}/{rng.randint(1, count)}",
            "resolve_alias": lambda: f"/api/v1/resolve/{repo}@prod",
            "resolve_latest": lambda: f"/api/v1/resolve/{repo}",
            "list_versions": lambda: f"/api/v1/repos/{repo}/-/versions?limit=10",
            "list_all_versions": lambda: "/api/v1/versions?limit=10",
            "repo_info": lambda: f"/api/v1/repos/{repo}/-/info",
        }

    clients = {n: httpx.Client(base_url=u, timeout=30) for n, u in urls.items()}
    paths = {n: ops(n, random.Random(n)) for n in urls}
    times: dict[int, dict[str, list[float]]] = {n: {op: [] for op in paths[n]} for n in urls}
    try:
        for op in paths[next(iter(urls))]:
            for i in range(samples + 10):
                for n in (list(urls) if i % 2 else list(urls)[::-1]):
                    p = paths[n][op]()
                    t0 = time.perf_counter()
                    clients[n].get(p).raise_for_status()
                    if i >= 10:
                        times[n][op].append(time.perf_counter() - t0)
    finally:
        for c in clients.values():
            c.close()
    return {n: {op: percentile(ts, 50) * 1000 for op, ts in t.items()} for n, t in times.items()}


def bench_lookups(work: Path, token: str, backend: str, counts: list[int],
                  samples: int) -> dict[int, dict[str, float]]:
    from quiver.client import Client

    procs, urls, dbs = [], {}, []
    admin = None
    if backend == "postgresql":
        import psycopg

        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True)
    try:
        for count in counts:
            data = work / f"lookups-{backend}-{count}"
            db_url = f"sqlite:///{(data / 'registry.db').resolve()}"
            if admin is not None:
                name = f"quiver_bench_{uuid.uuid4().hex[:10]}"
                admin.execute(f'CREATE DATABASE "{name}"')
                dbs.append(name)
                db_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
            proc, url = start_registry(data, token, db_url if admin is not None else None)
            procs.append(proc)
            urls[count] = url
            with Client(url, token, cache_dir=work / "lookup-cache") as c:
                c.add_base_model(base_config(2), "bench/lookup-base")
            t0 = time.perf_counter()
            populate(db_url, "bench/many", "bench/lookup-base", count)
            print(f"  {backend}: {count} versions created in {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr)
        return lookup_p50(urls, "bench/many", samples)
    finally:
        for proc in procs:
            stop(proc)
        if admin is not None:
            for name in dbs:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.close()


def bench_rss(url: str, token: str, pid: int, base: str, layers: int, work: Path
              ) -> dict[str, float]:
    from quiver.client import Client

    folder = write_adapter(work / "rss", layers, seed=7)
    size = (folder / "adapter_model.safetensors").stat().st_size
    peak = [rss_bytes(pid)]
    idle = peak[0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with Client(url, token, cache_dir=work / "rss-cache") as c:
            t0 = time.perf_counter()
            info = c.push(folder, "bench/rss", base_model=base)
            push_s = time.perf_counter() - t0
            shutil.rmtree(work / "rss-cache")
        with Client(url, token, cache_dir=work / "rss-cache2") as c:
            t0 = time.perf_counter()
            c.pull(info.ref)
            pull_s = time.perf_counter() - t0
    finally:
        done.set()
        sampler.join()
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(work / "rss-cache2", ignore_errors=True)
    return {"file_mb": size / MiB, "idle_rss_mb": idle / MiB, "peak_rss_mb": peak[0] / MiB,
            "push_mb_s": size / MiB / push_s, "pull_mb_s": size / MiB / pull_s}


# --- main ----------------------------------------------------------------------------------------

def pull_part(url, info, work, repeat, mb, result, lines) -> None:
    pull = bench_pull(url, info.ref, info, work, repeat)
    med = {k: percentile(v, 50) for k, v in pull.items()}
    result.update(pull_vs_raw=ratio(med["raw"], med["quiver"]),
                  pull_vs_hf=ratio(med["hf"], med["quiver"]),
                  pull_mb_s={k: round(mb / v, 1) for k, v in med.items()},
                  pull_s={k: [round(x, 3) for x in v] for k, v in pull.items()},
                  adapter_mb=round(mb, 1))
    lines.append(f"pull {mb:.0f} MB (median of {repeat}): quiver {mb / med['quiver']:.0f} MB/s,"
                 f" raw GET {mb / med['raw']:.0f} MB/s, huggingface_hub "
                 f"{mb / med['hf']:.0f} MB/s -> {result['pull_vs_raw']}x raw, "
                 f"{result['pull_vs_hf']}x HF")


def push_part(url, token, sink_url, base, layers, work, repeat, mb, result, lines) -> None:
    push = bench_push(url, token, sink_url, base, layers, work, repeat)
    pmed = {k: percentile(v, 50) for k, v in push.items()}
    result.update(push_vs_raw=ratio(pmed["raw"], pmed["quiver"]),
                  push_mb_s={k: round(mb / v, 1) for k, v in pmed.items()},
                  push_s={k: [round(x, 3) for x in v] for k, v in push.items()})
    lines.append(f"push {mb:.0f} MB (median of {repeat}): quiver {mb / pmed['quiver']:.0f} MB/s,"
                 f" raw PUT {mb / pmed['raw']:.0f} MB/s -> {result['push_vs_raw']}x raw")


def rss_part(url, token, pid, rss_mb, work, result, lines) -> None:
    from quiver.client import Client

    rss_layers = layers_for(rss_mb * MiB)
    with Client(url, token, cache_dir=work / "setup-cache") as c:
        rss_base = c.add_base_model(base_config(rss_layers), f"bench/llama-{rss_layers}l").name
    rss = bench_rss(url, token, pid, rss_base, rss_layers, work)
    result.update(registry_peak_rss_mb=round(rss["peak_rss_mb"], 1),
                  registry_idle_rss_mb=round(rss["idle_rss_mb"], 1),
                  rss_file_mb=round(rss["file_mb"], 1))
    lines.append(f"registry RSS while pushing and pulling {rss['file_mb']:.0f} MB: "
                 f"idle {rss['idle_rss_mb']:.0f} MB, peak {rss['peak_rss_mb']:.0f} MB "
                 f"(push {rss['push_mb_s']:.0f} MB/s, pull {rss['pull_mb_s']:.0f} MB/s)")


def lookups_part(work, token, args, samples, result, lines) -> None:
    backends = ["sqlite"] + ([] if args.no_postgres else ["postgresql"])
    worst = 0.0
    lookups: dict[str, Any] = {}
    for backend in backends:
        res = bench_lookups(work, token, backend, [10, 10_000], samples)
        ratios = {op: round(res[10_000][op] / res[10][op], 3) for op in res[10]}
        worst = max(worst, *ratios.values())
        lookups[backend] = {"p50_ms_10": {k: round(v, 2) for k, v in res[10].items()},
                            "p50_ms_10k": {k: round(v, 2) for k, v in res[10_000].items()},
                            "ratio": ratios}
        lines.append(f"lookups on {backend}, p50 ms with 10 -> 10,000 versions: " + ", ".join(
            f"{op} {res[10][op]:.2f}->{res[10_000][op]:.2f} ({ratios[op]}x)" for op in ratios))
    result.update(lookup_10k_vs_10=round(worst, 3),
                  lookup_p50_ms=round(lookups["sqlite"]["p50_ms_10k"]["resolve_number"], 2),
                  lookups=lookups)
    lines.append(f"worst lookup ratio 10k/10: {worst:.3f}x")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--sink":
        sink_main(int(sys.argv[2]), sys.argv[3])
        return

    def extra(p):
        p.add_argument("--size-mb", type=int, default=None, help="pull/push adapter size")
        p.add_argument("--rss-mb", type=int, default=None, help="adapter size for the RSS check")
        p.add_argument("--no-postgres", action="store_true")
        p.add_argument("--only", default="pull,push,rss,lookups",
                       help="comma-separated parts to run: pull, push, rss, lookups")
        p.add_argument("--workdir", default=None)
        p.add_argument("--prefault-mb", type=int, default=None,
                       help="MiB written and deleted before timing (default 4096, quick 1024)")

    args = bench_args(__doc__.splitlines()[0], extra)
    size_mb = args.size_mb or (64 if args.quick else 200)
    rss_mb = args.rss_mb or (256 if args.quick else 1024)
    repeat = args.repeat or (1 if args.quick else 9)   # transfers on a shared VM vary by +-30%
    samples = 50 if args.quick else 300
    # huggingface_hub reads these once at import: it must talk to the registry, silently.
    os.environ["HF_HUB_OFFLINE"] = "0"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

    from quiver.client import Client

    work = Path(tempfile.mkdtemp(prefix="quiver-bench-transfer-", dir=args.workdir))
    token = secrets.token_urlsafe(16)
    lines: list[str] = []
    result: dict[str, Any] = {}
    proc = sink = None
    try:
        prefault = args.prefault_mb if args.prefault_mb is not None else (
            1024 if args.quick else 4096)
        if prefault:
            result["prefault_s"] = round(prefault_page_cache(work, prefault), 2)
        proc, url = start_registry(work / "registry", token)
        (work / "sink").mkdir()
        sink, sink_url = start_sink(work / "sink")
        layers = layers_for(size_mb * MiB)
        with Client(url, token, cache_dir=work / "setup-cache") as c:
            base = c.add_base_model(base_config(layers), f"bench/llama-{layers}l").name
            folder = write_adapter(work / "pull-src", layers, seed=1)
            info = c.push(folder, "bench/pull", base_model=base)
        shutil.rmtree(work / "setup-cache")
        shutil.rmtree(folder)
        mb = info.size_bytes / MiB

        parts = set(args.only.split(","))
        if "pull" in parts:
            pull_part(url, info, work, repeat, mb, result, lines)
        if "push" in parts:
            push_part(url, token, sink_url, base, layers, work, repeat, mb, result, lines)
        if "rss" in parts:
            rss_part(url, token, proc.pid, rss_mb, work, result, lines)
        stop(proc)
        proc = None
        if "lookups" in parts:
            lookups_part(work, token, args, samples, result, lines)
    finally:
        if proc is not None:
            stop(proc)
        if sink is not None:
            stop(sink)
        shutil.rmtree(work, ignore_errors=True)
    report(args, result, lines)


if __name__ == "__main__":
    main()
