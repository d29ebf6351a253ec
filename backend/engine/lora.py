"""LoRA adapters in the engine: validation, host preparation, GPU slots and batched deltas.

Tiers: a :class:`PreparedAdapter` lives in host memory (pinned on CUDA) in the engine's layout;
:class:`LoraSlots` holds ``max_slots`` adapters on the device in stacked buffers allocated once;
a :class:`LoraContext` is built once per step from the slot index of every token and adds
``scale_i · B_i (A_i x)`` to each target projection with no Python loop over adapters.

Layout per module: ``a[layer]`` is ``[slots, max_rank, d_in]`` (A as stored by PEFT) and
``b[layer]`` is ``[slots, max_rank, d_out]`` (``scale · Bᵀ``), so the first ``r`` rank rows of a
slot are contiguous and rows past an adapter's rank are zero. q/k/v (and gate/up), which read
the same input, keep their A in one buffer ``[slots, max_rank, n, d_in]``, so on the CPU one
matmul shrinks all of them; when their outputs have one width (gate/up always, q/k/v without
grouped-query attention) their B shares a buffer ``[slots, n, max_rank, d_out]`` too, so one
matmul expands them into the fused projection's output. Slots are grouped by their rank
rounded up to a power of two; each group runs only its own rank's work. A group whose slots
form a consecutive run with the same number of tokens each (a decode step whose requests spread
evenly over many adapters) runs as one ``bmm`` over the slot buffers, with no copy of the
weights and no per-adapter dispatch.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from quiver.errors import (IncompatibleAdapter, InvalidAdapter, Overloaded,
                           UnsafeFile, UnservableAdapter)
from quiver.backend.engine.model import TARGET_MODULES, ModelArgs
from quiver.registry.safetensors_check import header_length, parse_safetensors_header

__all__ = ["PreparedAdapter", "LoraSlots", "LoraContext", "prepare_adapter", "load_adapter_dir",
           "read_safetensors", "lora_reference", "rank_bucket"]

_TENSOR_RE = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\."
    r"lora_(A|B)(?:\.[\w-]+)?\.weight$")


@dataclass
class PreparedAdapter:
    """An adapter validated against the base model and laid out for the slots (host memory).

    Every module's weights are stacked over layers, ``a[m]`` ``[layers, r_m, d_in]`` and
    ``b[m]`` ``[layers, r_m, d_out]`` (``scale·Bᵀ``), with ``r_m`` the module's largest rank
    and zero rows where a layer has a smaller rank or no LoRA; all of them are views of one
    buffer (page-locked on CUDA), so loading a slot is one copy per module and buffer.
    """

    a: dict[str, torch.Tensor]     # target module → [layers, r_m, d_in], in TARGET_MODULES order
    b: dict[str, torch.Tensor]
    scales: dict[str, float]       # module name → scale
    use_rslora: bool
    buffer: torch.Tensor           # the one allocation every ``a``/``b`` tensor views

    @property
    def modules(self) -> tuple[str, ...]:
        """The target modules it touches."""
        return tuple(self.a)

    @property
    def rank(self) -> int:
        """Its largest rank over its modules."""
        return max(t.shape[1] for t in self.a.values())

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()


# Target modules that read the same input, shrunk by one matmul per rank group.
FUSED_GROUPS: dict[str, tuple[str, ...]] = {"qkv": ("q_proj", "k_proj", "v_proj"),
                                            "gate_up": ("gate_proj", "up_proj")}


def _in_fused_group(module: str) -> bool:
    return any(module in group for group in FUSED_GROUPS.values())


def rank_bucket(rank: int, max_rank: int) -> int:
    """The rank a slot computes with: ``rank`` rounded up to a power of two (at least 4)."""
    return min(max_rank, 1 << max(2, math.ceil(math.log2(max(rank, 1)))))


def _pattern_value(patterns: dict[str, Any], module_name: str) -> Any:
    if module_name in patterns:
        return patterns[module_name]
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return None


def prepare_adapter(adapter_config: dict[str, Any], tensors: dict[str, torch.Tensor],
                    args: ModelArgs, max_rank: int, dtype: torch.dtype,
                    pin: bool = False) -> PreparedAdapter:
    """Validate a PEFT LoRA adapter against ``args`` and convert it to the slot layout.

    Collects every problem before raising: :class:`UnservableAdapter` when any feature is
    one this engine cannot serve (DoRA, biases, modules_to_save, embedding LoRA, untargetable
    modules, rank above ``max_rank``), else :class:`IncompatibleAdapter` for shape or layer
    mismatches with the base model. ``details`` lists every reason.
    """
    if not isinstance(adapter_config, dict):
        raise InvalidAdapter("adapter_config must be a JSON object")
    unservable: list[dict[str, Any]] = []
    incompatible: list[dict[str, Any]] = []
    cfg = adapter_config

    def refuse(field: str, problem: str, **extra: Any) -> None:
        unservable.append({"field": field, "problem": problem, **extra})

    if cfg.get("peft_type", "LORA") != "LORA":
        refuse("peft_type", f"only LORA adapters are served, not {cfg.get('peft_type')!r}")
    if cfg.get("use_dora"):
        refuse("use_dora", "DoRA adapters are not supported")
    if cfg.get("bias", "none") != "none":
        refuse("bias", f"bias={cfg.get('bias')!r} trains base biases; only 'none' is supported")
    if cfg.get("lora_bias"):
        refuse("lora_bias", "LoRA B biases are not supported")
    if cfg.get("modules_to_save"):
        refuse("modules_to_save", "adapters with fully trained modules are not supported",
               found=list(cfg["modules_to_save"]))
    if cfg.get("fan_in_fan_out"):
        refuse("fan_in_fan_out", "fan_in_fan_out (Conv1D) layouts are not supported")
    for key in ("layer_replication", "trainable_token_indices", "target_parameters"):
        if cfg.get(key):
            refuse(key, f"{key} is not supported")

    dims = args.module_dims()
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if "lora_magnitude_vector" in name:
            if not cfg.get("use_dora"):
                refuse("use_dora", "DoRA magnitude vectors present", tensor=name)
            continue
        if "lora_embedding_" in name:
            refuse("target_modules", "embedding LoRA is not supported", tensor=name)
            continue
        if ".lora_" not in name:
            refuse("modules_to_save", "non-LoRA weights (fully trained modules) present",
                   tensor=name)
            continue
        m = _TENSOR_RE.match(name)
        if m is None:
            if re.search(r"lora_[AB](\.[\w-]+)?\.bias$", name):
                refuse("lora_bias", "LoRA B biases are not supported", tensor=name)
            else:
                module = name.split(".lora_")[0].rsplit(".", 1)[-1]
                refuse("target_modules", f"module {module!r} cannot carry LoRA here; "
                       f"supported: {', '.join(TARGET_MODULES)}", tensor=name)
            continue
        layer, _, module, which = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if module not in dims:
            refuse("target_modules", f"module {module!r} cannot carry LoRA here; supported: "
                   f"{', '.join(TARGET_MODULES)}", tensor=name)
            continue
        if layer >= args.num_layers:
            incompatible.append({"tensor": name, "expected": f"layer < {args.num_layers}",
                                 "found": layer, "problem": "layer index out of range"})
            continue
        pairs.setdefault((layer, module), {})[which] = t

    use_rslora = bool(cfg.get("use_rslora"))
    accepted: dict[str, list[tuple[int, torch.Tensor, torch.Tensor, float]]] = {}
    scales: dict[str, float] = {}
    for (layer, module), ab in sorted(pairs.items()):
        where = f"layers.{layer}.{module}"
        if set(ab) != {"A", "B"}:
            incompatible.append({"module": where, "expected": "lora_A and lora_B",
                                 "found": sorted(ab), "problem": "unpaired LoRA weights"})
            continue
        a, b = ab["A"], ab["B"]
        d_in, d_out = dims[module]
        r = a.shape[0] if a.dim() == 2 else -1
        if a.dim() != 2 or a.shape[1] != d_in:
            incompatible.append({"module": where, "expected": f"lora_A [r, {d_in}]",
                                 "found": list(a.shape), "problem": "lora_A shape mismatch"})
            continue
        if b.dim() != 2 or tuple(b.shape) != (d_out, r):
            incompatible.append({"module": where, "expected": f"lora_B [{d_out}, {r}]",
                                 "found": list(b.shape), "problem": "lora_B shape mismatch"})
            continue
        if not (a.is_floating_point() and b.is_floating_point()):
            incompatible.append({"module": where, "expected": "floating-point weights",
                                 "found": [str(a.dtype), str(b.dtype)],
                                 "problem": "LoRA weights are not floating point"})
            continue
        if r > max_rank:
            refuse("r", f"rank {r} exceeds this engine's max_rank {max_rank}", module=where)
            continue
        section = "self_attn" if module in TARGET_MODULES[:4] else "mlp"
        full = f"model.layers.{layer}.{section}.{module}"
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, full)
        alpha = float(cfg.get("lora_alpha", r) if alpha is None else alpha)
        scale = alpha / (math.sqrt(r) if use_rslora else r)
        scales[module] = scale
        accepted.setdefault(module, []).append((layer, a, b, scale))
    if unservable:
        reasons = "; ".join(u["problem"] for u in unservable)
        raise UnservableAdapter(f"this engine cannot serve the adapter: {reasons}",
                                details=unservable + incompatible)
    if incompatible:
        raise IncompatibleAdapter(f"adapter does not fit the base model ({len(incompatible)} "
                                  f"problems)", details=incompatible)
    if not accepted:
        raise InvalidAdapter("adapter holds no LoRA weights")
    a_out, b_out, buffer = _stack(accepted, args, dtype, pin)
    return PreparedAdapter(a=a_out, b=b_out, scales=scales, use_rslora=use_rslora,
                           buffer=buffer)


def _stack(accepted: dict[str, list[tuple[int, torch.Tensor, torch.Tensor, float]]],
           args: ModelArgs, dtype: torch.dtype, pin: bool
           ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Each module's A and ``scale·Bᵀ`` stacked over layers in one buffer, zero where a layer
    has a smaller rank or no LoRA; modules in TARGET_MODULES order."""
    dims, nl = args.module_dims(), args.num_layers
    modules = [m for m in TARGET_MODULES if m in accepted]
    ranks = {m: max(a.shape[0] for _, a, _, _ in accepted[m]) for m in modules}
    total = sum(nl * ranks[m] * (dims[m][0] + dims[m][1]) for m in modules)
    buffer = torch.empty(total, dtype=dtype, pin_memory=pin)
    a_out: dict[str, torch.Tensor] = {}
    b_out: dict[str, torch.Tensor] = {}
    off = 0
    for m in modules:
        (d_in, d_out), r_m = dims[m], ranks[m]
        a_out[m] = buffer[off:off + nl * r_m * d_in].view(nl, r_m, d_in)
        off += nl * r_m * d_in
        b_out[m] = buffer[off:off + nl * r_m * d_out].view(nl, r_m, d_out)
        off += nl * r_m * d_out
        items = accepted[m]
        if (dtype == torch.float32 and len(items) == nl
                and all(a.shape[0] == r_m and a.dtype == b.dtype == dtype
                        for _, a, b, _ in items)):
            # Every layer at one rank (the usual case): one stacking copy per matrix.
            torch.stack([a for _, a, _, _ in items], out=a_out[m])
            torch.stack([b.t() for _, _, b, _ in items], out=b_out[m])
            scales = {scale for *_, scale in items}
            b_out[m].mul_(scales.pop() if len(scales) == 1 else torch.tensor(
                [scale for *_, scale in items], dtype=dtype).view(nl, 1, 1))
            continue
        a_out[m].zero_()
        b_out[m].zero_()
        for layer, a, b, scale in items:
            r = a.shape[0]
            a_out[m][layer, :r].copy_(a)
            # B transposed and scaled in fp32 (the scale rounds once), then cast.
            if dtype == torch.float32:
                b_out[m][layer, :r].copy_(b.t()).mul_(scale)
            else:
                b_out[m][layer, :r].copy_(b.t().to(torch.float32).mul(scale))
    return a_out, b_out, buffer


