"""Offline evaluation of a router on labelled data (``quiver route eval``, bench/router.py).

Training rows labelled ``oos`` only tune the abstain threshold. Test rows labelled ``oos``, or
with a label the training data never had, are out of scope: the router should refuse them.

Reported: in-scope ``accuracy`` (right adapter and accepted, over all in-scope queries),
``closed_accuracy`` (top-1 ignoring the threshold), ``oos_recall`` (out-of-scope queries
refused), ``coverage`` (in-scope queries accepted), per-class precision and recall, and
single-prompt latency percentiles of the router next to the bare encoder on the same prompts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from quiver.routing.classifier import Classifier, ClassifierConfig, fit_classifier, fit_threshold
from quiver.routing.data import LabelledExample
from quiver.routing.encoder import Encoder

__all__ = ["train_classifier", "evaluate", "fit_threshold_on", "latency"]


def train_classifier(train: Sequence[LabelledExample], encoder: Encoder,
                     config: ClassifierConfig = ClassifierConfig()) -> Classifier:
    inscope = [e for e in train if not e.out_of_scope]
    oos = [e.text for e in train if e.out_of_scope]
    if not inscope:
        raise ValueError("the training data has no in-scope examples")
    emb = encoder.encode_uncached([e.text for e in inscope])
    oos_emb = encoder.encode_uncached(oos) if oos else None
    return fit_classifier(emb, [e.label for e in inscope], config=config, oos=oos_emb)


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if len(values) else float("nan")


def latency(clf: Classifier, encoder: Encoder, texts: Sequence[str]) -> dict[str, float]:
    """Per-prompt latency (ms) of the bare encoder and of encoder + classifier, interleaved."""
    enc_ms, route_ms, clf_ms = [], [], []
    encoder.encode_uncached([texts[0]])  # warm-up
    for text in texts:
        t0 = time.perf_counter()
        encoder.encode_uncached([text])
        enc_ms.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        emb = encoder.encode_uncached([text])
        t1 = time.perf_counter()
        clf.predict(emb)
        t2 = time.perf_counter()
        route_ms.append((t2 - t0) * 1000)
        clf_ms.append((t2 - t1) * 1000)
    return {"p50_ms": _pct(route_ms, 50), "p99_ms": _pct(route_ms, 99),
            "encoder_p50_ms": _pct(enc_ms, 50), "encoder_p99_ms": _pct(enc_ms, 99),
            "classifier_p50_ms": _pct(clf_ms, 50), "classifier_p99_ms": _pct(clf_ms, 99)}


def evaluate(clf: Classifier, test: Sequence[LabelledExample], encoder: Encoder, *,
             threshold: float | None = None, latency_samples: int = 200,
             test_emb: np.ndarray | None = None) -> dict:
    """Score ``clf`` on ``test``; ``threshold`` overrides the classifier's fitted one."""
    th = threshold if threshold is not None else (clf.threshold or 0.0)
    known = set(clf.labels)
    inscope = np.array([not e.out_of_scope and e.label in known for e in test])
    emb = test_emb if test_emb is not None else encoder.encode_uncached([e.text for e in test])
    pred = clf.predict(emb)
    top = np.array(clf.labels)[pred.order[:, 0]]
    truth = np.array([e.label for e in test])
    accepted = pred.confidence >= th
    right = top == truth
    out: dict = {
        "threshold": th, "test_examples": len(test), "in_scope": int(inscope.sum()),
        "out_of_scope": int((~inscope).sum()),
        "accuracy": float((right & accepted)[inscope].mean()) if inscope.any() else None,
        "closed_accuracy": float(right[inscope].mean()) if inscope.any() else None,
        "coverage": float(accepted[inscope].mean()) if inscope.any() else None,
        "oos_recall": float((~accepted)[~inscope].mean()) if (~inscope).any() else None,
    }
    per_class = {}
    for label in clf.labels:
        routed = accepted & (top == label)
        actual = inscope & (truth == label)
        per_class[label] = {
            "precision": float((routed & right).sum() / routed.sum()) if routed.any() else None,
            "recall": float((routed & actual).sum() / actual.sum()) if actual.any() else None,
            "support": int(actual.sum())}
    out["per_class"] = per_class
    if latency_samples > 0:
        idx = np.linspace(0, len(test) - 1, min(latency_samples, len(test))).astype(int)
        out.update(latency(clf, encoder, [test[i].text for i in idx]))
    return out


def fit_threshold_on(clf: Classifier, heldout: Sequence[LabelledExample], encoder: Encoder,
                     target_precision: float) -> dict:
    """The threshold reaching ``target_precision`` on labelled held-out data, and its effect."""
    known = set(clf.labels)
    ins = [e for e in heldout if not e.out_of_scope and e.label in known]
    oos = [e for e in heldout if e.out_of_scope or e.label not in known]
    if not ins:
        raise ValueError("the held-out data has no in-scope examples")
    p_in = clf.predict(encoder.encode_uncached([e.text for e in ins]))
    correct = np.array(clf.labels)[p_in.order[:, 0]] == np.array([e.label for e in ins])
    c_oos = clf.predict(encoder.encode_uncached([e.text for e in oos])).confidence if oos else None
    th = fit_threshold(p_in.confidence, correct, c_oos, target_precision)
    acc = p_in.confidence >= th
    accepted_oos = int((c_oos >= th).sum()) if c_oos is not None else 0
    return {"threshold": th, "target_precision": target_precision,
            "precision": float((acc & correct).sum() / max(1, acc.sum() + accepted_oos)),
            "coverage": float(acc.mean()),
            "oos_recall": float((c_oos < th).mean()) if c_oos is not None else None}
