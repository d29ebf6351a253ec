"""Benchmark: Quiver's router against semantic-router on Banking77, same encoder, same run.

Quality: in-scope accuracy with all training data and with 10 examples per intent; refusal of
the test queries of 10 intents left out of training (out-of-scope recall) at a threshold fitted
on held-out training data for a target precision. Speed: single-prompt p50 of the router, the
bare encoder and semantic-router on the same prompts (up to 64 tokens); throughput with 32
concurrent callers against one at a time; the cost of a full and of an incremental retrain
(100 adapters x 50 examples, then one more version) against the time to encode the examples.
The incremental retrain is the fast update the service swaps in (only the new adapter's
weights are fitted); the full refit that replaces it in the background is timed separately.

semantic-router would replace this venv's openai package, so it runs in its own venv
(.bench-venv/, created on first use, seeing this venv's packages behind its own) in a
subprocess. It indexes the same training texts; to save minutes of CPU it is handed the
embeddings this process computed with the same all-MiniLM-L6-v2 (it checks them against its own
HuggingFaceEncoder on a sample and reports the largest difference), and its latency is measured
with its own encoder.

    python bench/router.py [--quick] [--json] [--data PATH] [--no-peer]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SEED = 0
TARGET_PRECISION = 0.97


# --- data ------------------------------------------------------------------------------------

def load_split(data: Path, split: str) -> tuple[list[str], list[str]]:
    import csv

    with (data / f"{split}.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return [r["text"] for r in rows], [r["category"] for r in rows]


def few_per_class(labels: list[str], k: int, rng) -> np.ndarray:
    lab = np.array(labels)
    return np.sort(np.concatenate([rng.choice(np.where(lab == c)[0], k, replace=False)
                                   for c in sorted(set(labels))]))


def stage(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values), q))


# --- quiver ------------------------------------------------------------------------------------

def quality(emb_tr, y_tr, emb_te, y_te, quick: bool) -> dict:
    from quiver.routing.classifier import ClassifierConfig, fit_classifier

    rng = np.random.default_rng(SEED)
    cfg = ClassifierConfig(target_precision=TARGET_PRECISION)
    out: dict = {}
    y_te_arr = np.array(y_te)

    def closed(clf, mask=None):
        pred = np.array(clf.labels)[clf.predict(emb_te).order[:, 0]]
        ok = pred == y_te_arr
        return float(ok.mean() if mask is None else ok[mask].mean())

    t = time.perf_counter()
    full = fit_classifier(emb_tr, y_tr, config=cfg)
    out["fit_all_s"] = time.perf_counter() - t
    out["accuracy_all"] = closed(full)
    few_idx = few_per_class(y_tr, 10, rng)
    few = fit_classifier(emb_tr[few_idx], [y_tr[i] for i in few_idx], config=cfg)
    out["accuracy_10"] = closed(few)

    cats = sorted(set(y_tr))
    left_out = set(rng.choice(cats, 10, replace=False).tolist())
    keep = [i for i, y in enumerate(y_tr) if y not in left_out]
    clf = fit_classifier(emb_tr[keep], [y_tr[i] for i in keep], config=cfg)
    pred = clf.predict(emb_te)
    top = np.array(clf.labels)[pred.order[:, 0]]
    inscope = np.array([y not in left_out for y in y_te])
    accepted = pred.confidence >= clf.threshold
    out.update(oos_left_out=sorted(left_out), oos_threshold=clf.threshold,
               oos_inscope_accuracy=float(((top == y_te_arr) & accepted)[inscope].mean()),
               oos_closed_accuracy=float((top == y_te_arr)[inscope].mean()),
               oos_coverage=float(accepted[inscope].mean()),
               oos_recall=float((~accepted)[~inscope].mean()))
    out["_full"] = full
    out["_few_idx"] = few_idx.tolist()
    out["_keep"] = keep
    return out


def latency_and_throughput(full_clf, encoder, prompts: list[str], n_conc: int) -> dict:
    """Router (the service's own async path, cache off) vs the bare encoder, same prompts."""
    from quiver.routing.service import RouterService
    from quiver.routing.settings import RouterSettings
    from quiver.routing.training import Router

    settings = RouterSettings(threshold=0.0, cache_size=0)
    svc = RouterService(settings, encoder)
    svc.routers = {"bench-base": Router(
        base_model="bench-base", version="bench", classifier=full_clf,
        adapters=tuple(full_clf.labels), example_counts={}, skipped=(), trained_at=time.time(),
        train_seconds=0.0)}

    async def run() -> dict:
        await svc.batcher.start()
        for p in prompts[:5]:
            await svc.route(prompt=p)
            encoder.encode_uncached([p])
        enc_ms, route_ms = [], []
        for p in prompts:
            t0 = time.perf_counter()
            encoder.encode_uncached([p])
            enc_ms.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            await svc.route(prompt=p)
            route_ms.append((time.perf_counter() - t0) * 1000)
        clf_ms = []
        emb = encoder.encode_uncached(prompts[:50])
        for e in emb:
            t0 = time.perf_counter()
            full_clf.predict(e[None, :])
            clf_ms.append((time.perf_counter() - t0) * 1000)
        # throughput: one at a time, then n_conc concurrent callers over the same prompts
        t0 = time.perf_counter()
        for p in prompts:
            await svc.route(prompt=p)
        seq_qps = len(prompts) / (time.perf_counter() - t0)
        queue = list(prompts)

        async def caller():
            while queue:
                await svc.route(prompt=queue.pop())

        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(n_conc)))
        conc_qps = len(prompts) / (time.perf_counter() - t0)
        await svc.close()
        return {"p50_ms": pct(route_ms, 50), "p99_ms": pct(route_ms, 99),
                "encoder_p50_ms": pct(enc_ms, 50), "encoder_p99_ms": pct(enc_ms, 99),
                "classifier_p50_ms": pct(clf_ms, 50), "classifier_p99_ms": pct(clf_ms, 99),
                "sequential_qps": seq_qps, "concurrent_qps": conc_qps,
                "concurrency": n_conc, "largest_batch": svc.batcher.largest_batch}

    return asyncio.run(run())


