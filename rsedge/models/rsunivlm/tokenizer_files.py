"""A Qwen2-style byte-level BPE tokenizer, trained offline, written in the released file layout.

The released checkpoint ships tokenizer.json, tokenizer_config.json, vocab.json, merges.txt,
added_tokens.json and special_tokens_map.json. We cannot download Qwen's, so checkpoints made here carry
a small BPE with the same pre-tokenizer (digits split one by one, which keeps 0-100 boxes regular) and
the ChatML special tokens appended after the learned vocabulary, as Qwen does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer

from rsedge.models.tokenizer_corpus import added_tokens_decoder, qwen2_byte_level

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE_JINJA = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_tokenizer(vocab_size: int, extra_text: Iterable[str] = ()) -> Tokenizer:
    return qwen2_byte_level(vocab_size, SPECIAL_TOKENS, extra_text)


def write_tokenizer_files(tok: Tokenizer, out: Path, model_max_length: int = 32768) -> dict[str, int]:
    """Write the released set of tokenizer files; returns the special token ids."""
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out))  # vocab.json + merges.txt
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    (out / "added_tokens.json").write_text(json.dumps(ids, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
                "eos_token": {
                    "content": "<|im_end|>",
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                },
                "pad_token": {
                    "content": "<|endoftext|>",
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                },
            },
            indent=2,
        )
        + "\n"
    )
    added = added_tokens_decoder(ids)
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_prefix_space": False,
                "added_tokens_decoder": added,
                "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
                "bos_token": None,
                "chat_template": CHAT_TEMPLATE_JINJA,
                "clean_up_tokenization_spaces": False,
                "eos_token": "<|im_end|>",
                "errors": "replace",
                "model_max_length": model_max_length,
                "pad_token": "<|endoftext|>",
                "split_special_tokens": False,
                "tokenizer_class": "Qwen2Tokenizer",
                "unk_token": None,
            },
            indent=2,
        )
        + "\n"
    )
    return ids
