"""What test checkpoints' tokenizers learn from, shared by every architecture's ``tokenizer_files``: prompt-shaped
remote-sensing text (task tags, boxes, run-length masks, scene words) and one BPE learning step on it.

The released tokenizers cannot be downloaded here, so each architecture trains a small one in its own layout
(RSUniVLM a Qwen2-style byte-level BPE, UniRS a LLaMA-style Metaspace BPE with byte fallback) on this corpus.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# Qwen2's pre-tokenizer split (digits one by one, which keeps boxes regular): RSUniVLM's and Qwen2.5-VL's
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Remote-sensing words so a small vocabulary still covers the task text in whole pieces.
RS_CORPUS_WORDS = (
    "airport aircraft airplane harbor harbour ship ships boat vehicle vehicles car truck bus road roads river "
    "lake pond water forest farmland field fields meadow bare land desert mountain beach bridge overpass "
    "building buildings house houses residential dense sparse medium industrial commercial church school "
    "stadium playground park parking lot storage tank tanks baseball basketball tennis court soccer "
    "ground track swimming pool windmill dam railway station viaduct center square port resort "
    "others change changes changed new removed added construction demolished no there is are a an the "
    "of in on at to from with and or near next left right upper lower top bottom middle center largest "
    "smallest biggest north south east west image images scene aerial satellite remote sensing photo "
    "how many what where which is this describe briefly please segment classify the area that have "
    "in these two first second yes no count number color red white blue green gray grey dark light "
    "small large long wide round rectangular several some one two three four five six seven eight nine ten"
)


def training_corpus(extra: Iterable[str] = ()) -> list[str]:
    """Prompt-shaped lines (tags, boxes, run-length masks) plus any task text the caller supplies."""
    words = RS_CORPUS_WORDS.split()
    lines = [
        "[CAP] Describe this image briefly.",
        "[VG] Where is the windmill?",
        "[SEG] water.",
        "[VQA] How many basketball courts?",
        "[REF] what is [1, 20, 9, 30]?",
        "[CLS] What is the category of this image?",
        "[CCD] Please briefly describe the changes in these two images.",
        "[SEG] Please segment the building area that have changed in the second image.",
        "You are a helpful assistant.",
    ]
    for k, w in enumerate(words):
        a, b = words[(k * 7) % len(words)], words[(k * 13) % len(words)]
        lines.append(f"There is a {w} near the {a} and {b}.")
        lines.append(f"[{k % 100}, {(k * 3) % 100}, {(k * 7) % 100}, {(k * 11) % 100}]")
        lines.append(f"others*{k % 16 + 1}, {w}*{(k * 5) % 16 + 1}, others*{(k * 3) % 16 + 1}")
    lines.extend(extra)
    return lines


def learn_pieces(tok: Tokenizer, vocab_size: int, extra: Iterable[str] = (), alphabet: Sequence[str] = ()) -> None:
    """Train ``tok``'s BPE model in place on the corpus (plus ``extra`` lines) up to ``vocab_size`` pieces,
    ``alphabet`` given as initial pieces (a byte-level tokenizer's 256 byte symbols)."""
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=list(alphabet), show_progress=False)
    tok.train_from_iterator(training_corpus(extra), trainer=trainer)


def qwen2_byte_level(vocab_size: int, specials: Sequence[str], extra: Iterable[str] = ()) -> Tokenizer:
    """A Qwen2-style tokenizer (NFC, Qwen2's split, byte-level BPE) of ``vocab_size`` pieces learned on the corpus,
    ``specials`` added last: RSUniVLM's and Qwen2.5-VL's test tokenizers."""
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    learn_pieces(tok, vocab_size - len(specials), extra, pre_tokenizers.ByteLevel.alphabet())
    tok.add_special_tokens(list(specials))
    return tok


def added_tokens_decoder(ids: dict[str, int]) -> dict[str, dict[str, object]]:
    """tokenizer_config.json's ``added_tokens_decoder`` for special tokens (content -> id)."""
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    return {str(i): {"content": t, **flags} for t, i in ids.items()}
