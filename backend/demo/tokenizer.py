"""The demo's character-level tokenizer, written as a Hugging Face fast tokenizer folder.

One token per character of :data:`quiver.backend.demo.tasks.CHARACTERS` plus four special
tokens; unknown characters become ``<unk>``. Encoding with special tokens prepends ``<s>``.
The chat template renders the last user message in the prompt format of
:func:`quiver.backend.demo.tasks.render_prompt`, so a chat request and a completion request for
the same text give the same token ids.
"""

from __future__ import annotations

import json
from pathlib import Path

from quiver.backend.demo.tasks import BOS, EOS, PAD, SPECIAL_TOKENS, UNK, VOCAB

__all__ = ["CHAT_TEMPLATE", "write_tokenizer", "build_tokenizer"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(text='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{%- set ns.text = message['content'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{ ns.text | trim }}{{ '\\n' }}"
)


def build_tokenizer():  # -> tokenizers.Tokenizer
    """The raw ``tokenizers.Tokenizer``: BPE with no merges over single characters."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    tok = Tokenizer(models.BPE(vocab=dict(VOCAB), merges=[], unk_token=UNK, fuse_unk=False))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, VOCAB[BOS])])
    return tok


def write_tokenizer(out_dir: Path, *, max_length: int) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (with the chat template)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK,
        "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