_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                 "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                 "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, as views of one private (copy-on-write) mapping of
    it, copied only where a writer left a tensor misaligned for its dtype: nothing is read
    until used, and the page cache is used in place instead of copied into fresh memory. The
    header passes the same checks as an upload to the registry."""
    size = path.stat().st_size
    if size < 8:
        parse_safetensors_header(b"", size, file_name=path.name)      # raises
    raw = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    view = memoryview(raw.numpy())
    n = header_length(bytes(view[:8]))
    metas = parse_safetensors_header(bytes(view[:min(size, 8 + n)]), size, file_name=path.name)
    tensors: dict[str, torch.Tensor] = {}
    for name, meta in metas.items():
        dtype = _TORCH_DTYPES.get(meta.dtype)
        if dtype is None:
            raise InvalidAdapter(f"{path.name}: tensor {name!r} is {meta.dtype}, which the "
                                 "engine cannot read", details={"file": path.name,
                                                                "tensor": name})
        start = 8 + n + meta.offset
        chunk = raw[start:start + meta.nbytes]
        if start % dtype.itemsize:
            chunk = chunk.clone()
        tensors[name] = chunk.view(dtype).view(meta.shape)
    return tensors


def load_adapter_dir(path: Path | str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    path = Path(path)
    cfg_path, st_path = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise InvalidAdapter(f"{path} has no adapter_config.json")
    if not st_path.is_file():
        if (path / "adapter_model.bin").exists():
            raise UnsafeFile(f"{path} holds only a pickled adapter_model.bin; safetensors "
                             "is required")
        raise InvalidAdapter(f"{path} has no adapter_model.safetensors")
    try:
        config = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidAdapter(f"adapter_config.json is not valid JSON: {exc}") from exc
    try:
        tensors = read_safetensors(st_path)
    except (OSError, RuntimeError) as exc:      # RuntimeError: the file could not be mapped
        raise InvalidAdapter(f"adapter_model.safetensors cannot be read: {exc}") from exc
    return config, tensors


class LoraSlots:
    """``max_slots`` adapters resident on the device in buffers allocated once."""

    def __init__(self, args: ModelArgs, num_slots: int, max_rank: int, device: torch.device,
                 dtype: torch.dtype):
        self.args, self.num_slots, self.max_rank = args, num_slots, max_rank
        self.device, self.dtype = device, dtype
        nl = args.num_layers
        dims = args.module_dims()
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        # Modules that read the same input share one A buffer ``[layers, slots, max_rank,
        # n, d_in]``, so a single matmul shrinks them together; ``a[m]`` is module m's view.
        self.fused_a: dict[str, torch.Tensor] = {}
        for name, group in FUSED_GROUPS.items():
            fused = torch.zeros(nl, num_slots, max_rank, len(group), dims[group[0]][0],
                                device=device, dtype=dtype)
            self.fused_a[name] = fused
            for j, m in enumerate(group):
                self.a[m] = fused[:, :, :, j]
        # ... and, where their outputs have one width, one B buffer ``[layers, slots, n,
        # max_rank, d_out]``, whose expand is then one matmul too.
        self.fused_b: dict[str, torch.Tensor] = {}
        for name, group in FUSED_GROUPS.items():
            if len({dims[m][1] for m in group}) == 1:
                fused = torch.zeros(nl, num_slots, len(group), max_rank, dims[group[0]][1],
                                    device=device, dtype=dtype)
                self.fused_b[name] = fused
                for j, m in enumerate(group):
                    self.b[m] = fused[:, :, j]
        for m, (d_in, d_out) in dims.items():
            if m not in self.a:
                self.a[m] = torch.zeros(nl, num_slots, max_rank, d_in, device=device,
                                        dtype=dtype)
            if m not in self.b:
                self.b[m] = torch.zeros(nl, num_slots, max_rank, d_out, device=device,
                                        dtype=dtype)
        in_fused_b = {m for name in self.fused_b for m in FUSED_GROUPS[name]}
        self._buffers = [*self.fused_a.values(), *self.fused_b.values(),
                         *(t for m, t in self.a.items() if not _in_fused_group(m)),
                         *(t for m, t in self.b.items() if m not in in_fused_b)]
        self.slot_rank = torch.zeros(num_slots, dtype=torch.long)      # bucketed rank, 0 = empty
        self.module_users = dict.fromkeys(TARGET_MODULES, 0)
        self.loaded: dict[str, int] = {}
        self._modules: dict[int, tuple[str, ...]] = {}
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers)

    @property
    def free(self) -> int:
        return len(self._free)

    def load(self, key: str, prepared: PreparedAdapter) -> int:
        if key in self.loaded:
            return self.loaded[key]
        if prepared.rank > self.max_rank:
            raise UnservableAdapter(f"rank {prepared.rank} exceeds max_rank {self.max_rank}")
        if not self._free:
            raise Overloaded(f"all {self.num_slots} adapter slots are in use",
                             details={"slots": self.num_slots})
        slot = self._free.pop()
        for m in TARGET_MODULES:
            a, b = prepared.a.get(m), prepared.b.get(m)
            r = 0 if a is None else a.shape[1]
            if r:
                self.a[m][:, slot, :r].copy_(a, non_blocking=True)
                self.b[m][:, slot, :r].copy_(b, non_blocking=True)
            if r < self.max_rank:
                self.a[m][:, slot, r:].zero_()
                self.b[m][:, slot, r:].zero_()
        self.slot_rank[slot] = rank_bucket(prepared.rank, self.max_rank)
        for m in prepared.modules:
            self.module_users[m] += 1
        self._modules[slot] = prepared.modules
        self.loaded[key] = slot
        return slot

    def unload(self, key: str) -> None:
        slot = self.loaded.pop(key, None)
        if slot is None:
            return
        for m in self._modules.pop(slot):
            self.module_users[m] -= 1
        self.slot_rank[slot] = 0
        self._free.append(slot)


@dataclass
class _Group:
    rank: int
    rows: torch.Tensor     # [Tg] long: rows of the flat batch, sorted by slot
    slots: torch.Tensor    # [Tg] long: slot of each row
    offs: torch.Tensor     # [num_slots] int32: cumulative row counts per slot
    seg_start: torch.Tensor  # [S] int32: first row of each non-empty segment (in rows order)
    seg_len: torch.Tensor    # [S] int32
    seg_slot: torch.Tensor   # [S] int32
    max_seg: int
    span: slice | None       # the rows as a slice when they are one contiguous run
    # When every slot of the group has the same number k of tokens and the slots are a
    # consecutive run, that run: rows [i·k, (i+1)·k) use slot run.start + i, so a plain bmm
    # over the slot buffers applies.
    slot_run: slice | None = None


def _consecutive(values: torch.Tensor) -> slice | None:
    """``values`` as a slice when they are ``lo, lo+1, ..., hi-1``, else ``None``."""
    lo, n = int(values[0]), values.numel()
    if int(values[-1]) - lo != n - 1 or not bool((values[1:] > values[:-1]).all()):
        return None
    return slice(lo, lo + n)


class LoraContext:
    """One step's LoRA work: token rows grouped by slot rank, shared by every layer."""

    def __init__(self, slots: LoraSlots, token_slots: torch.Tensor, decode_only: bool,
                 use_kernels: bool):
        """``token_slots`` is ``[T]`` long on the CPU: the slot of each token, -1 for none."""
        self.slots, self.decode_only, self.use_kernels = slots, decode_only, use_kernels
        dev = slots.device
        order = torch.argsort(token_slots, stable=True)
        sorted_slots = token_slots[order]
        keep = sorted_slots >= 0
        order, sorted_slots = order[keep], sorted_slots[keep]
        ranks = slots.slot_rank[sorted_slots]
        self.groups: list[_Group] = []
        for r in ranks.unique().tolist():
            sel = ranks == r
            g_slots = sorted_slots[sel]
            counts = torch.bincount(g_slots, minlength=slots.num_slots)
            seg_slot = torch.nonzero(counts).flatten()
            seg_len = counts[seg_slot]
            seg_start = torch.cumsum(seg_len, 0) - seg_len
            rows = order[sel]
            first, n = int(rows[0]), rows.numel()
            span = None
            if int(rows[-1]) - first == n - 1 and bool((rows[1:] > rows[:-1]).all()):
                span = slice(first, first + n)
            self.groups.append(_Group(
                rank=int(r), rows=rows.to(dev), slots=g_slots.to(dev), span=span,
                offs=counts.cumsum(0).to(torch.int32).to(dev),
                seg_start=seg_start.to(torch.int32).to(dev),
                seg_len=seg_len.to(torch.int32).to(dev),
                seg_slot=seg_slot.to(torch.int32).to(dev), max_seg=int(seg_len.max()),
                slot_run=_consecutive(seg_slot) if bool((seg_len == seg_len[0]).all())
                else None))

    @classmethod
    def build(cls, slots: LoraSlots, token_slots: torch.Tensor, decode_only: bool = False,
              use_kernels: bool = False) -> LoraContext | None:
        """The step's context, or ``None`` when no token uses an adapter."""
        if not bool((token_slots >= 0).any()):
            return None
        return cls(slots, token_slots, decode_only, use_kernels)

    @staticmethod
    def _mm(g: _Group, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Row ``t`` of ``x`` times its slot's matrix ``w[s]``, over a rank group."""
        if g.slot_run is not None:
            w = w[g.slot_run]
            return torch.bmm(x.reshape(w.shape[0], -1, x.shape[1]), w).reshape(x.shape[0], -1)
        return F.grouped_mm(x, w, offs=g.offs)

    @staticmethod
    def _fused_expand(g: _Group, h_all: torch.Tensor, fused_b: torch.Tensor,
                      y: torch.Tensor) -> None:
        """``y[t, j·d_out:(j+1)·d_out] += h_all[t, :, j] @ B_j[s]`` for every module ``j`` of a
        group with one B buffer (``g.slot_run`` set): one ``bmm`` over (slot, module) pairs when
        each slot has one token, else one per module, written into the output in place when its
        rows are in slot order."""
        tg, rank, n = h_all.shape
        wv = fused_b[g.slot_run, :, :rank]                    # [slots, n, rank, d_out]
        slots, d_out = wv.shape[0], wv.shape[-1]
        k = tg // slots                                       # tokens per slot
        w = wv.reshape(slots * n, rank, d_out)
        if g.span is not None and y.is_contiguous() and y.dtype == w.dtype:
            # Rows in slot order: expand straight into the output.
            yv = y[g.span].view(slots, k, n, d_out)
            if k == 1:
                h = h_all.transpose(1, 2).reshape(slots * n, 1, rank)
                yv.view(slots * n, 1, d_out).baddbmm_(h, w)
            else:
                hv = h_all.view(slots, k, rank, n)
                for j in range(n):
                    yv[:, :, j].baddbmm_(hv[..., j], wv[:, j])
            return
        h = h_all.view(slots, k, rank, n).permute(0, 3, 1, 2).reshape(slots * n, k, rank)
        dy = torch.bmm(h, w).view(slots, n, k, d_out).transpose(1, 2).reshape(tg, n * d_out)
        if g.span is not None:
            y[g.span] += dy.to(y.dtype)
        else:
            y.index_add_(0, g.rows, dy.to(y.dtype))

    def _delta(self, g: _Group, xg: torch.Tensor, a: torch.Tensor,
               b: torch.Tensor) -> torch.Tensor:
        if self.use_kernels:
            from quiver.backend.engine import kernels

            if self.decode_only:
                h = kernels.bgmv_shrink(xg, a, g.slots, g.rank)
                return kernels.bgmv_expand(h, b, g.slots, g.rank)
            h = kernels.sgmv_shrink(xg, a, g.seg_start, g.seg_len, g.seg_slot, g.rank, g.max_seg)
            return kernels.sgmv_expand(h, b, g.seg_start, g.seg_len, g.seg_slot, g.rank,
                                       g.max_seg)
        return self._mm(g, self._shrink(g, xg, a), b[:, :g.rank])

    def _shrink(self, g: _Group, xg: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``[Tg, rank]``: each row times its slot's A (torch path)."""
        return self._mm(g, xg, a[:, :g.rank].transpose(1, 2))

    def _fused_shrink(self, g: _Group, xg: torch.Tensor, fused: torch.Tensor,
                      n: int) -> torch.Tensor:
        """``[Tg, rank, n]``: the shrink of all ``n`` modules of a fused group at once."""
        a = fused[:, :g.rank].reshape(fused.shape[0], g.rank * n, fused.shape[-1])
        return self._mm(g, xg, a.transpose(1, 2)).view(-1, g.rank, n)

    def _apply(self, layer: int, x: torch.Tensor, y: torch.Tensor,
               parts: list[tuple[str, int, int]], fused: str | None = None) -> None:
        active = [p for p in parts if self.slots.module_users[p[0]]]
        if not active:
            return
        fuse = fused is not None and not self.use_kernels and len(active) > 1
        fused_b = self.slots.fused_b.get(fused) if fuse and len(active) == len(parts) else None
        for g in self.groups:
            xg = x[g.span] if g.span is not None else x.index_select(0, g.rows)
            h_all = (self._fused_shrink(g, xg, self.slots.fused_a[fused][layer], len(parts))
                     if fuse else None)
            if fused_b is not None and g.slot_run is not None:
                self._fused_expand(g, h_all, fused_b[layer], y)
                continue
            for j, (module, off, size) in enumerate(parts):
                if (module, off, size) not in active:
                    continue
                b = self.slots.b[module][layer]
                if (h_all is None and not self.use_kernels and g.slot_run is not None
                        and g.span is not None and size == y.shape[1]
                        and y.is_contiguous() and y.dtype == b.dtype):
                    # The whole output, rows in slot order: expand straight into it.
                    h = self._shrink(g, xg, self.slots.a[module][layer])
                    w = b[g.slot_run, :g.rank]
                    y[g.span].view(w.shape[0], -1, size).baddbmm_(
                        h.view(w.shape[0], -1, g.rank), w)
                    continue
                if h_all is not None:
                    dy = self._mm(g, h_all[:, :, j].contiguous(), b[:, :g.rank])
                else:
                    dy = self._delta(g, xg, self.slots.a[module][layer], b)
                if g.span is not None:
                    y[g.span, off:off + size] += dy
                else:
                    y[:, off:off + size].index_add_(0, g.rows, dy.to(y.dtype))

    def apply(self, layer: int, module: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """``y[t] += scale·B_s(A_s x[t])`` for every token ``t`` whose slot ``s`` is set."""
        self._apply(layer, x, y, [(module, 0, y.shape[1])])

    def apply_qkv(self, layer: int, x: torch.Tensor, qkv: torch.Tensor) -> None:
        a = self.slots.args
        self._apply(layer, x, qkv, [("q_proj", 0, a.q_size), ("k_proj", a.q_size, a.kv_size),
                                    ("v_proj", a.q_size + a.kv_size, a.kv_size)], "qkv")

    def apply_gate_up(self, layer: int, x: torch.Tensor, gate_up: torch.Tensor) -> None:
        i = self.slots.args.intermediate_size
        self._apply(layer, x, gate_up, [("gate_proj", 0, i), ("up_proj", i, i)], "gate_up")


def lora_reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor,
                   ranks: torch.Tensor) -> torch.Tensor:
    """The plain-torch meaning of every LoRA path, computed in fp32.

    x: [T, d_in]; a: [N, R, d_in]; b: [N, R, d_out] (scale·Bᵀ); token_slots: [T] long (-1: no
    adapter); ranks: [N] long. Returns ``[T, d_out]`` with row ``t`` equal to
    ``x[t] @ a[s, :r].T @ b[s, :r]`` for ``s = token_slots[t]``, ``r = ranks[s]``, else 0.
    """
    s = token_slots.clamp(min=0)
    rank_rows = torch.arange(a.shape[1], device=a.device)
    keep = (rank_rows[None, :] < ranks[s][:, None]) & (token_slots[:, None] >= 0)  # [T, R]
    h = torch.einsum("ti,tri->tr", x.float(), a[s].float()) * keep
    return torch.einsum("tr,tro->to", h, b[s].float())
