"""Micro-batching: concurrent callers share encoder calls and each gets its own answer."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time

import numpy as np

from quiver.routing.batcher import MicroBatcher


def _digest_encode(calls: list[list[str]], delay: float = 0.01):
    """A deterministic text → vector function that records its batches."""
    lock = threading.Lock()

    def encode(texts):
        with lock:
            calls.append(list(texts))
        time.sleep(delay)
        return np.stack([np.frombuffer(hashlib.sha256(t.encode()).digest(), np.uint8)
                         .astype(np.float32) for t in texts])

    return encode


async def test_concurrent_callers_are_batched_and_never_mixed_up():
    calls: list[list[str]] = []
    encode = _digest_encode(calls)
    batcher = MicroBatcher(encode, max_batch=16)
    await batcher.start()
    try:
        texts = [f"prompt number {i}" for i in range(64)] + ["same"] * 8
        out = await asyncio.gather(*(batcher.embed(t) for t in texts))
        batches = list(calls)
        for t, v in zip(texts, out):
            np.testing.assert_array_equal(v, encode([t])[0])
        assert max(len(c) for c in batches) == 16
        assert len(batches) < len(texts) // 2
        assert all(c.count("same") <= 1 for c in batches)     # a batch encodes a text once
    finally:
        await batcher.close()


async def test_errors_reach_every_caller_of_the_batch_and_the_worker_survives():
    def encode(texts):
        if any("boom" in t for t in texts):
            raise RuntimeError("encoder failed")
        return np.ones((len(texts), 2), np.float32)

    batcher = MicroBatcher(encode, max_batch=8)
    await batcher.start()
    try:
        res = await asyncio.gather(batcher.embed("boom"), return_exceptions=True)
        assert isinstance(res[0], RuntimeError)
        assert (await batcher.embed("fine")).tolist() == [1.0, 1.0]
    finally:
        await batcher.close()


async def test_window_gathers_sequential_arrivals():
    calls: list[list[str]] = []
    batcher = MicroBatcher(_digest_encode(calls, delay=0.0), max_batch=8, window_ms=50)
    await batcher.start()
    try:
        async def late(i):
            await asyncio.sleep(0.005 * i)
            return await batcher.embed(f"t{i}")

        await asyncio.gather(*(late(i) for i in range(4)))
        assert len(calls[0]) > 1
    finally:
        await batcher.close()


async def test_real_encoder_answers_match_one_by_one(encoder):
    batcher = MicroBatcher(encoder.encode_uncached, max_batch=32)
    await batcher.start()
    try:
        texts = [f"How do I cook dish number {i}?" for i in range(24)] + \
                ["Solve x + 1 = 2", "Translate cat into French"]
        out = await asyncio.gather(*(batcher.embed(t) for t in texts))
        alone = encoder.encode_uncached(texts[:3] + texts[-2:])
        for v, w in zip(out[:3] + out[-2:], alone):
            np.testing.assert_allclose(v, w, atol=1e-4)
        assert batcher.largest_batch > 1
    finally:
        await batcher.close()