def retrain_costs(encoder, texts: list[str], labels: list[str], new_texts: list[str]) -> dict:
    """100 adapters x 50 examples; full retrain, then one new adapter version (incremental)."""
    from quiver.routing.service import RouterService
    from quiver.routing.settings import RouterSettings
    from quiver.wire import VersionInfo

    lab = np.array(labels)
    pools = [list(np.array(texts)[lab == c]) for c in sorted(set(labels))]
    groups = []
    for i in range(100):
        pool = pools[i % len(pools)]
        start = 50 * (i // len(pools))
        groups.append(pool[start:start + 50])

    def version(i: int, examples: list[str]) -> VersionInfo:
        return VersionInfo(repo=f"bench/adapter-{i:03d}", version=1,
                           ref=f"bench/adapter-{i:03d}/1", revision=f"{i:040x}", status="ready",
                           base_model="bench-base", examples=examples)

    base = [version(i, g) for i, g in enumerate(groups)]
    extra = version(100, new_texts)
    all_texts = [t for g in groups for t in g]
    settings = RouterSettings(cache_size=0, target_precision=TARGET_PRECISION)
    svc = RouterService(settings, encoder)

    async def run() -> dict:
        encoder.encode_uncached(all_texts[:64])
        t0 = time.perf_counter()
        encoder.encode_uncached(all_texts)
        encode_all = time.perf_counter() - t0
        t0 = time.perf_counter()
        await svc.sync(versions=base)
        full = time.perf_counter() - t0
        t0 = time.perf_counter()
        encoder.encode_uncached(new_texts)
        encode_new = time.perf_counter() - t0
        t0 = time.perf_counter()
        await svc.sync(versions=base + [extra])
        incremental = time.perf_counter() - t0
        router = svc.routers["bench-base"]
        t0 = time.perf_counter()
        await svc.settled()
        refine = time.perf_counter() - t0
        exact = svc.routers["bench-base"]
        await svc.close()
        return {"adapters": len(base), "examples": len(all_texts), "new_examples": len(new_texts),
                "encode_all_s": encode_all, "full_retrain_s": full,
                "full_retrain_ratio": full / encode_all,
                "encode_new_s": encode_new, "incremental_retrain_s": incremental,
                "incremental_ratio": incremental / encode_new,
                "incremental_encoded": router.encoded,
                "incremental_version": router.version,
                "incremental_fit_iterations": router.stats.get("iterations"),
                "exact_refit_after_s": refine, "exact_version": exact.version}

    return asyncio.run(run())


# --- the peer ------------------------------------------------------------------------------------

def peer_python() -> Path:
    """The .bench-venv interpreter, created with semantic-router on first use."""
    venv = ROOT / ".bench-venv"
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                       check=True)
    purelib = sysconfig.get_paths()["purelib"]
    site_dir = Path(subprocess.run([str(py), "-c", "import sysconfig;print(sysconfig.get_paths()"
                                    "['purelib'])"], check=True, capture_output=True,
                                   text=True).stdout.strip())
    (site_dir / "zz_quiver_main_venv.pth").write_text(
        f"import site; site.addsitedir({purelib!r})\n")
    probe = subprocess.run([str(py), "-c", "import semantic_router"], capture_output=True)
    if probe.returncode != 0:
        subprocess.run([str(py), "-m", "pip", "install", "-q", "semantic-router==1.1.1"],
                       check=True)
    return py


