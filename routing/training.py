"""From the registry's state to trained routers, one per base model.

Candidates: each ready adapter version's repo contributes one version, the one carrying the
candidate alias (``prod`` by default) or else the highest ready version, optionally narrowed to
namespaces or repos. A candidate's training texts are its task description and its examples,
plus any extra labelled examples naming its repo; extra examples labelled ``oos`` only tune the
abstain threshold. Repos without any text cannot be routed to and are listed as skipped.

A router's version is a hash of everything it is trained from (encoder, configuration,
candidates and their texts), so the same registry state always yields the same version.
Embeddings of training texts are kept in an :class:`ExampleStore` between retrains, so a retrain
encodes only texts it has not seen. When a few adapters are added to (or dropped from) a router,
a fast update fits only the new adapters' columns (version ``<hash>+inc``, ``exact`` False);
the service then replaces it with the full fit, whose version is the plain hash.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from quiver.routing.classifier import (
    Classifier, ClassifierConfig, extend_classifier, fit_classifier,
)
from quiver.routing.data import LabelledExample
from quiver.routing.encoder import Encoder
from quiver.wire import VersionInfo

__all__ = ["Candidate", "TrainingSet", "Router", "ExampleStore", "select_candidates",
           "build_training_sets", "train_router"]


@dataclass(frozen=True)
class Candidate:
    ref: str                       # canonical "repo/N"
    repo: str
    version: int
    revision: str
    texts: tuple[str, ...]

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps([self.revision, list(self.texts)]).encode()).hexdigest()


@dataclass(frozen=True)
class TrainingSet:
    base_model: str
    candidates: tuple[Candidate, ...]
    skipped: tuple[str, ...] = ()         # refs without any text
    oos: tuple[str, ...] = ()

    def version(self, encoder_fingerprint: str, config: ClassifierConfig) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({"encoder": encoder_fingerprint, "config": config.as_dict(),
                             "base_model": self.base_model}, sort_keys=True).encode())
        for c in sorted(self.candidates, key=lambda c: c.ref):
            h.update(json.dumps([c.ref, c.revision, list(c.texts)]).encode())
        h.update(json.dumps(sorted(self.oos)).encode())
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class Router:
    """A trained router for one base model. Immutable: a retrain builds a new one."""

    base_model: str
    version: str
    classifier: Classifier | None          # None when no candidate has examples
    adapters: tuple[str, ...]              # refs, in the classifier's label order
    example_counts: dict[str, int]
    skipped: tuple[str, ...]
    trained_at: float
    train_seconds: float
    encoded: int = 0                       # texts newly encoded for this version
    stats: dict = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)   # per ref: revision and texts
    exact: bool = True                     # False for a fast incremental update

    @property
    def training_version(self) -> str:
        return self.version.split("+", 1)[0]

    def summary(self) -> dict:
        return {"base_model": self.base_model, "version": self.version,
                "adapters": list(self.adapters), "skipped": list(self.skipped),
                "example_counts": self.example_counts, "trained_at": self.trained_at,
                "train_seconds": round(self.train_seconds, 4),
                "threshold": self.classifier.threshold if self.classifier else None,
                "temperature": self.classifier.temperature if self.classifier else None,
                "encoded": self.encoded, "exact": self.exact}


def _clean_texts(texts: Iterable[str | None]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for t in texts:
        if isinstance(t, str) and t.strip():
            seen.setdefault(t.strip(), None)
    return tuple(seen)


def select_candidates(versions: Iterable[VersionInfo], *, alias: str = "prod",
                      namespaces: Sequence[str] = (), repos: Sequence[str] = ()) -> list[VersionInfo]:
    """One ready version per repo: the one carrying ``alias``, else the highest."""
    by_repo: dict[str, list[VersionInfo]] = {}
    for v in versions:
        if v.status != "ready":
            continue
        if repos and v.repo not in repos:
            continue
        if namespaces and (v.repo.split("/")[0] if "/" in v.repo else "") not in namespaces:
            continue
        by_repo.setdefault(v.repo, []).append(v)
    chosen = []
    for repo in sorted(by_repo):
        vs = by_repo[repo]
        aliased = [v for v in vs if alias in v.aliases]
        chosen.append(aliased[0] if aliased else max(vs, key=lambda v: v.version))
    return chosen


def build_training_sets(versions: Iterable[VersionInfo], *, alias: str = "prod",
                        namespaces: Sequence[str] = (), repos: Sequence[str] = (),
                        extra: Sequence[LabelledExample] = ()) -> dict[str, TrainingSet]:
    """Group the candidates by base model and gather their training texts."""
    extra_by_repo: dict[str, list[str]] = {}
    oos = _clean_texts(e.text for e in extra if e.out_of_scope)
    for e in extra:
        if not e.out_of_scope:
            extra_by_repo.setdefault(e.label, []).append(e.text)
    grouped: dict[str, tuple[list[Candidate], list[str]]] = {}
    for v in select_candidates(versions, alias=alias, namespaces=namespaces, repos=repos):
        texts = _clean_texts([v.task_description, *v.examples, *extra_by_repo.get(v.repo, ()),
                              *extra_by_repo.get(v.ref, ())])
        cands, skipped = grouped.setdefault(v.base_model, ([], []))
        if texts:
            cands.append(Candidate(v.ref, v.repo, v.version, v.revision, texts))
        else:
            skipped.append(v.ref)
    return {base: TrainingSet(base, tuple(c), tuple(s), oos)
            for base, (c, s) in sorted(grouped.items())}


class ExampleStore:
    """Embeddings of training texts, reused across retrains; pruned to what is still in use."""

    def __init__(self) -> None:
        self._vecs: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def embed(self, encoder: Encoder, texts: Sequence[str]) -> tuple[np.ndarray, int]:
        """Embeddings of ``texts`` and how many of them had to be encoded."""
        with self._lock:
            missing = [t for t in dict.fromkeys(texts) if t not in self._vecs]
        if missing:
            fresh = encoder.encode_uncached(missing)
            with self._lock:
                self._vecs.update(zip(missing, fresh))
        with self._lock:
            out = np.stack([self._vecs[t] for t in texts]) if texts else np.zeros((0, encoder.dim),
                                                                                  np.float32)
        return out, len(missing)

    def retain(self, texts: Iterable[str]) -> None:
        keep = set(texts)
        with self._lock:
            for t in [t for t in self._vecs if t not in keep]:
                del self._vecs[t]

    def __len__(self) -> int:
        return len(self._vecs)


def _can_extend(ts: TrainingSet, previous: Router | None) -> bool:
    """True when ``ts`` only adds or drops a few adapters relative to ``previous``."""
    if previous is None or previous.classifier is None or len(previous.adapters) < 2:
        return False
    now = {c.ref: c.digest for c in ts.candidates}
    shared = set(now) & set(previous.digests)
    if any(now[r] != previous.digests[r] for r in shared):
        return False
    changed = len(set(now) ^ set(previous.digests))
    return 0 < changed <= max(2, len(previous.digests) // 10) and len(shared) >= 2


def train_router(ts: TrainingSet, encoder: Encoder, store: ExampleStore, *,
                 config: ClassifierConfig = ClassifierConfig(),
                 previous: Router | None = None, fast: bool = False) -> Router:
    """Train the router of one base model (blocking; run it in a thread).

    With ``fast`` and a ``previous`` router that differs by a few adapters, only the new
    adapters' columns are fitted (an inexact ``+inc`` version); otherwise a full fit, warm
    started from ``previous``.
    """
    t0 = time.perf_counter()
    version = ts.version(encoder.fingerprint, config)
    texts: list[str] = []
    labels: list[str] = []
    for c in ts.candidates:
        texts.extend(c.texts)
        labels.extend([c.ref] * len(c.texts))
    emb, encoded = store.embed(encoder, texts + list(ts.oos))
    clf, exact = None, True
    if texts and fast and _can_extend(ts, previous):
        assert previous is not None and previous.classifier is not None
        clf = extend_classifier(previous.classifier, emb[:len(texts)], labels, config=config)
        exact = clf is None
    if texts and clf is None:
        warm = previous.classifier if previous is not None else None
        clf = fit_classifier(emb[:len(texts)], labels, config=config,
                             oos=emb[len(texts):] if ts.oos else None, warm=warm)
    counts = {c.ref: len(c.texts) for c in ts.candidates}
    return Router(base_model=ts.base_model, version=version if exact else f"{version}+inc",
                  classifier=clf, adapters=tuple(clf.labels) if clf else (),
                  example_counts=counts, skipped=ts.skipped, trained_at=time.time(),
                  train_seconds=time.perf_counter() - t0, encoded=encoded,
                  stats=dict(clf.stats) if clf else {},
                  digests={c.ref: c.digest for c in ts.candidates}, exact=exact)
