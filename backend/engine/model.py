"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2) over a flat batch of tokens.

The forward pass sees one flat list of tokens from many sequences: decode tokens first (one
per sequence), then prefill chunks. Linear layers run on the whole flat batch, with q/k/v and
gate/up fused into single matmuls; the per-token LoRA deltas are added by a
:class:`~quiver.backend.engine.lora.LoraContext`. Attention reads and writes a paged KV cache
through the index tensors of an :class:`AttentionBatch`. Checkpoint names are mapped once in
:func:`load_weights` so that ``forward`` stays plain.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors import safe_open

if TYPE_CHECKING:
    from quiver.backend.engine.lora import LoraContext

__all__ = ["ModelArgs", "AttentionBatch", "PrefillChunk", "Transformer", "load_weights",
           "TARGET_MODULES", "SUPPORTED_MODEL_TYPES"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# The seven projections LoRA can target, in the order the engine stores them.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelArgs:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_window: int | None

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelArgs:
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}; "
                             f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg.get('hidden_act')!r}")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"unsupported rope type {rope_type!r}")
        heads = cfg["num_attention_heads"]
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            model_type=model_type, hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab_size=cfg["vocab_size"], rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta, rope_scaling=rope if rope_type == "llama3" else None,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)), sliding_window=window,
        )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """``{module: (in_features, out_features)}`` for the seven LoRA targets."""
        h, i = self.hidden_size, self.intermediate_size
        return {"q_proj": (h, self.q_size), "k_proj": (h, self.kv_size),
                "v_proj": (h, self.kv_size), "o_proj": (self.q_size, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


@dataclass
class PrefillChunk:
    """One sequence's prefill chunk inside the flat batch."""

    start: int                # first row of the chunk in the flat batch
    length: int               # query tokens in the chunk
    kv_index: torch.Tensor    # [context] long: cache rows of the whole context, chunk included
    mask: torch.Tensor | None  # [length, context] bool, None when the chunk starts the sequence


@dataclass
class AttentionBatch:
    """Where every token of a step reads and writes the paged KV cache."""

    positions: torch.Tensor          # [T] long: position of each token in its sequence
    slot_mapping: torch.Tensor       # [T] long: cache row each token's K/V goes to
    num_decode: int                  # rows [0, num_decode) are single decode tokens
    decode_blocks: torch.Tensor | None = None    # [num_decode, n] long: cache blocks read
    decode_mask: torch.Tensor | None = None      # [num_decode, 1, 1, n * block_size] bool
    prefills: list[PrefillChunk] = field(default_factory=list)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_tables(args: ModelArgs, length: int, device: torch.device,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``[length, head_dim]`` (Llama-3 frequency scaling when configured)."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    sc = args.rope_scaling
    if sc is not None:
        factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old_len = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    freqs = torch.outer(torch.arange(length, dtype=torch.int64).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device, dtype), emb.sin().to(device, dtype)


class Layer:
    """One decoder layer's weights: fused ``qkv`` and ``gate_up``, plus ``o`` and ``down``."""

    def __init__(self, w: dict[str, torch.Tensor]):
        self.input_norm = w["input_norm"]
        self.post_norm = w["post_norm"]
        self.qkv, self.qkv_bias = w["qkv"], w.get("qkv_bias")
        self.o, self.o_bias = w["o"], w.get("o_bias")
        self.gate_up, self.gate_up_bias = w["gate_up"], w.get("gate_up_bias")
        self.down, self.down_bias = w["down"], w.get("down_bias")


class Transformer:
    """Decoder weights plus a flat-batch ``forward``; no autograd, no module hierarchy."""

    def __init__(self, args: ModelArgs, weights: dict[str, Any], max_context: int,
                 device: torch.device, dtype: torch.dtype):
        self.args, self.device, self.dtype = args, device, dtype
        self.embed = weights["embed"]
        self.norm = weights["norm"]
        self.lm_head = weights["lm_head"]
        self.layers = [Layer(w) for w in weights["layers"]]
        self.cos, self.sin = rope_tables(args, max_context, device, dtype)
        # Decode attention gathers whole KV blocks into these, reused from step to step.
        self._k_buf = torch.empty(0, device=device, dtype=dtype)
        self._v_buf = torch.empty(0, device=device, dtype=dtype)

    @property
    def weights_bytes(self) -> int:
        seen: dict[int, int] = {}
        tensors = [self.embed, self.norm, self.lm_head]
        for lay in self.layers:
            tensors += [t for t in vars(lay).values() if isinstance(t, torch.Tensor)]
        for t in tensors:
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values())

    @classmethod
    def random(cls, args: ModelArgs, max_context: int, device: torch.device,
               dtype: torch.dtype, seed: int = 0) -> Transformer:
        """Random weights of the configured shape (for benchmarks of large shapes)."""
        torch.manual_seed(seed)

        def rnd(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, dtype=dtype, device=device).mul_(0.02)

        h, i = args.hidden_size, args.intermediate_size
        qkv_out = args.q_size + 2 * args.kv_size
        layers = [{"input_norm": torch.ones(h, dtype=dtype, device=device),
                   "post_norm": torch.ones(h, dtype=dtype, device=device),
                   "qkv": rnd(qkv_out, h), "o": rnd(h, args.q_size),
                   "gate_up": rnd(2 * i, h), "down": rnd(h, i)}
                  for _ in range(args.num_layers)]
        embed = rnd(args.vocab_size, h)
        weights = {"embed": embed, "norm": torch.ones(h, dtype=dtype, device=device),
                   "lm_head": embed if args.tie_word_embeddings else rnd(args.vocab_size, h),
                   "layers": layers}
        return cls(args, weights, max_context, device, dtype)

    # -- forward ----------------------------------------------------------------------------

    def forward(self, tokens: torch.Tensor, attn: AttentionBatch, kv: Any,
                lora: LoraContext | None, logits_rows: torch.Tensor) -> torch.Tensor:
        """Logits ``[len(logits_rows), vocab]`` for the chosen rows of the flat batch.

        ``tokens`` is ``[T]`` long; ``kv`` is a KV cache with ``k[layer]``/``v[layer]`` of shape
        ``[num_blocks * block_size, kv_heads, head_dim]`` and a ``block_size``.
        """
        a = self.args
        x = self.embed[tokens]
        cos, sin = self.cos[attn.positions], self.sin[attn.positions]
        for li, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.input_norm, a.rms_norm_eps)
            qkv = F.linear(h, layer.qkv, layer.qkv_bias)
            if lora is not None:
                lora.apply_qkv(li, h, qkv)
            attn_out = self._attention(li, qkv, cos, sin, attn, kv)
            o = F.linear(attn_out, layer.o, layer.o_bias)
            if lora is not None:
                lora.apply(li, "o_proj", attn_out, o)
            x = x + o
            h = _rms_norm(x, layer.post_norm, a.rms_norm_eps)
            gate_up = F.linear(h, layer.gate_up, layer.gate_up_bias)
            if lora is not None:
                lora.apply_gate_up(li, h, gate_up)
            gate, up = gate_up.split(a.intermediate_size, dim=-1)
            act = F.silu(gate) * up
            down = F.linear(act, layer.down, layer.down_bias)
            if lora is not None:
                lora.apply(li, "down_proj", act, down)
            x = x + down
        x = _rms_norm(x[logits_rows], self.norm, a.rms_norm_eps)
        return F.linear(x, self.lm_head).float()

    def _attention(self, li: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   attn: AttentionBatch, kv: Any) -> torch.Tensor:
        a = self.args
        t = qkv.shape[0]
        q, k, v = qkv.split([a.q_size, a.kv_size, a.kv_size], dim=-1)
        q = q.view(t, a.num_heads, a.head_dim)
        k = k.view(t, a.num_kv_heads, a.head_dim)
        v = v.view(t, a.num_kv_heads, a.head_dim)
        c, s = cos[:, None, :], sin[:, None, :]
        q = q * c + _rotate_half(q) * s
        k = k * c + _rotate_half(k) * s
        k_cache, v_cache = kv.k[li], kv.v[li]
        k_cache.index_copy_(0, attn.slot_mapping, k)
        v_cache.index_copy_(0, attn.slot_mapping, v.contiguous())
        out = torch.empty_like(q)
        nd = attn.num_decode
        if nd:
            kd, vd = self._gather_blocks(k_cache, v_cache, attn.decode_blocks, kv.block_size)
            od = F.scaled_dot_product_attention(q[:nd].unsqueeze(2), kd, vd,
                                                attn_mask=attn.decode_mask,
                                                enable_gqa=a.num_kv_heads != a.num_heads)
            out[:nd] = od.squeeze(2)
        for ch in attn.prefills:
            rows = slice(ch.start, ch.start + ch.length)
            qp = q[rows].transpose(0, 1)                                  # [H, q, D]
            if ch.mask is None:       # the chunk is the whole context: its own K/V, no gather
                kp, vp = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
            else:
                kp = k_cache[ch.kv_index].transpose(0, 1)                 # [KVH, L, D]
                vp = v_cache[ch.kv_index].transpose(0, 1)
            op = F.scaled_dot_product_attention(
                qp.unsqueeze(0), kp.unsqueeze(0), vp.unsqueeze(0), attn_mask=ch.mask,
                is_causal=ch.mask is None, enable_gqa=a.num_kv_heads != a.num_heads)
            out[rows] = op[0].transpose(0, 1)
        return out.view(t, a.q_size)

    def _gather_blocks(self, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor,
                       block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[B, KVH, n * block_size, D]`` of the cache blocks ``blocks`` ``[B, n]``.

        Each block is copied as one row, into buffers kept between calls; that is cheaper than
        indexing the cache token by token and allocating the result at every layer.
        """
        b, n = blocks.shape
        kvh, d = k_cache.shape[1:]
        flat = blocks.reshape(-1)
        need = b * n * block_size * kvh * d
        if self._k_buf.numel() < need:
            self._k_buf = torch.empty(need, device=k_cache.device, dtype=k_cache.dtype)
            self._v_buf = torch.empty(need, device=v_cache.device, dtype=v_cache.dtype)
        width = block_size * kvh * d
        kb = self._k_buf[:need].view(b * n, width)
        vb = self._v_buf[:need].view(b * n, width)
        torch.index_select(k_cache.view(-1, width), 0, flat, out=kb)
        torch.index_select(v_cache.view(-1, width), 0, flat, out=vb)
        shape = (b, n * block_size, kvh, d)
        return kb.view(shape).transpose(1, 2), vb.view(shape).transpose(1, 2)


# -- checkpoint loading -------------------------------------------------------------------------

def _shard_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return files


def load_weights(model_dir: Path, args: ModelArgs, device: torch.device,
                 dtype: torch.dtype) -> dict[str, Any]:
    """Read a Hugging Face checkpoint folder into the engine's fused layout."""
    raw: dict[str, torch.Tensor] = {}
    for path in _shard_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                key = name.removeprefix("model.")
                raw[key] = f.get_tensor(name)

    def take(name: str) -> torch.Tensor:
        if name not in raw:
            raise KeyError(f"checkpoint {model_dir} lacks tensor {name!r}")
        return raw.pop(name).to(device=device, dtype=dtype)

    def maybe(name: str) -> torch.Tensor | None:
        return take(name) if name in raw else None

    layers = []
    for i in range(args.num_layers):
        p = f"layers.{i}."
        w: dict[str, torch.Tensor | None] = {
            "input_norm": take(p + "input_layernorm.weight"),
            "post_norm": take(p + "post_attention_layernorm.weight"),
            "qkv": torch.cat([take(p + f"self_attn.{m}.weight") for m in ("q_proj", "k_proj",
                                                                            "v_proj")]),
            "o": take(p + "self_attn.o_proj.weight"),
            "gate_up": torch.cat([take(p + "mlp.gate_proj.weight"),
                                  take(p + "mlp.up_proj.weight")]),
            "down": take(p + "mlp.down_proj.weight"),
        }
        qkv_b = [maybe(p + f"self_attn.{m}.bias") for m in ("q_proj", "k_proj", "v_proj")]
        if any(b is not None for b in qkv_b):
            w["qkv_bias"] = torch.cat([b if b is not None else torch.zeros(
                n, device=device, dtype=dtype) for b, n in zip(
                    qkv_b, (args.q_size, args.kv_size, args.kv_size), strict=True)])
        w["o_bias"] = maybe(p + "self_attn.o_proj.bias")
        gu_b = [maybe(p + f"mlp.{m}.bias") for m in ("gate_proj", "up_proj")]
        if any(b is not None for b in gu_b):
            w["gate_up_bias"] = torch.cat([b if b is not None else torch.zeros(
                args.intermediate_size, device=device, dtype=dtype) for b in gu_b])
        w["down_bias"] = maybe(p + "mlp.down_proj.bias")
        layers.append({k: v for k, v in w.items() if v is not None})
    embed = take("embed_tokens.weight")
    head = raw.get("lm_head.weight")
    lm_head = embed if args.tie_word_embeddings or head is None else take("lm_head.weight")
    return {"embed": embed, "norm": take("norm.weight"), "lm_head": lm_head, "layers": layers}
