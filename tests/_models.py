"""Builders for tiny random base models and real PEFT LoRA adapters (no hub access)."""

from __future__ import annotations

import json
from pathlib import Path

TINY_CONFIGS = {
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64,
                  intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
                  rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=64,
                  intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
                  rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", hidden_size=64,
                    intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
                    rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                    sliding_window=None),
}


def make_tiny_base(out: Path, family: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a tiny random model of ``family`` to ``out`` and return ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dict = {**TINY_CONFIGS[family], **overrides}
    model_type = cfg_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg_dict)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out, safe_serialization=True)
    return Path(out)


def make_peft_adapter(base_dir: Path, out: Path, *, r: int = 8, alpha: float | None = None,
                      target_modules: list[str] | str = ("q_proj", "v_proj"),
                      use_rslora: bool = False, seed: int = 0, init_scale: float = 0.05,
                      **lora_kwargs) -> Path:
    """Make a LoRA adapter for ``base_dir`` with peft, with non-zero B so it changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r,
                        target_modules=list(target_modules) if not isinstance(target_modules, str)
                        else target_modules,
                        use_rslora=use_rslora, lora_dropout=0.0, task_type="CAUSAL_LM",
                        **lora_kwargs)
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * init_scale)
    model.save_pretrained(out, safe_serialization=True)
    cfg = json.loads((Path(out) / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base_dir)
    (Path(out) / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return Path(out)
