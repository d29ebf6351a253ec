"""The classifier on synthetic embeddings: calibration, abstention, warm starts, artifacts."""

from __future__ import annotations

import numpy as np
import pytest

from quiver.routing.classifier import (
    Classifier, ClassifierConfig, extend_classifier, fit_classifier, fit_threshold,
)


def _clusters(n_cls: int = 4, per: int = 30, dim: int = 32, spread: float = 0.25, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_cls, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.concatenate([c + spread * rng.normal(size=(per, dim)) / np.sqrt(dim) for c in centres])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = [f"repo-{i}/1" for i in range(n_cls) for _ in range(per)]
    return x.astype(np.float32), labels, centres, rng


def test_predicts_clusters_with_calibrated_probabilities():
    x, labels, centres, rng = _clusters()
    clf = fit_classifier(x, labels)
    pred = clf.predict(centres)
    assert [clf.labels[i] for i in pred.order[:, 0]] == [f"repo-{i}/1" for i in range(4)]
    np.testing.assert_allclose(pred.probs.sum(axis=1), 1.0, rtol=1e-5)
    assert np.all(np.diff(pred.probs, axis=1) <= 1e-7)          # sorted, best first
    assert clf.threshold is not None and 0.0 < clf.threshold < 1.0
    assert clf.temperature > 0 and clf.stats["heldout"] > 0
    assert np.all(pred.confidence >= clf.threshold)


def test_far_away_points_are_refused():
    x, labels, _, rng = _clusters()
    clf = fit_classifier(x, labels)
    far = rng.normal(size=(50, x.shape[1]))
    far /= np.linalg.norm(far, axis=1, keepdims=True)
    refused = clf.predict(far).confidence < clf.threshold
    assert refused.mean() > 0.9


def test_explicit_out_of_scope_examples_raise_the_threshold():
    x, labels, centres, rng = _clusters(spread=0.8)
    near = centres[0] + 0.9 * centres[1]
    oos = near + 0.2 * rng.normal(size=(40, x.shape[1])) / np.sqrt(x.shape[1])
    oos /= np.linalg.norm(oos, axis=1, keepdims=True)
    plain = fit_classifier(x, labels, config=ClassifierConfig(target_precision=0.9))
    tuned = fit_classifier(x, labels, config=ClassifierConfig(target_precision=0.9), oos=oos)
    assert tuned.threshold > plain.threshold
    assert (tuned.predict(oos).confidence < tuned.threshold).mean() > \
        (plain.predict(oos).confidence < plain.threshold).mean()


def test_fit_threshold_reaches_the_target_precision():
    conf = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    correct = np.array([True, True, False, True, True, False])
    th = fit_threshold(conf, correct, np.array([0.65]), target_precision=0.99)
    assert th == pytest.approx(0.8)                 # only 0.9 and 0.8 are accepted: 2/2
    th = fit_threshold(conf, correct, None, target_precision=0.75)
    assert th == pytest.approx(0.5)                 # 4 right of 5 accepted = 0.8 ≥ 0.75


def test_single_candidate_uses_similarity():
    x, labels, centres, rng = _clusters(n_cls=1)
    clf = fit_classifier(x, labels)
    assert clf.labels == ["repo-0/1"]
    near, far = clf.predict(centres).confidence[0], clf.predict(-centres).confidence[0]
    assert near > 0.8 and far == 0.0


def test_warm_start_lands_on_the_fresh_optimum():
    x, labels, _, _ = _clusters(n_cls=5)
    keep = [i for i, l in enumerate(labels) if l != "repo-4/1"]
    old = fit_classifier(x[keep], [labels[i] for i in keep])
    fresh = fit_classifier(x, labels)
    warm = fit_classifier(x, labels, warm=old)
    np.testing.assert_allclose(warm.W, fresh.W, atol=2e-2 * np.abs(fresh.W).max())
    probe = x[::7]
    np.testing.assert_allclose(warm.predict(probe).probs, fresh.predict(probe).probs, atol=2e-2)


def test_artifact_round_trip():
    x, labels, centres, _ = _clusters()
    clf = fit_classifier(x, labels)
    back = Classifier.from_bytes(clf.to_bytes())
    assert back.labels == clf.labels and back.threshold == clf.threshold
    np.testing.assert_array_equal(back.predict(centres).confidence, clf.predict(centres).confidence)


def test_rejects_mismatched_input():
    with pytest.raises(ValueError):
        fit_classifier(np.zeros((3, 4), np.float32), ["a", "b"])
    with pytest.raises(ValueError):
        fit_classifier(np.zeros((0, 4), np.float32), [])


def test_extend_fits_only_the_new_class_and_agrees_with_a_full_fit():
    x, labels, centres, _ = _clusters(n_cls=6)
    keep = [i for i, l in enumerate(labels) if l != "repo-5/1"]
    old = fit_classifier(x[keep], [labels[i] for i in keep])
    ext = extend_classifier(old, x, labels)
    full = fit_classifier(x, labels)
    assert ext is not None and ext.labels == full.labels and ext.stats["fit"] == "incremental"
    i_old = old.labels.index("repo-2/1")
    np.testing.assert_array_equal(ext.W[:, ext.labels.index("repo-2/1")], old.W[:, i_old])
    assert ext.threshold == old.threshold
    agree = (ext.predict(x).order[:, 0] == full.predict(x).order[:, 0]).mean()
    assert agree > 0.97
    assert ext.labels[ext.predict(centres[5:6]).order[0, 0]] == "repo-5/1"
    assert extend_classifier(old, x[keep], [labels[i] for i in keep]) is None   # nothing new
