"""Base-model catalogue entries and the check of a LoRA adapter against its base model.

A base model is described by its Hugging Face ``config.json``: the decoder families Llama,
Mistral, Qwen2 and Qwen3 share one module layout, so the shape of every module follows from a
handful of sizes::

    model.embed_tokens                   Embedding(vocab, hidden)
    model.layers.{i}.self_attn.q_proj    Linear(hidden -> heads * head_dim)
                              k_proj/v_proj  Linear(hidden -> kv_heads * head_dim)
                              o_proj     Linear(heads * head_dim -> hidden)
    model.layers.{i}.mlp.gate_proj/up_proj   Linear(hidden -> intermediate)
                         down_proj       Linear(intermediate -> hidden)
    lm_head                              Linear(hidden -> vocab)

A LoRA pair on a ``Linear(in -> out)`` stores ``lora_A`` as ``[r, in]`` and ``lora_B`` as
``[out, r]``; on an ``Embedding(vocab, hidden)`` it stores ``lora_embedding_A`` as ``[r, vocab]``
and ``lora_embedding_B`` as ``[hidden, r]``. :func:`check_adapter_against_base` compares every
tensor of an adapter with this table and raises one IncompatibleAdapter listing every problem.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from quiver.errors import IncompatibleAdapter, InvalidAdapter, InvalidRequest
from quiver.wire import BaseModelInfo, PeftEssentials

from .safetensors_check import TensorMeta

__all__ = [
    "SUPPORTED_FAMILIES", "LINEAR_MODULES", "ALLOWED_DTYPES", "base_model_info_from_config",
    "validate_adapter_config", "expected_lora_tensors", "check_adapter_against_base",
    "adapter_stats", "targeted_modules", "DTYPE_NAMES",
]

SUPPORTED_FAMILIES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
"""``model_type`` -> default architecture name, for the families whose layout is above."""

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTENTION_MODULES + MLP_MODULES
ALLOWED_DTYPES = ("F32", "F16", "BF16")
PREFIX = "base_model.model."

DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz", "C64": "complex64",
    "F4": "float4_e2m1", "F6_E2M3": "float6_e2m3", "F6_E3M2": "float6_e3m2",
}

_MAX_PROBLEMS = 10_000


# --- base models -------------------------------------------------------------------------------

def _positive_int(config: Mapping[str, Any], key: str, problems: list[dict[str, Any]],
                  default: Any = None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        problems.append({"field": key, "expected": "a positive integer", "found": value,
                         "problem": f"{key} must be a positive integer"})
        return 1
    return value


def base_model_info_from_config(name: str, config: dict[str, Any],
                                revision: str | None = None) -> BaseModelInfo:
    """Describe base model ``name`` from its Hugging Face ``config.json`` (as a dict)."""
    if not isinstance(config, dict):
        raise InvalidRequest("a base model config must be a JSON object",
                             details=[{"field": None, "problem": "not an object"}])
    family = config.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise InvalidRequest(
            f"unsupported base model family {family!r}; supported: "
            f"{', '.join(SUPPORTED_FAMILIES)}",
            details=[{"field": "model_type", "expected": list(SUPPORTED_FAMILIES),
                      "found": family, "problem": "unsupported model_type"}])
    problems: list[dict[str, Any]] = []
    hidden = _positive_int(config, "hidden_size", problems)
    intermediate = _positive_int(config, "intermediate_size", problems)
    layers = _positive_int(config, "num_hidden_layers", problems)
    heads = _positive_int(config, "num_attention_heads", problems)
    kv_heads = _positive_int(config, "num_key_value_heads", problems,
                             default=config.get("num_attention_heads"))
    vocab = _positive_int(config, "vocab_size", problems)
    if config.get("head_dim") is not None:
        head_dim = _positive_int(config, "head_dim", problems)
    else:
        head_dim = hidden // heads
        if hidden % heads:
            problems.append({"field": "head_dim", "expected": "hidden_size divisible by "
                             "num_attention_heads", "found": [hidden, heads],
                             "problem": "no head_dim given and hidden_size is not a multiple of "
                                        "num_attention_heads"})
    if heads % kv_heads:
        problems.append({"field": "num_key_value_heads", "expected": f"a divisor of {heads}",
                         "found": kv_heads, "problem": "num_attention_heads is not a multiple of "
                                                       "num_key_value_heads"})
    architectures = config.get("architectures")
    architecture = SUPPORTED_FAMILIES[family]
    if architectures is not None:
        if (not isinstance(architectures, list) or not architectures
                or not all(isinstance(a, str) for a in architectures)):
            problems.append({"field": "architectures", "expected": "a list of class names",
                             "found": architectures, "problem": "architectures is malformed"})
        else:
            architecture = architectures[0]
    if problems:
        raise InvalidRequest(f"invalid {family} config for {name!r}: {problems[0]['problem']}",
                             details=problems)
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    modules = {
        "q_proj": [hidden, q_out], "k_proj": [hidden, kv_out], "v_proj": [hidden, kv_out],
        "o_proj": [q_out, hidden], "gate_proj": [hidden, intermediate],
        "up_proj": [hidden, intermediate], "down_proj": [intermediate, hidden],
    }
    return BaseModelInfo(name=name, revision=revision, architecture=architecture, family=family,
                         hidden_size=hidden, intermediate_size=intermediate, num_layers=layers,
                         num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                         vocab_size=vocab, modules=modules)


@dataclass(frozen=True, slots=True)
class _Module:
    key: str             # full name inside the model, e.g. model.layers.0.self_attn.q_proj
    short: str           # q_proj, embed_tokens, lm_head, input_layernorm ...
    kind: str            # linear | embedding | norm
    in_features: int
    out_features: int

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.kind == "norm":
            return (self.out_features,)
        if self.kind == "embedding":
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)


def _module_table(base: BaseModelInfo) -> dict[str, _Module]:
    table: dict[str, _Module] = {
        "model.embed_tokens": _Module("model.embed_tokens", "embed_tokens", "embedding",
                                      base.vocab_size, base.hidden_size),
        "lm_head": _Module("lm_head", "lm_head", "linear", base.hidden_size, base.vocab_size),
        "model.norm": _Module("model.norm", "norm", "norm", base.hidden_size, base.hidden_size),
    }
    for i in range(base.num_layers):
        for short, (fin, fout) in base.modules.items():
            group = "self_attn" if short in ATTENTION_MODULES else "mlp"
            key = f"model.layers.{i}.{group}.{short}"
            table[key] = _Module(key, short, "linear", fin, fout)
        for short in ("input_layernorm", "post_attention_layernorm"):
            key = f"model.layers.{i}.{short}"
            table[key] = _Module(key, short, "norm", base.hidden_size, base.hidden_size)
        if base.family == "qwen3":
            for short in ("q_norm", "k_norm"):
                key = f"model.layers.{i}.self_attn.{short}"
                table[key] = _Module(key, short, "norm", base.head_dim, base.head_dim)
    return table


# --- adapter configs ---------------------------------------------------------------------------

_UNSUPPORTED_FEATURES = ("layer_replication", "target_parameters", "trainable_token_indices")
_REGEX_CHARS = set("*+?[](){}|^$\\")


def _is_pattern(target: str) -> bool:
    return target == "all-linear" or any(ch in _REGEX_CHARS for ch in target)


def validate_adapter_config(cfg: dict[str, Any]) -> PeftEssentials:
    """Check a PEFT ``adapter_config.json`` (as a dict) and keep what serving needs.

    ``target_modules`` as a list is kept as given; a regex string or ``"all-linear"`` becomes a
    one-element list holding it, resolved against a base model by :func:`targeted_modules`.
    Raises InvalidAdapter whose ``details`` lists every problem as ``{"field", "problem"}``.
    """
    if not isinstance(cfg, dict):
        raise InvalidAdapter("adapter_config.json must be a JSON object",
                             details=[{"field": None, "problem": "not an object"}])
    problems: list[dict[str, Any]] = []

    def bad(field: str, problem: str, found: Any = None) -> None:
        problems.append({"field": field, "found": found, "problem": problem})

    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise InvalidAdapter(f"only LoRA adapters are accepted, this one is {peft_type!r}",
                             details=[{"field": "peft_type", "found": peft_type,
                                       "problem": "peft_type must be LORA"}])
    r = cfg.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        bad("r", "r must be a positive integer", r)
    alpha = cfg.get("lora_alpha", 8)
    if (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
            or not math.isfinite(alpha)):
        bad("lora_alpha", "lora_alpha must be a finite number", alpha)

    targets = cfg.get("target_modules")
    target_list: list[str] = []
    if isinstance(targets, str):
        if targets != "all-linear":
            try:
                re.compile(targets)
            except re.error as exc:
                bad("target_modules", f"target_modules is not a valid regular expression: {exc}",
                    targets)
        target_list = [targets]
    elif isinstance(targets, list) and targets and all(
            isinstance(t, str) and t for t in targets):
        target_list = list(targets)
    else:
        bad("target_modules", "target_modules must be a non-empty list of module names, a "
            "regular expression or 'all-linear'", targets)

    flags: dict[str, bool] = {}
    for key in ("use_rslora", "use_dora"):
        value = cfg.get(key, False)
        if value is None:
            value = False
        if not isinstance(value, bool):
            bad(key, f"{key} must be true or false", value)
        flags[key] = bool(value)

    modules_to_save = cfg.get("modules_to_save")
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    if modules_to_save is not None and not (
            isinstance(modules_to_save, list)
            and all(isinstance(m, str) and m for m in modules_to_save)):
        bad("modules_to_save", "modules_to_save must be a list of module names", modules_to_save)
        modules_to_save = None

    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    for field, pattern, check in (
            ("rank_pattern", rank_pattern,
             lambda v: not isinstance(v, bool) and isinstance(v, int) and v > 0),
            ("alpha_pattern", alpha_pattern,
             lambda v: not isinstance(v, bool) and isinstance(v, (int, float))
             and math.isfinite(v))):
        if not isinstance(pattern, dict):
            bad(field, f"{field} must be an object", pattern)
            continue
        for key, value in pattern.items():
            try:
                re.compile(key)
            except re.error as exc:
                bad(field, f"{field} key {key!r} is not a valid regular expression: {exc}", key)
            if not check(value):
                bad(field, f"{field}[{key!r}] must be a positive integer" if field == "rank_pattern"
                    else f"{field}[{key!r}] must be a finite number", value)

    bias = cfg.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        bad("bias", "bias must be 'none', 'all' or 'lora_only'", bias)
    for key in _UNSUPPORTED_FEATURES:
        if cfg.get(key):
            bad(key, f"{key} is not supported", cfg.get(key))

    if problems:
        raise InvalidAdapter(f"invalid adapter_config.json: {problems[0]['problem']}"
                             + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
                             details=problems)
    return PeftEssentials(
        peft_type="LORA", r=r, lora_alpha=float(alpha), target_modules=target_list,
        use_rslora=flags["use_rslora"], use_dora=flags["use_dora"],
        modules_to_save=modules_to_save, rank_pattern=dict(rank_pattern),
        alpha_pattern={k: float(v) for k, v in alpha_pattern.items()}, bias=bias)


# --- resolution against a base model -----------------------------------------------------------

def _saved(key: str, modules_to_save: Iterable[str] | None) -> bool:
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in modules_to_save or ())


def _is_targeted(peft: PeftEssentials, module: _Module) -> bool:
    if module.kind == "norm" or _saved(module.key, peft.modules_to_save):
        return False
    targets = peft.target_modules
    if len(targets) == 1 and _is_pattern(targets[0]):
        if targets[0] == "all-linear":
            return module.kind == "linear" and module.short != "lm_head"
        return re.fullmatch(targets[0], module.key) is not None
    return any(module.key == t or module.key.endswith("." + t) for t in targets)


def _rank(peft: PeftEssentials, key: str) -> int:
    for pattern, rank in peft.rank_pattern.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return rank
    return peft.r


def targeted_modules(peft: PeftEssentials, base: BaseModelInfo) -> list[str]:
    """Full names of the base modules ``peft`` puts LoRA on, like ``model.layers.0.mlp.up_proj``."""
    return [m.key for m in _module_table(base).values() if _is_targeted(peft, m)]


def _lora_shapes(module: _Module, r: int) -> dict[str, tuple[int, ...]]:
    if module.kind == "embedding":
        return {"lora_embedding_A": (r, module.in_features),
                "lora_embedding_B": (module.out_features, r)}
    return {"lora_A.weight": (r, module.in_features), "lora_B.weight": (module.out_features, r)}


def expected_lora_tensors(peft: PeftEssentials,
                          base: BaseModelInfo) -> dict[str, tuple[int, ...]]:
    """Every LoRA tensor a complete adapter ``peft`` for ``base`` holds, with its shape."""
    out: dict[str, tuple[int, ...]] = {}
    for module in _module_table(base).values():
        if not _is_targeted(peft, module):
            continue
        for suffix, shape in _lora_shapes(module, _rank(peft, module.key)).items():
            out[f"{PREFIX}{module.key}.{suffix}"] = shape
        if peft.use_dora and module.kind == "linear":
            out[f"{PREFIX}{module.key}.lora_magnitude_vector"] = (module.out_features,)
    return out


_TENSOR_RE = re.compile(
    r"^(?P<module>.+?)\.(?P<what>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_A\.bias"
    r"|lora_embedding_A|lora_embedding_B|lora_magnitude_vector(?:\.weight)?"
    r"|base_layer\.weight|weight|bias)$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


class _Checker:
    """Collects every problem of one adapter against one base model."""

    def __init__(self, peft: PeftEssentials, base: BaseModelInfo, allowed: tuple[str, ...]):
        self.peft, self.base, self.allowed = peft, base, allowed
        self.table = _module_table(base)
        self.problems: list[dict[str, Any]] = []
        self.seen: dict[str, set[str]] = {}      # module key -> LoRA tensor kinds present
        self._targeted: dict[str, bool] = {}
        self._shapes: dict[str, dict[str, tuple[int, ...]]] = {}

    def targeted(self, module: _Module) -> bool:
        hit = self._targeted.get(module.key)
        if hit is None:
            hit = self._targeted[module.key] = _is_targeted(self.peft, module)
        return hit

    def lora_shapes(self, module: _Module) -> dict[str, tuple[int, ...]]:
        """The LoRA tensor shapes of ``module`` at its rank (``rank_pattern`` applied)."""
        shapes = self._shapes.get(module.key)
        if shapes is None:
            shapes = self._shapes[module.key] = _lora_shapes(module, _rank(self.peft, module.key))
        return shapes

    def report(self, tensor: str | None, expected: Any, found: Any, problem: str,
               **extra: Any) -> None:
        if len(self.problems) < _MAX_PROBLEMS:
            self.problems.append({"tensor": tensor, "expected": expected, "found": found,
                                  "problem": problem, **extra})

    def shape(self, name: str, meta: TensorMeta, expected: tuple[int, ...], what: str) -> None:
        if tuple(meta.shape) != expected:
            self.report(name, list(expected), list(meta.shape), f"wrong {what} shape")

    def tensor(self, name: str, meta: TensorMeta) -> None:
        if meta.dtype not in self.allowed:
            self.report(name, list(self.allowed), meta.dtype, "dtype not allowed")
        if not name.startswith(PREFIX):
            self.report(name, f"{PREFIX}<module>...", name,
                        f"tensor name does not start with {PREFIX!r}")
            return
        match = _TENSOR_RE.match(name[len(PREFIX):])
        if match is None:
            self.report(name, None, name, "not a LoRA tensor name")
            return
        key, what = match["module"], match["what"]
        module = self.table.get(key)
        if module is None:
            layer = _LAYER_RE.match(key)
            if layer and int(layer[1]) >= self.base.num_layers:
                self.report(name, f"layer index < {self.base.num_layers}", int(layer[1]),
                            "layer index out of range")
            else:
                self.report(name, sorted({m.short for m in self.table.values()}), key,
                            "unknown module")
            return
        if what in ("weight", "bias", "base_layer.weight"):
            self.full_tensor(name, meta, module, what)
        else:
            self.lora_tensor(name, meta, module, what.removesuffix(".weight")
                             if what.startswith("lora_magnitude_vector") else what)

    def full_tensor(self, name: str, meta: TensorMeta, module: _Module, what: str) -> None:
        """A base weight saved beside the LoRA pairs (modules_to_save, biases, base layers)."""
        saved = _saved(module.key, self.peft.modules_to_save)
        if what == "base_layer.weight":
            if not (self.targeted(module) and module.short in ("embed_tokens", "lm_head")):
                self.report(name, None, module.key, "base layer weights are saved only for "
                            "targeted embedding and output layers")
            else:
                self.shape(name, meta, module.weight_shape, "weight")
        elif what == "weight":
            if not saved:
                self.report(name, "a module in modules_to_save", module.key,
                            "full weight of a module not in modules_to_save")
            else:
                self.shape(name, meta, module.weight_shape, "weight")
        elif saved or (self.peft.bias in ("all", "lora_only") and module.kind == "linear"):
            self.shape(name, meta, (module.out_features,), "bias")
        else:
            self.report(name, "bias 'all' or 'lora_only'", self.peft.bias,
                        "bias tensor but the config saves no biases")

    def lora_tensor(self, name: str, meta: TensorMeta, module: _Module, what: str) -> None:
        if not self.targeted(module):
            self.report(name, self.peft.target_modules, module.key,
                        "module is not in target_modules")
        self.seen.setdefault(module.key, set()).add(what)
        if what == "lora_magnitude_vector":
            if not self.peft.use_dora:
                self.report(name, "use_dora true", False,
                            "DoRA magnitude vector but use_dora is false")
            elif module.kind == "linear":
                self.shape(name, meta, (module.out_features,), "DoRA magnitude")
            return
        if module.kind == "norm":
            self.report(name, None, module.key, "LoRA on a normalisation layer")
            return
        if what.startswith("lora_embedding") != (module.kind == "embedding"):
            self.report(name, "lora_embedding_A/B" if module.kind == "embedding"
                        else "lora_A/lora_B", what,
                        f"wrong LoRA tensor kind for a {module.kind} module")
            return
        if what == "lora_B.bias":
            self.shape(name, meta, (module.out_features,), "lora_B bias")
        elif what == "lora_A.bias":
            self.report(name, None, what, "lora_A has no bias")
        else:
            expected = self.lora_shapes(module)[what]
            self.shape(name, meta, expected, what.split(".")[0])

    def pairs(self) -> None:
        """Every A has its B (and the reverse); DoRA modules have their magnitude vector."""
        for key, parts in self.seen.items():
            module = self.table[key]
            if module.kind == "norm":
                continue
            a, b = (("lora_embedding_A", "lora_embedding_B") if module.kind == "embedding"
                    else ("lora_A.weight", "lora_B.weight"))
            shapes = self.lora_shapes(module)
            for have, missing in ((a, b), (b, a)):
                if have in parts and missing not in parts:
                    self.report(f"{PREFIX}{key}.{missing}", list(shapes[missing]), None,
                                f"missing {missing.split('.')[0]} for {have.split('.')[0]}")
            if (self.peft.use_dora and module.kind == "linear" and (a in parts or b in parts)
                    and "lora_magnitude_vector" not in parts):
                self.report(f"{PREFIX}{key}.lora_magnitude_vector", [module.out_features],
                            None, "missing DoRA magnitude vector")

    def targets(self) -> None:
        """Every target module exists in the architecture and carries LoRA tensors."""
        targets = self.peft.target_modules
        arch = self.base.architecture
        if len(targets) == 1 and _is_pattern(targets[0]):
            if not any(self.targeted(m) for m in self.table.values()):
                self.report(None, "a pattern matching a module of this architecture",
                            targets[0], f"target_modules matches no module of {arch}",
                            module=targets[0])
        else:
            names = sorted({m.short for m in self.table.values() if m.kind != "norm"})
            for target in targets:
                hits = [m for m in self.table.values()
                        if m.key == target or m.key.endswith("." + target)]
                if not hits or all(m.kind == "norm" for m in hits):
                    self.report(None, names, target, f"target module not in {arch}",
                                module=target)
                elif not any(m.key in self.seen for m in hits):
                    self.report(None, "LoRA tensors for this module", None,
                                "target module has no LoRA tensors", module=target)
        if not self.seen:
            self.report(None, "at least one lora_A/lora_B pair", None,
                        "adapter has no LoRA tensors")


def check_adapter_against_base(peft: PeftEssentials, tensors: Mapping[str, TensorMeta],
                               base: BaseModelInfo, *,
                               allowed_dtypes: Iterable[str] = ALLOWED_DTYPES) -> None:
    """Raise one IncompatibleAdapter listing every way ``tensors`` disagree with ``base``.

    Each problem is ``{"tensor", "expected", "found", "problem"}`` (plus ``"module"`` for
    problems about a target module rather than a tensor): unknown modules, layer indexes out of
    range, wrong A/B shapes (the rank taken from ``rank_pattern`` where it applies), dtypes not
    allowed, A without B, DoRA vectors missing or unexpected, target modules absent.
    """
    checker = _Checker(peft, base, tuple(allowed_dtypes))
    for name, meta in tensors.items():
        checker.tensor(name, meta)
    checker.pairs()
    checker.targets()
    if checker.problems:
        found = checker.problems
        first = found[0]
        where = first["tensor"] or first.get("module") or ""
        raise IncompatibleAdapter(
            f"adapter is incompatible with base model {base.name}: {len(found)} problem(s); "
            f"first: {where}: {first['problem']} (expected {first['expected']}, "
            f"found {first['found']})",
            details=found)


def adapter_stats(tensors: Mapping[str, TensorMeta]) -> tuple[int, str | None]:
    """(parameter count, dominant dtype as a torch-style name such as ``float16``)."""
    count = 0
    by_dtype: Counter[str] = Counter()
    for meta in tensors.values():
        n = math.prod(meta.shape)
        count += n
        by_dtype[meta.dtype] += n
    if not by_dtype:
        return 0, None
    dominant = max(by_dtype.items(), key=lambda item: (item[1], item[0]))[0]
    return count, DTYPE_NAMES.get(dominant, dominant.lower())