def run_peer(spec: dict, quick: bool) -> dict:
    py = peer_python()
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.json"
        np.save(Path(tmp) / "train.npy", spec.pop("emb_tr"))
        np.save(Path(tmp) / "test.npy", spec.pop("emb_te"))
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run([str(py), __file__, "--peer-worker", tmp],
                              capture_output=True, text=True, env={**os.environ,
                                                                   "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0:
            raise RuntimeError(f"semantic-router run failed:\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def peer_worker(folder: str) -> None:
    """Runs inside .bench-venv: semantic-router on the same data, same encoder."""
    import logging

    logging.disable(logging.WARNING)
    from semantic_router import IndexedRouter, Route
    from semantic_router.encoders import DenseEncoder, HuggingFaceEncoder

    spec = json.loads((Path(folder) / "spec.json").read_text())
    emb_tr = np.load(Path(folder) / "train.npy")
    emb_te = np.load(Path(folder) / "test.npy")
    x_tr, y_tr, x_te, y_te = spec["x_tr"], spec["y_tr"], spec["x_te"], spec["y_te"]
    hf = HuggingFaceEncoder(name=spec["model_path"], device="cpu")
    known = {t: e for t, e in zip(x_tr, emb_tr)}
    known.update({t: e for t, e in zip(x_te, emb_te)})
    sample = x_te[:32]
    diff = float(np.abs(np.array(hf(sample)) - np.stack([known[t] for t in sample])).max())

    class Precomputed(DenseEncoder):
        name: str = spec["model_path"]

        def __call__(self, docs):
            missing = [d for d in docs if d not in known]
            if missing:
                for d, e in zip(missing, hf(missing)):
                    known[d] = np.asarray(e, dtype=np.float32)
            return [known[d].tolist() for d in docs]

    enc = Precomputed()

    def routes(idx):
        by: dict[str, list[str]] = {}
        for i in idx:
            by.setdefault(y_tr[i], []).append(x_tr[i])
        return [Route(name=n, utterances=u) for n, u in sorted(by.items())]

    def top1(router, queries):
        return [router(q, threshold=0.0).name for q in queries]

    out: dict = {"encoder_max_abs_diff": diff}
    everything = list(range(len(x_tr)))
    r_all = IndexedRouter(encoder=enc, routes=routes(everything))
    out["accuracy_all"] = float(np.mean([p == t for p, t in zip(top1(r_all, x_te), y_te)]))
    r_few = IndexedRouter(encoder=enc, routes=routes(spec["few_idx"]))
    out["accuracy_10"] = float(np.mean([p == t for p, t in zip(top1(r_few, x_te), y_te)]))

    # Left-out intents: default threshold, then a calibrated threshold fitted on 20 % held out.
    left_out = set(spec["left_out"])
    inscope = np.array([t not in left_out for t in y_te])
    keep = spec["keep"]
    r_oos = IndexedRouter(encoder=enc, routes=routes(keep))
    picks = [r_oos(q) for q in x_te]
    names = np.array([p.name for p in picks], dtype=object)
    out["oos_recall_default"] = float(np.mean([n is None for n in names[~inscope]]))
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(keep))
    held = [keep[i] for i in perm[: len(keep) // 5]]
    rest = [keep[i] for i in perm[len(keep) // 5:]]
    r_fit = IndexedRouter(encoder=enc, routes=routes(rest))
    r_fit.fit([x_tr[i] for i in held], [y_tr[i] for i in held])
    conf = np.array([r_fit(x_tr[i], threshold=0.0).confidence for i in held])
    right = np.array([r_fit(x_tr[i], threshold=0.0).name == y_tr[i] for i in held])
    order = np.argsort(-conf)
    prec = np.cumsum(right[order]) / np.arange(1, len(order) + 1)
    ok = np.where(prec >= spec["target_precision"])[0]
    threshold = float(conf[order][ok[-1]]) if len(ok) else float(conf.max())
    r_cal = IndexedRouter(encoder=enc, routes=routes(keep), calibrator=r_fit.calibrator,
                          confidence_threshold=threshold)
    picks = [r_cal(q) for q in x_te]
    names = np.array([p.name for p in picks], dtype=object)
    truth = np.array(y_te, dtype=object)
    out.update(oos_threshold=threshold,
               oos_inscope_accuracy=float((names == truth)[inscope].mean()),
               oos_recall=float(np.mean([n is None for n in names[~inscope]])))
    # The most favourable threshold for the peer, chosen on the test set itself: the highest
    # one whose in-scope accuracy still reaches Quiver's; how much does it refuse there?
    raw = [r_cal(q, threshold=0.0) for q in x_te]
    conf = np.array([p.confidence for p in raw])
    right = np.array([p.name for p in raw], dtype=object) == truth
    best = None
    for th in np.unique(conf):
        acc = float((right & (conf >= th))[inscope].mean())
        if acc >= spec["match_inscope_accuracy"]:
            best = (float(th), acc, float((conf < th)[~inscope].mean()))
    if best is not None:
        out.update(oracle_threshold=best[0], oracle_inscope_accuracy=best[1],
                   oracle_oos_recall=best[2])

    # Latency with its own encoder, all training utterances indexed.
    r_lat = IndexedRouter(encoder=hf, routes=[])
    r_lat.index = r_all.index
    r_lat.refresh()
    lat = []
    prompts = spec["latency_prompts"]
    for p in prompts[:5]:
        r_lat(p)
    for p in prompts:
        t0 = time.perf_counter()
        r_lat(p)
        lat.append((time.perf_counter() - t0) * 1000)
    out.update(p50_ms=pct(lat, 50), p99_ms=pct(lat, 99))
    print(json.dumps(out))


# --- main ----------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer test and latency prompts")
    ap.add_argument("--json", action="store_true", help="one JSON object on the last line")
    ap.add_argument("--data", type=Path, default=ROOT / ".." / "shared" / "data" / "banking77")
    ap.add_argument("--no-peer", action="store_true", help="skip semantic-router")
    ap.add_argument("--peer-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer_worker:
        peer_worker(args.peer_worker)
        return

    from quiver.routing.encoder import Encoder

    rng = np.random.default_rng(SEED)
    x_tr, y_tr = load_split(args.data, "train")
    x_te, y_te = load_split(args.data, "test")
    if args.quick:
        pick = np.sort(rng.choice(len(x_te), min(800, len(x_te)), replace=False))
        x_te, y_te = [x_te[i] for i in pick], [y_te[i] for i in pick]
    encoder = Encoder(cache_size=0)
    stage("encoding train and test")
    t0 = time.perf_counter()
    emb_tr = encoder.encode_uncached(x_tr)
    emb_te = encoder.encode_uncached(x_te)
    encode_s = time.perf_counter() - t0
    stage("fitting: all data, 10 per intent, 10 intents left out")
    q = quality(emb_tr, y_tr, emb_te, y_te, args.quick)
    full_clf = q.pop("_full")

    tok = encoder.model.tokenizer
    short = [t for t in x_te if len(tok(t)["input_ids"]) <= 64]
    lat_prompts = short[: 60 if args.quick else 300]
    stage("latency and throughput")
    speed = latency_and_throughput(full_clf, encoder, lat_prompts, 32)
    new_texts = [t for t, y in zip(x_te, y_te)][:50]
    stage("retrain costs")
    retrain = retrain_costs(encoder, x_tr, y_tr, new_texts)

    result: dict = {"benchmark": "router", "quick": args.quick, "train": len(x_tr),
                    "test": len(x_te), "target_precision": TARGET_PRECISION,
                    "encode_train_test_s": encode_s,
                    "quiver": {k: v for k, v in q.items() if not k.startswith("_")},
                    "speed": speed, "retrain": retrain}
    result["quiver"]["router_p50_over_encoder_p50"] = speed["p50_ms"] / speed["encoder_p50_ms"]
    result["quiver"]["concurrent_over_sequential"] = speed["concurrent_qps"] / speed["sequential_qps"]
    if not args.no_peer:
        spec = {"x_tr": x_tr, "y_tr": y_tr, "x_te": x_te, "y_te": y_te,
                "model_path": str(encoder.model_path), "few_idx": q["_few_idx"],
                "keep": q["_keep"], "left_out": q["oos_left_out"],
                "target_precision": TARGET_PRECISION, "latency_prompts": lat_prompts,
                "match_inscope_accuracy": q["oos_inscope_accuracy"],
                "emb_tr": emb_tr, "emb_te": emb_te}
        stage("semantic-router")
        peer = run_peer(spec, args.quick)
        result["semantic_router"] = peer
        result["ratios"] = {
            "accuracy_all_minus_peer": q["accuracy_all"] - peer["accuracy_all"],
            "accuracy_10_minus_peer": q["accuracy_10"] - peer["accuracy_10"],
            "oos_recall_minus_peer": q["oos_recall"] - peer["oos_recall"],
            "p50_over_peer_p50": speed["p50_ms"] / peer["p50_ms"]}

    if not args.json:
        qv = result["quiver"]
        print(f"Banking77 ({len(x_tr)} train / {len(x_te)} test), all-MiniLM-L6-v2, "
              f"target precision {TARGET_PRECISION}")
        print(f"quiver: accuracy all {qv['accuracy_all']:.4f}, 10/intent {qv['accuracy_10']:.4f};"
              f" 10 intents left out: refused {qv['oos_recall']:.4f} at in-scope accuracy "
              f"{qv['oos_inscope_accuracy']:.4f} (top-1 {qv['oos_closed_accuracy']:.4f})")
        if "semantic_router" in result:
            pr = result["semantic_router"]
            print(f"semantic-router: accuracy all {pr['accuracy_all']:.4f}, 10/intent "
                  f"{pr['accuracy_10']:.4f}; refused {pr['oos_recall_default']:.4f} (default) / "
                  f"{pr['oos_recall']:.4f} at in-scope {pr['oos_inscope_accuracy']:.4f} "
                  f"(fitted); p50 {pr['p50_ms']:.2f} ms")
        print(f"latency p50: router {speed['p50_ms']:.2f} ms, encoder "
              f"{speed['encoder_p50_ms']:.2f} ms (x{qv['router_p50_over_encoder_p50']:.2f}), "
              f"classifier {speed['classifier_p50_ms']:.3f} ms")
        print(f"throughput: {speed['sequential_qps']:.1f}/s sequential, "
              f"{speed['concurrent_qps']:.1f}/s with 32 callers "
              f"(x{qv['concurrent_over_sequential']:.2f})")
        print(f"retrain: full {retrain['full_retrain_s']:.2f} s vs encode all "
              f"{retrain['encode_all_s']:.2f} s (x{retrain['full_retrain_ratio']:.2f}); one new "
              f"version {retrain['incremental_retrain_s']:.2f} s vs encode new "
              f"{retrain['encode_new_s']:.2f} s (x{retrain['incremental_ratio']:.2f})")
    print(json.dumps(result, default=float))


if __name__ == "__main__":
    main()
