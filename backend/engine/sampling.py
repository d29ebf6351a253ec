"""Batched sampling: greedy, temperature, top-k, top-p and per-request seeds in one pass."""

from __future__ import annotations

import torch

__all__ = ["SamplingBatch", "sample"]


class SamplingBatch:
    """Per-row sampling controls of one step, as tensors on the logits' device."""

    def __init__(self, temperatures: list[float], top_ps: list[float], top_ks: list[int],
                 generators: list[torch.Generator | None], device: torch.device):
        self.temperature = torch.tensor(temperatures, dtype=torch.float32, device=device)
        self.greedy = self.temperature == 0
        self.all_greedy = bool(self.greedy.all())
        self.top_p = torch.tensor(top_ps, dtype=torch.float32, device=device)
        self.top_k = torch.tensor(top_ks, dtype=torch.long, device=device)
        self.use_top_p = any(p < 1.0 for p in top_ps)
        self.max_top_k = max(top_ks, default=0)
        self.generators = generators


def _filter(logits: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
    if sb.max_top_k > 0:
        k = min(sb.max_top_k, logits.shape[-1])
        top = torch.topk(logits, k, dim=-1).values                          # [B, k]
        kth = top.gather(-1, (sb.top_k.clamp(1, k) - 1)[:, None])           # [B, 1]
        cut = (logits < kth) & (sb.top_k > 0)[:, None]
        logits = logits.masked_fill(cut, float("-inf"))
    if sb.use_top_p:
        srt, idx = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(srt, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs                       # mass ahead of each
        drop_sorted = (before >= sb.top_p[:, None]) & (sb.top_p < 1.0)[:, None]
        drop = torch.zeros_like(drop_sorted).scatter_(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, sb: SamplingBatch,
           default_generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row of ``logits`` ``[B, V]`` (fp32); returns (tokens, logprobs).

    Sampling uses the exponential-race form ``argmax(p / E)`` with ``E ~ Exp(1)``, which draws
    from ``p`` without a host sync; rows with a seed draw their noise from their own generator,
    so a seeded request gives the same tokens whatever batch it runs in.
    """
    logprobs_all = torch.log_softmax(logits, dim=-1)
    greedy_tok = torch.argmax(logits, dim=-1)
    if sb.all_greedy:
        return greedy_tok, logprobs_all.gather(-1, greedy_tok[:, None]).squeeze(-1)
    temp = torch.where(sb.greedy, torch.ones_like(sb.temperature), sb.temperature)
    scaled = _filter(logits / temp[:, None], sb)
    probs = torch.softmax(scaled, dim=-1)
    noise = torch.empty_like(probs)
    shared = [i for i, g in enumerate(sb.generators) if g is None]
    if shared:
        noise[shared] = torch.empty(len(shared), probs.shape[1], device=probs.device).exponential_(
            generator=default_generator)
    for i, g in enumerate(sb.generators):
        if g is not None:
            noise[i] = torch.empty(probs.shape[1], device=probs.device).exponential_(generator=g)
    sampled = torch.argmax(probs / noise, dim=-1)
    tokens = torch.where(sb.greedy, greedy_tok, sampled)
    return tokens, logprobs_all.gather(-1, tokens[:, None]).squeeze(-1)
