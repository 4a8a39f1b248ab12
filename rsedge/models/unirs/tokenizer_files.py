"""A LLaMA-style SentencePiece-like tokenizer for test checkpoints, in the ``llm/`` files VILA saves.

LLaMA's ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2 (the vicuna_v1 stop), the 256 byte-fallback pieces
``<0x00>``..``<0xFF>`` at 3..258, then the learned pieces. Spaces become ``▁`` and each encoded chunk gets a
leading ``▁`` (Metaspace, prepend "first"), as the original's slow tokenizer with ``legacy=False`` does; a
newline is not a learned piece, so it falls back to ``<0x0A>`` as in LLaMA's vocabulary. No
``tokenizer.model`` is written (no SentencePiece model is trained here): the runtime reads tokenizer.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from rsedge.models.tokenizer_corpus import learn_pieces

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
SPECIALS = (UNK, BOS, EOS)
BYTE_PIECES = tuple(f"<0x{b:02X}>" for b in range(256))
VICUNA_LINES = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is in this image? ASSISTANT: There is an airport.",
    "Please briefly describe the changes in these two images.",
    "What is the category of this video?",
)


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """Learn pieces on remote-sensing prompt text, then lay the vocabulary out with LLaMA's fixed ids."""
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    learn_pieces(learner, vocab_size - len(SPECIALS) - len(BYTE_PIECES), VICUNA_LINES)
    learned = sorted(learner.get_vocab().items(), key=lambda kv: kv[1])
    vocab = {t: i for i, t in enumerate((*SPECIALS, *BYTE_PIECES))}
    for piece, _ in learned:
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" ")) for m in _merges(learner)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK, byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(list(SPECIALS))
    # LLaMA's tokenizer.json adds BOS to a plain encode, as its slow tokenizer (add_bos_token) does.
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return tok


def _merges(learner: Tokenizer) -> list:
    # The trained model's merges are only reachable through its JSON form.
    return json.loads(learner.to_str())["model"]["merges"]


def write_tokenizer_files(tok: Tokenizer, out: Path, model_max_length: int = 4096) -> dict[str, int]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json; returns the special ids."""
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": UNK}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for t, i in ids.items()
        },
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": UNK,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "right",
        "tokenizer_class": "LlamaTokenizer",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ids
