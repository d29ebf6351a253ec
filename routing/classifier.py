"""The routing classifier: a linear head with calibrated probabilities and an in-scope score.

Model, for a normalised embedding ``x`` (d,) and classes ``c = 1..C``:

    s_c(x)     = mean of the k largest cosine similarities between x and the training
                 examples of class c                           (nearest-neighbour evidence)
    p(c | x)   = softmax((x @ W + b) / T + γ · s(x))         calibrated by the temperature T
    confidence = max_c p(c | x) · max(s_ĉ(x), 0)             ĉ: the most probable class

``W, b`` are multinomial logistic regression with an L2 penalty of ``max(l2, 0.002 / n)`` per
example (larger for small sets, which are separable; the problem stays strictly convex:
one optimum, so a warm-started refit lands where a fresh fit does). ``T`` and the abstain
threshold on ``confidence`` are fitted on a stratified held-out part of the training data (plus
any explicit out-of-scope examples): the threshold is the lowest one at which the held-out
decisions reach the target precision, an out-of-scope example accepted counting as an error.
Prediction is numpy only: one (d × C) product and one (d × n) product per prompt.
The neighbour term adds about half a point of accuracy on Banking77 (more with few examples).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["ClassifierConfig", "Classifier", "Prediction", "fit_classifier", "extend_classifier",
           "fit_threshold"]


@dataclass(frozen=True)
class ClassifierConfig:
    l2: float = 3e-6               # penalty on W, per example
    knn_k: int = 3
    knn_weight: float = 10.0       # weight of the neighbour similarity in the class scores
    holdout: float = 0.2           # fraction of each class held out to fit T and the threshold
    target_precision: float = 0.95
    max_iter: int = 200
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Prediction:
    """Per prompt: classes by descending probability, their probabilities, the confidence."""

    order: np.ndarray              # (m, C) int
    probs: np.ndarray              # (m, C) float, in ``order``
    confidence: np.ndarray         # (m,)


@dataclass
class Classifier:
    labels: list[str]
    W: np.ndarray                  # (d, C) float32
    b: np.ndarray                  # (C,) float32
    temperature: float
    threshold: float | None        # fitted; None when there was too little data to fit one
    examples: np.ndarray           # (n, d) float32, grouped by class
    offsets: np.ndarray            # (C + 1,) int: class c's examples are examples[o[c]:o[c+1]]
    knn_k: int = 3
    knn_weight: float = 10.0
    stats: dict[str, Any] = field(default_factory=dict)
    _slots: np.ndarray | None = field(default=None, repr=False, compare=False)
    _k: np.ndarray | None = field(default=None, repr=False, compare=False)

    # --- prediction --------------------------------------------------------------------------------

    def predict(self, emb: np.ndarray) -> Prediction:
        """Score normalised embeddings ``emb`` (m, d)."""
        emb = np.atleast_2d(np.asarray(emb, dtype=np.float32))
        if len(emb) > 256:
            parts = [self.predict(emb[i:i + 256]) for i in range(0, len(emb), 256)]
            return Prediction(order=np.concatenate([p.order for p in parts]),
                              probs=np.concatenate([p.probs for p in parts]),
                              confidence=np.concatenate([p.confidence for p in parts]))
        support = self.support(emb)                                   # (m, C)
        if len(self.labels) == 1:
            probs = np.ones((len(emb), 1), dtype=np.float32)
        else:
            logits = (emb @ self.W + self.b) / self.temperature + self.knn_weight * support
            logits -= logits.max(axis=1, keepdims=True)
            probs = np.exp(logits)
            probs /= probs.sum(axis=1, keepdims=True)
        order = np.argsort(-probs, axis=1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, axis=1)
        top_support = np.take_along_axis(support, order[:, :1], axis=1)[:, 0]
        confidence = sorted_probs[:, 0] * np.maximum(top_support, 0.0)
        return Prediction(order=order, probs=sorted_probs, confidence=confidence)

    def support(self, emb: np.ndarray) -> np.ndarray:
        """(m, C): mean of the ``knn_k`` largest cosine similarities to each class's examples."""
        if self._slots is None:
            sizes = np.diff(self.offsets)
            width = int(sizes.max())
            slots = np.full((len(sizes), width), len(self.examples), dtype=np.int64)
            for c, (lo, n) in enumerate(zip(self.offsets[:-1], sizes)):
                slots[c, :n] = np.arange(lo, lo + n)
            self._slots = slots
            self._k = np.minimum(sizes, self.knn_k).astype(np.float32)
        sims = np.concatenate([emb @ self.examples.T,
                               np.full((len(emb), 1), -np.inf, np.float32)], axis=1)
        grid = sims[:, self._slots]                                   # (m, C, width)
        k = min(self.knn_k, grid.shape[2])
        top = -np.partition(-grid, k - 1, axis=2)[:, :, :k]
        top = np.where(np.isfinite(top), top, 0.0)
        return (top.sum(axis=2) / self._k).astype(np.float32)

    # --- artifacts ---------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """A self-contained ``.npz`` artifact (no pickles)."""
        meta = {"labels": self.labels, "temperature": self.temperature,
                "threshold": self.threshold, "knn_k": self.knn_k,
                "knn_weight": self.knn_weight, "stats": self.stats}
        buf = io.BytesIO()
        np.savez(buf, W=self.W, b=self.b, examples=self.examples, offsets=self.offsets,
                 meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Classifier:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            return cls(labels=list(meta["labels"]), W=z["W"], b=z["b"],
                       temperature=float(meta["temperature"]), threshold=meta["threshold"],
                       examples=z["examples"], offsets=z["offsets"], knn_k=int(meta["knn_k"]),
                       knn_weight=float(meta["knn_weight"]), stats=meta.get("stats") or {})


# --- fitting -------------------------------------------------------------------------------------

def _fit_linear(x: np.ndarray, y: np.ndarray, n_cls: int, l2: float, max_iter: int,
                warm: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Multinomial logistic regression by full-batch L-BFGS; returns (W, b, iterations).

    The solver works on centred inputs (better conditioned, same optimum for ``W``); the bias
    is mapped back so that the returned weights apply to raw inputs.
    """
    import torch

    mean = x.mean(axis=0).astype(np.float32)
    xt = torch.from_numpy(np.ascontiguousarray(x - mean, dtype=np.float32))
    yt = torch.from_numpy(y.astype(np.int64))
    if warm is None:
        w = torch.zeros(x.shape[1], n_cls)
        b = torch.zeros(n_cls)
    else:
        w = torch.from_numpy(np.array(warm[0], dtype=np.float32, copy=True))
        b = torch.from_numpy(np.asarray(warm[1] + mean @ warm[0], dtype=np.float32).copy())
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6,
                            tolerance_change=1e-10)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, yt) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    iters = int(opt.state[opt._params[0]].get("n_iter", 0))
    w_np = w.detach().numpy().copy()
    return w_np, (b.detach().numpy() - mean @ w_np).astype(np.float32), iters


def _fit_new_columns(x: np.ndarray, y: np.ndarray, fixed_logits: np.ndarray, n_new: int,
                     l2: float, max_iter: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Fit only the columns of new classes, the other classes' logits held fixed.

    Classes ``0..K-1`` are the fixed ones (``fixed_logits`` is n × K), ``K..K+n_new-1`` the new.
    """
    import torch

    mean = x.mean(axis=0).astype(np.float32)
    xt = torch.from_numpy(np.ascontiguousarray(x - mean, dtype=np.float32))
    yt = torch.from_numpy(y.astype(np.int64))
    lt = torch.from_numpy(np.ascontiguousarray(fixed_logits, dtype=np.float32))
    w = torch.zeros(x.shape[1], n_new, requires_grad=True)
    b = torch.full((n_new,), float(fixed_logits.mean()), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6,
                            tolerance_change=1e-10)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = torch.cat([lt, xt @ w + b], dim=1)
        loss = torch.nn.functional.cross_entropy(logits, yt) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    iters = int(opt.state[opt._params[0]].get("n_iter", 0))
    w_np = w.detach().numpy().copy()
    return w_np, (b.detach().numpy() - mean @ w_np).astype(np.float32), iters


def _fit_temperature(logits: np.ndarray, bonus: np.ndarray, y: np.ndarray) -> float:
    """The T minimising the held-out NLL of softmax(logits / T + bonus) (log-spaced grid)."""
    best_t, best_nll = 1.0, math.inf
    for t in np.exp(np.linspace(np.log(0.05), np.log(20.0), 61)):
        z = logits / t + bonus
        z = z - z.max(axis=1, keepdims=True)
        nll = float((np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]).mean())
        if nll < best_nll:
            best_t, best_nll = float(t), nll
    return best_t


def fit_threshold(conf_in: np.ndarray, correct: np.ndarray, conf_oos: np.ndarray | None,
                  target_precision: float) -> float:
    """The lowest confidence threshold whose accepted decisions reach ``target_precision``.

    ``conf_in``/``correct``: in-scope examples' confidences and whether their top class was
    right; ``conf_oos``: out-of-scope examples' confidences (any accepted one is an error).
    When no threshold reaches the target, the one with the best precision is returned.
    """
    conf_oos = np.zeros(0) if conf_oos is None else np.asarray(conf_oos)
    conf = np.concatenate([conf_in, conf_oos])
    good = np.concatenate([correct.astype(bool), np.zeros(len(conf_oos), bool)])
    order = np.argsort(-conf, kind="stable")
    conf, good = conf[order], good[order]
    precision = np.cumsum(good) / np.arange(1, len(conf) + 1)
    # A threshold can only sit between distinct values: use the last index of each run.
    last = np.r_[conf[1:] != conf[:-1], True]
    ok = np.where(last & (precision >= target_precision))[0]
    if len(ok):
        return float(conf[ok[-1]])
    cand = np.where(last)[0]
    return float(conf[cand[np.argmax(precision[cand])]])


def _holdout_split(y: np.ndarray, n_cls: int, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in range(n_cls):
        idx = np.where(y == c)[0]
        idx = idx[rng.permutation(len(idx))]
        k = min(len(idx) - 1, max(1, int(round(frac * len(idx))))) if len(idx) >= 2 else 0
        held.extend(idx[:k])
        train.extend(idx[k:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(held, dtype=np.int64))


def _group(x: np.ndarray, y: np.ndarray, n_cls: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(y, kind="stable")
    counts = np.bincount(y, minlength=n_cls)
    return np.ascontiguousarray(x[order]), np.r_[0, np.cumsum(counts)].astype(np.int64)


def fit_classifier(emb: np.ndarray, labels: list[str], *, config: ClassifierConfig = ClassifierConfig(),
                   oos: np.ndarray | None = None, warm: Classifier | None = None) -> Classifier:
    """Fit on normalised embeddings ``emb`` (n, d) with one label per row.

    ``oos`` are embeddings of explicit out-of-scope examples (used only to fit the threshold).
    ``warm`` is a previous classifier whose weights start the solver for the labels it shares.
    """
    emb = np.asarray(emb, dtype=np.float32)
    if len(emb) != len(labels) or len(emb) == 0:
        raise ValueError("need one label per embedding, and at least one example")
    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[l] for l in labels], dtype=np.int64)
    n_cls, dim = len(classes), emb.shape[1]
    stats: dict[str, Any] = {"examples": int(len(emb)), "classes": n_cls}
    if n_cls == 1:
        examples, offsets = _group(emb, y, 1)
        clf = Classifier(classes, np.zeros((dim, 1), np.float32), np.zeros(1, np.float32), 1.0,
                         None, examples, offsets, knn_k=config.knn_k,
                         knn_weight=config.knn_weight, stats=stats)
        held_conf = clf.predict(emb).confidence if len(emb) else np.zeros(0)
        if oos is not None and len(oos):
            clf.threshold = fit_threshold(held_conf, np.ones(len(held_conf), bool),
                                          clf.predict(oos).confidence, config.target_precision)
        return clf

    start = None
    if warm is not None:
        w0 = np.zeros((dim, n_cls), np.float32)
        b0 = np.zeros(n_cls, np.float32)
        for c, i in index.items():
            if c in warm.labels and warm.W.shape[0] == dim:
                j = warm.labels.index(c)
                w0[:, i], b0[i] = warm.W[:, j], warm.b[j]
        start = (w0, b0 - b0.mean())
    l2 = max(config.l2, 0.002 / len(emb))      # small sets are separable: keep W bounded
    w, b, iters = _fit_linear(emb, y, n_cls, l2, config.max_iter, start)
    stats.update(iterations=iters, fit="full")

    temperature, threshold = 1.0, None
    train_idx, held_idx = _holdout_split(y, n_cls, config.holdout, config.seed)
    if config.holdout > 0 and len(held_idx) >= 2 and len(np.unique(y[train_idx])) == n_cls:
        hw, hb, _ = _fit_linear(emb[train_idx], y[train_idx], n_cls, l2, config.max_iter,
                                (w, b))
        ex, off = _group(emb[train_idx], y[train_idx], n_cls)
        probe = Classifier(classes, hw, hb, 1.0, None, ex, off, knn_k=config.knn_k,
                           knn_weight=config.knn_weight)
        logits = emb[held_idx] @ hw + hb
        temperature = _fit_temperature(logits, config.knn_weight * probe.support(emb[held_idx]),
                                       y[held_idx])
        probe.temperature = temperature
        pred = probe.predict(emb[held_idx])
        correct = pred.order[:, 0] == y[held_idx]
        oos_conf = probe.predict(oos).confidence if oos is not None and len(oos) else None
        threshold = fit_threshold(pred.confidence, correct, oos_conf, config.target_precision)
        stats.update(heldout=int(len(held_idx)), heldout_accuracy=float(correct.mean()))
    examples, offsets = _group(emb, y, n_cls)
    return Classifier(classes, w.astype(np.float32), b.astype(np.float32), temperature,
                      threshold, examples, offsets, knn_k=config.knn_k,
                      knn_weight=config.knn_weight, stats=stats)


def extend_classifier(previous: Classifier, emb: np.ndarray, labels: list[str], *,
                      config: ClassifierConfig = ClassifierConfig()) -> Classifier | None:
    """A fast update of ``previous`` for a training set that adds (or drops) a few classes.

    The columns of classes ``previous`` already knows are kept as they are; only the new
    classes' columns are fitted, against all examples, with the kept logits held fixed.
    Temperature and threshold carry over. The result is close to, not identical with, a full
    fit: callers replace it with a full fit afterwards. Returns None when the classes that
    stay are not all kept unchanged or nothing is new (a full fit is needed then).
    """
    emb = np.asarray(emb, dtype=np.float32)
    classes = sorted(set(labels))
    old = [c for c in classes if c in previous.labels]
    new = [c for c in classes if c not in previous.labels]
    if not new or len(old) < 2 or previous.W.shape[0] != emb.shape[1]:
        return None
    order = old + new
    index = {c: i for i, c in enumerate(order)}
    y = np.array([index[l] for l in labels], dtype=np.int64)
    cols = [previous.labels.index(c) for c in old]
    w_old, b_old = previous.W[:, cols], previous.b[cols]
    w_new, b_new, iters = _fit_new_columns(emb, y, emb @ w_old + b_old, len(new),
                                           max(config.l2, 0.002 / len(emb)), config.max_iter)
    w_all = np.concatenate([w_old, w_new], axis=1)
    b_all = np.concatenate([b_old, b_new])
    perm = [order.index(c) for c in classes]                 # back to sorted label order
    y_sorted = np.array([classes.index(l) for l in labels], dtype=np.int64)
    examples, offsets = _group(emb, y_sorted, len(classes))
    stats = {"examples": int(len(emb)), "classes": len(classes), "iterations": iters,
             "fit": "incremental", "new_classes": len(new)}
    return Classifier(classes, np.ascontiguousarray(w_all[:, perm]), b_all[perm].copy(),
                      previous.temperature, previous.threshold, examples, offsets,
                      knn_k=config.knn_k, knn_weight=config.knn_weight, stats=stats)
