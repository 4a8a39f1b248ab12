"""A small Qwen2-style byte-level BPE with Qwen2.5-VL's special tokens, in the released file layout.

Qwen's own tokenizer cannot be downloaded here, so test checkpoints carry a BPE learned on remote-sensing prompt
text (``rsedge.models.tokenizer_corpus``, with Qwen2's pre-tokenizer: digits one by one) plus grounding answers in the
``<think>..</think><answer>..</answer>`` form with ``bbox_2d`` boxes, and the special tokens of Qwen2.5-VL's
template appended after the learned pieces, in Qwen's order.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from rsedge.models.tokenizer_corpus import added_tokens_decoder, qwen2_byte_level

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
GROUNDING_LINES = (
    "<think>The storage tank is the round white object near the top left.</think>"
    '<answer>[{"bbox_2d": [12, 40, 200, 310], "label": "storage tank"}]</answer>',
    '<answer>{"bbox_2d": [305, 118, 377, 196]}</answer>',
    "Locate the ship in the harbor and output its bbox coordinates in JSON format.",
    "Please provide the bounding box coordinate of the region this sentence describes: the largest airplane.",
)
CHAT_TEMPLATE_JINJA = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_tokenizer(vocab_size: int) -> Tokenizer:
    return qwen2_byte_level(vocab_size, SPECIAL_TOKENS, GROUNDING_LINES)


def write_tokenizer_files(tok: Tokenizer, out: Path, model_max_length: int = 32768) -> dict[str, int]:
    """tokenizer.json, vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json; returns the
    special token ids."""
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out))  # vocab.json + merges.txt
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    extra = [t for t in SPECIAL_TOKENS if t != "<|endoftext|>"]
    (out / "special_tokens_map.json").write_text(
        json.dumps(
            {"additional_special_tokens": extra, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, indent=2
        )
        + "\n"
    )
    added = added_tokens_decoder(ids)
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": extra,
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
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ids
