"""The synchronous engine: continuous batching of many requests over many adapters.

Each :meth:`Engine.step` admits waiting requests (round-robin across adapters, while KV
blocks and running rows are free), runs one forward pass over every running sequence's next
decode token plus prefill chunks up to ``max_batch_tokens``, samples, and returns the
:class:`TokenEvent` of every request that produced a token or finished. Requests join and
leave between steps. A request reserves the KV blocks of its prompt plus ``max_tokens`` when
admitted, so a running request never runs out of cache; when the cache is full new requests
wait in the queue, and :class:`~quiver.errors.Overloaded` is raised when the queue is full.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from quiver.backend.engine import lora as lora_mod
from quiver.backend.engine.kv_cache import KVCache
from quiver.backend.engine.lora import LoraContext, LoraSlots, PreparedAdapter
from quiver.backend.engine.model import (AttentionBatch, ModelArgs, PrefillChunk, Transformer,
                                         load_weights)
from quiver.backend.engine.sampling import SamplingBatch, sample
from quiver.backend.engine.scheduler import FairQueue, Sequence
from quiver.backend.engine.types import EngineConfig, SamplingParams, TokenEvent
from quiver.errors import (Conflict, ContextLengthExceeded, InvalidRequest, ModelNotFound,
                           Overloaded)

__all__ = ["Engine"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _load_tokenizer(model_dir: Path) -> Any:
    if not any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def _eos_ids(model_dir: Path, config: dict[str, Any], tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    sources = [config.get("eos_token_id")]
    gen = model_dir / "generation_config.json"
    if gen.exists():
        sources.append(json.loads(gen.read_text()).get("eos_token_id"))
    if tokenizer is not None:
        sources.append(tokenizer.eos_token_id)
    for src in sources:
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, list):
            ids.update(i for i in src if isinstance(i, int))
    return ids


class _Detok:
    """Incremental detokenisation: text appears once its bytes form whole characters."""

    __slots__ = ("prefix", "read")

    def __init__(self) -> None:
        self.prefix = 0
        self.read = 0

    def delta(self, tokenizer: Any, ids: list[int]) -> str:
        before = tokenizer.decode(ids[self.prefix:self.read], skip_special_tokens=True)
        after = tokenizer.decode(ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(ids)
            return after[len(before):]
        return ""


class Engine:
    """Synchronous multi-LoRA engine; one thread at a time (see ``AsyncEngine``)."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = _resolve_device(config.device)
        self.dtype = _resolve_dtype(config.dtype, self.device)
        model_dir = Path(config.model_dir)
        self.model_config: dict[str, Any] = json.loads((model_dir / "config.json").read_text())
        self.model_name: str = model_dir.name
        self.args = ModelArgs.from_config(self.model_config)
        max_ctx = config.max_context or self.args.max_position_embeddings
        if self.args.sliding_window:
            max_ctx = min(max_ctx, self.args.sliding_window)
        self.max_context: int = max_ctx
        if config.random_weights:
            self.model = Transformer.random(self.args, max_ctx, self.device, self.dtype,
                                            seed=config.seed)
        else:
            weights = load_weights(model_dir, self.args, self.device, self.dtype)
            self.model = Transformer(self.args, weights, max_ctx, self.device, self.dtype)
        self.tokenizer = _load_tokenizer(model_dir)
        self.eos_ids = _eos_ids(model_dir, self.model_config, self.tokenizer)
        self.slots = LoraSlots(self.args, config.max_slots, config.max_rank, self.device,
                               self.dtype)
        bs = config.kv_block_size
        self.kv = KVCache(self.args, -(-self._kv_tokens() // bs), bs, self.device, self.dtype)
        width = -(-max_ctx // bs) * bs
        self._row_table = torch.zeros(config.max_running, width, dtype=torch.long,
                                      device=self.device)
        self._block_table = torch.zeros(config.max_running, width // bs, dtype=torch.long,
                                        device=self.device)
        self._arange = torch.arange(width, device=self.device)
        self._block_offsets = torch.arange(bs, device=self.device)
        self._free_rows = list(range(config.max_running - 1, -1, -1))
        self._waiting = FairQueue()
        self._running: dict[str, Sequence] = {}
        self._detok: dict[str, _Detok] = {}
        self._users: Counter[str] = Counter()
        self._pending: list[TokenEvent] = []
        self._generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self._counters = Counter(tokens_generated=0, last_step_tokens=0, steps=0,
                                 requests_finished=0, requests_cancelled=0, requests_failed=0)
        # Called as hook(request_ids, logits [B, vocab]) on every step that samples.
        self.logits_hook: Callable[[list[str], torch.Tensor], None] | None = None

    def _kv_tokens(self) -> int:
        c = self.config
        if c.kv_cache_tokens is not None:
            if c.kv_cache_tokens < 1:
                raise ValueError("kv_cache_tokens must be >= 1")
            return c.kv_cache_tokens
        per_token = KVCache.bytes_per_token(self.args, self.dtype)
        wanted = c.max_running * self.max_context
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * c.kv_cache_memory_fraction)
        else:
            budget = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                         * c.kv_cache_memory_fraction)
        return max(c.kv_block_size, min(wanted, budget // per_token))

    # -- adapters ---------------------------------------------------------------------------

    def prepare_adapter(self, adapter_config: dict[str, Any],
                        tensors: dict[str, torch.Tensor]) -> PreparedAdapter:
        """Validate and lay out an adapter in host memory; no slot is used."""
        return lora_mod.prepare_adapter(adapter_config, tensors, self.args,
                                        self.config.max_rank, self.dtype,
                                        pin=self.device.type == "cuda")

    def load_adapter(self, key: str, prepared: PreparedAdapter) -> int:
        """Copy into a free slot (idempotent per key); Overloaded when none is free."""
        return self.slots.load(key, prepared)

    def unload_adapter(self, key: str) -> None:
        """Free the slot of ``key``; Conflict while a queued or running request uses it."""
        users = self._users[key]
        if users:
            raise Conflict(f"adapter {key!r} is used by {users} queued or running requests",
                           details={"adapter": key, "requests": users})
        self.slots.unload(key)

    def slot_info(self) -> dict[str, Any]:
        return {"total": self.slots.num_slots, "free": self.slots.free,
                "loaded": dict(self.slots.loaded), "slot_bytes": self.slots.nbytes,
                "max_rank": self.slots.max_rank}

    def memory_report(self) -> dict[str, Any]:
        w, kv, sl = self.model.weights_bytes, self.kv.nbytes, self.slots.nbytes
        return {"weights_bytes": w, "kv_cache_bytes": kv, "slot_bytes": sl,
                "total_bytes": w + kv + sl, "kv_cache_tokens": self.kv.capacity_tokens,
                "kv_block_size": self.kv.block_size,
                "kv_bytes_per_token": KVCache.bytes_per_token(self.args, self.dtype),
                "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch.")}

    # -- requests ---------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_ids: list[int], adapter: str | None,
                    params: SamplingParams) -> None:
        """Queue a request; it is admitted by a later :meth:`step`."""
        if request_id in self._running or request_id in self._detok:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        problems = params.problems()
        if not prompt_ids:
            problems.append("the prompt is empty")
        elif any(not isinstance(t, int) or not 0 <= t < self.args.vocab_size
                 for t in prompt_ids):
            problems.append(f"prompt token ids must be integers in [0, {self.args.vocab_size})")
        if params.stop and self.tokenizer is None:
            problems.append("stop strings need a tokenizer, and this model has none")
        if problems:
            raise InvalidRequest("; ".join(problems), details=problems)
        if adapter is not None and adapter not in self.slots.loaded:
            raise ModelNotFound(f"adapter {adapter!r} is not loaded in this engine")
        if len(prompt_ids) >= self.max_context:
            raise ContextLengthExceeded(
                f"the prompt has {len(prompt_ids)} tokens; this model's context is "
                f"{self.max_context} and at least one token must be generated",
                details={"prompt_tokens": len(prompt_ids), "max_context": self.max_context})
        reserve = min(len(prompt_ids) + params.max_tokens, self.max_context)
        if self.kv.blocks_for(reserve) > self.kv.num_blocks:
            raise ContextLengthExceeded(
                f"prompt plus max_tokens needs {reserve} KV-cache tokens; the cache holds "
                f"{self.kv.capacity_tokens}", details={"needed": reserve,
                                                      "kv_cache_tokens": self.kv.capacity_tokens})
        if len(self._waiting) >= self.config.max_queue:
            raise Overloaded(f"the queue is full ({self.config.max_queue} requests)",
                             retry_after=1.0)
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        seq = Sequence(request_id, list(prompt_ids), adapter, params, generator=gen,
                       reserved_tokens=reserve)
        self._waiting.push(seq)
        self._detok[request_id] = _Detok()
        if adapter is not None:
            self._users[adapter] += 1

    def cancel(self, request_id: str) -> None:
        """Drop a queued or running request; its final event comes from the next step."""
        seq = self._waiting.remove(request_id) or self._running.get(request_id)
        if seq is None:
            return
        self._counters["requests_cancelled"] += 1
        self._pending.append(self._finish(seq, "cancelled", None, None, ""))

    def abort_all(self, reason: str = "cancelled") -> None:
        """Finish every queued and running request with ``reason`` (events at the next step)."""
        for seq in [*self._waiting.drain(), *self._running.values()]:
            self._counters["requests_cancelled" if reason == "cancelled"
                           else "requests_failed"] += 1
            self._pending.append(self._finish(seq, reason, None, None, ""))

    def has_work(self) -> bool:
        return bool(self._running or len(self._waiting) or self._pending)

    def stats(self) -> dict[str, Any]:
        return {"queue_depth": len(self._waiting), "running": len(self._running),
                "prefilling": sum(1 for s in self._running.values() if s.prefilling),
                "kv_cache_usage": self.kv.usage, "kv_free_blocks": self.kv.free_blocks,
                "slots_free": self.slots.free, "slots_total": self.slots.num_slots,
                **self._counters}

    # -- the step ---------------------------------------------------------------------------

    def _admit(self) -> None:
        bs = self.kv.block_size
        while len(self._waiting) and self._free_rows:
            seq = self._waiting.peek()
            assert seq is not None
            blocks = self.kv.allocate(self.kv.blocks_for(seq.reserved_tokens))
            if blocks is None:
                break
            self._waiting.pop()
            seq.blocks, seq.row = blocks, self._free_rows.pop()
            block_ids = torch.tensor(blocks, device=self.device)
            self._block_table[seq.row, :len(blocks)].copy_(block_ids)
            rows = (block_ids[:, None] * bs + self._block_offsets).flatten()
            self._row_table[seq.row, :rows.numel()].copy_(rows)
            seq.slot = self.slots.loaded[seq.adapter] if seq.adapter is not None else -1
            self._running[seq.request_id] = seq

    def _finish(self, seq: Sequence, reason: str, token_id: int | None,
                logprob: float | None, text: str) -> TokenEvent:
        if seq.row >= 0:
            self.kv.release(seq.blocks)
            self._free_rows.append(seq.row)
            seq.blocks, seq.row = [], -1
        self._running.pop(seq.request_id, None)
        self._detok.pop(seq.request_id, None)
        if seq.adapter is not None:
            self._users[seq.adapter] -= 1
            if not self._users[seq.adapter]:
                del self._users[seq.adapter]
        return TokenEvent(seq.request_id, token_id, text, logprob, True, reason,
                          len(seq.prompt_ids), len(seq.output_ids))

    def step(self) -> list[TokenEvent]:
        """One scheduling step: admit, run decode tokens and prefill chunks, sample."""
        events, self._pending = self._pending, []
        self._admit()
        if not self._running:
            return events
        # Decode rows ordered by adapter slot, so each slot's rows are one contiguous run.
        decode = sorted((s for s in self._running.values() if not s.prefilling),
                        key=lambda s: s.slot)
        budget = self.config.max_batch_tokens - len(decode)
        chunks: list[tuple[Sequence, int]] = []
        for s in self._running.values():
            if s.prefilling and budget > 0:
                n = min(len(s.prompt_ids) - s.num_computed, budget)
                chunks.append((s, n))
                budget -= n
        batch_seqs = decode + [s for s, _ in chunks]
        lens = [1] * len(decode) + [n for _, n in chunks]
        self._counters["last_step_tokens"] = sum(lens)
        try:
            sampled, logits = self._forward(decode, chunks, batch_seqs, lens)
        except Exception:
            log.exception("engine step failed; failing its requests")
            for s in batch_seqs:
                self._counters["requests_failed"] += 1
                events.append(self._finish(s, "error", None, None, ""))
            return events
        self._counters["steps"] += 1
        for s, n in zip(batch_seqs, lens, strict=True):
            s.num_computed += n
        if sampled:
            if self.logits_hook is not None:
                self.logits_hook([s.request_id for s in sampled], logits)
            sb = SamplingBatch([s.params.temperature for s in sampled],
                               [s.params.top_p for s in sampled],
                               [s.params.top_k for s in sampled],
                               [s.generator for s in sampled], logits.device)
            tokens, logprobs = sample(logits, sb, self._generator)
            for s, tok, lp in zip(sampled, tokens.tolist(), logprobs.tolist(), strict=True):
                events.append(self._advance(s, tok, lp))
        return events

    def _forward(self, decode: list[Sequence], chunks: list[tuple[Sequence, int]],
                 batch_seqs: list[Sequence], lens: list[int]
                 ) -> tuple[list[Sequence], torch.Tensor]:
        dev = self.device
        nd = len(decode)
        token_list = [s.token_at(s.num_computed) for s in decode]
        pos_list = [s.num_computed for s in decode]
        prefills: list[PrefillChunk] = []
        logit_rows = list(range(nd))
        sampled = list(decode)
        start = nd
        for s, n in chunks:
            nc = s.num_computed
            token_list += s.prompt_ids[nc:nc + n]
            pos_list += range(nc, nc + n)
            kv_index = self._row_table[s.row, :nc + n]
            mask = None
            if nc:
                mask = self._arange[:nc + n][None, :] <= (nc + self._arange[:n])[:, None]
            prefills.append(PrefillChunk(start, n, kv_index, mask))
            if nc + n == len(s.prompt_ids):
                logit_rows.append(start + n - 1)
                sampled.append(s)
            start += n
        tokens = torch.tensor(token_list, device=dev)
        positions = torch.tensor(pos_list, device=dev)
        seq_rows = torch.tensor([s.row for s in batch_seqs], device=dev)
        counts = torch.tensor(lens, device=dev)
        token_rows = torch.repeat_interleave(seq_rows, counts, output_size=len(token_list))
        attn = AttentionBatch(positions=positions,
                              slot_mapping=self._row_table[token_rows, positions],
                              num_decode=nd, prefills=prefills)
        if nd:
            ctx = positions[:nd] + 1
            n_blocks = self.kv.blocks_for(max(pos_list[:nd]) + 1)
            width = n_blocks * self.kv.block_size
            attn.decode_blocks = self._block_table[seq_rows[:nd], :n_blocks]
            attn.decode_mask = (self._arange[:width][None, :] < ctx[:, None])[:, None, None, :]
        lora = None
        if any(s.slot >= 0 for s in batch_seqs):
            token_slots = torch.repeat_interleave(
                torch.tensor([s.slot for s in batch_seqs]), torch.tensor(lens),
                output_size=len(token_list))
            lora = LoraContext.build(self.slots, token_slots, decode_only=not chunks,
                                     use_kernels=dev.type == "cuda")
        with torch.inference_mode():
            logits = self.model.forward(tokens, attn, self.kv, lora,
                                        torch.tensor(logit_rows, dtype=torch.long,
                                                     device=dev))
        return sampled, logits

    def _advance(self, s: Sequence, tok: int, logprob: float) -> TokenEvent:
        p = s.params
        s.output_ids.append(tok)
        self._counters["tokens_generated"] += 1
        if tok in self.eos_ids and not p.ignore_eos:
            self._counters["requests_finished"] += 1
            return self._finish(s, "stop", tok, logprob, s.text[s.emitted:])
        if self.tokenizer is not None:
            s.text += self._detok[s.request_id].delta(self.tokenizer, s.output_ids)
        reason = None
        if p.stop:
            lo = max(0, s.emitted - max(len(x) for x in p.stop))
            hits = [i for i in (s.text.find(x, lo) for x in p.stop) if i >= 0]
            if hits:
                s.text = s.text[:min(hits)]
                reason = "stop"
        if reason is None and (len(s.output_ids) >= p.max_tokens
                               or s.num_tokens >= self.max_context):
            reason = "length"
        if reason is not None:
            self._counters["requests_finished"] += 1
            return self._finish(s, reason, tok, logprob, s.text[s.emitted:])
        hold = max((len(x) for x in p.stop), default=1) - 1
        end = max(s.emitted, len(s.text) - hold)
        delta, s.emitted = s.text[s.emitted:end], end
        return TokenEvent(s.request_id, tok, delta, logprob, False, None, len(s.prompt_ids),
                          len(s.output_ids))
