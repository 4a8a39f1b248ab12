"""A reasoning budget for generation: watch the token stream, say which token ids to force, and when.

Reasoning models think in a ``<think>`` block before they answer. ``max_think_tokens=N``: once N tokens were
generated inside an open think block that the model has not closed, the ids of ``"</think>\\n<answer>"`` (the
bundle's tokenizer) are forced; the pipeline feeds them through the decoder like sampled tokens, so the KV cache
holds exactly the text the answer shows, and decoding goes on with the answer. ``think=False`` forces an empty
block, ``"<think>\\n</think>\\n<answer>"``, before the first sampled token (or ``"</think>\\n<answer>"`` when the
prompt itself opened the block).

Why an empty block rather than a family's "answer directly" instruction: it is family-independent, needs nothing the
bundle does not have (its tokenizer), and it is how R1-style chat templates turn thinking off (Qwen3's
``enable_thinking=False`` writes the same empty block): a model trained on the think/answer format sees the shape
it knows, with the reasoning already over. An instruction is a prompt change the model may ignore and the reference
run would need too.

Markers are found in the decoded text, not as id sequences: a byte-level BPE merges the marker's last ``>`` with
what follows (``">\\n"`` is one token in Qwen2's vocabulary), so the ids of ``"</think>"`` alone need not appear in a
stream that holds the text. Forced ids come from the tokenizer (``encode``), so they are the bundle's own.

Runtime module: the stdlib and tokenizers only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rsedge.errors import OptionError

# What a think block ended by (ThinkMonitor.stopped_by): the model closed it, the budget did, or it was skipped;
# "open" when generation stopped inside it.
BY_MODEL, BY_BUDGET, SKIPPED, STILL_OPEN = "model", "think-budget", "no-think", "open"


@dataclass(frozen=True)
class ThinkOptions:
    """``max_think_tokens``: reasoning tokens allowed before the block is closed for the model (None: no limit).
    ``think``: False skips reasoning (an empty block is forced first)."""

    max_think_tokens: int | None = None
    think: bool = True

    def __post_init__(self) -> None:
        n = self.max_think_tokens
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise OptionError(f"max_think_tokens must be a non-negative integer, got {n!r}")
        if not isinstance(self.think, bool):
            raise OptionError(f"think must be true or false, got {self.think!r}")
        if n is not None and not self.think:
            raise OptionError("max_think_tokens bounds reasoning; with think off there is none to bound")

    @property
    def active(self) -> bool:
        """Whether generation needs a monitor at all (without one it is exactly as before)."""
        return self.max_think_tokens is not None or not self.think


@dataclass(frozen=True)
class ThinkMarkers:
    """The texts of a think block. ``close_text`` is forced when the budget runs out, ``skip_text`` for think off.
    A bundle may name its own in ``manifest["prompt"]["reasoning"]`` (same keys)."""

    open: str = "<think>"
    close: str = "</think>"
    close_text: str = "</think>\n<answer>"
    skip_text: str = "<think>\n</think>\n<answer>"

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> ThinkMarkers:
        given = (manifest.get("prompt") or {}).get("reasoning") or {}
        return cls(**{k: str(v) for k, v in given.items() if k in cls.__dataclass_fields__})


class ThinkMonitor:
    """Follows one request's generated tokens; :meth:`start` and :meth:`feed` return the ids to force now.

    ``piece(id)`` is the text a token adds (a streaming decoder that keeps special tokens, so a marker that is a
    special token is seen too); ``encode(text)`` the tokenizer's ids of a text. ``prompt_open``: the prompt ends
    inside a think block (its template opened it), so the first generated token is reasoning already.
    """

    def __init__(
        self,
        options: ThinkOptions,
        markers: ThinkMarkers,
        encode: Callable[[str], list[int]],
        piece: Callable[[int], str],
        prompt_open: bool = False,
    ) -> None:
        self.options, self.markers = options, markers
        self._encode, self._piece = encode, piece
        self.prompt_open = prompt_open
        self.state = "thinking" if prompt_open else "before"
        self.think_tokens = 0  # tokens generated inside the block, the closing marker's own tokens excluded
        self.stopped_by: str | None = None
        # The generated text since the block opened (since the start, before it opens) is kept only as its length and
        # its last few characters (the window, starting at offset _window_start): enough to see a marker complete.
        self._length, self._window, self._window_start = 0, "", 0
        self._starts: list[int] = []  # the offset where each reasoning token's piece starts

    def start(self) -> list[int]:
        """Ids to force before the first sampled token: the empty block of think off, or a budget of 0 on a prompt
        that opened the block."""
        if not self.options.think:
            forced = self.markers.close_text if self.prompt_open else self.markers.skip_text
            return self._force(forced, SKIPPED)
        if self.state == "thinking" and self.options.max_think_tokens == 0:
            return self._force(self.markers.close_text, BY_BUDGET)
        return []

    def feed(self, token: int) -> list[int]:
        """Record one sampled token; the ids to force after it (empty almost always)."""
        if self.state == "closed":
            return []
        piece = self._piece(token)
        if self.state == "before":
            at = self._find(self.markers.open, piece)
            if at < 0:
                return []
            # the block opened: count from here; what the piece holds after the marker is reasoning text already
            rest = self._window[at - self._window_start + len(self.markers.open) :]
            self.state, self._length, self._window, self._window_start = "thinking", len(rest), rest, 0
            return self._over_budget()
        self._starts.append(self._length)
        at = self._find(self.markers.close, piece)
        if at >= 0:  # the model closed the block itself
            self.think_tokens = sum(1 for s in self._starts if s < at)
            self.state, self.stopped_by = "closed", BY_MODEL
            return []
        self.think_tokens = len(self._starts)
        return self._over_budget()

    def _find(self, marker: str, piece: str) -> int:
        """Append ``piece`` to the text; where ``marker`` starts in it if the piece completed it, else -1. Only the
        piece and the marker's length before it are searched (and kept), so a long reasoning costs linear time."""
        self._window_start = self._length - len(self._window)
        self._window += piece
        self._length += len(piece)
        local = self._window.find(marker)
        keep = len(marker) - 1
        if local >= 0:
            return self._window_start + local
        cut = max(0, len(self._window) - keep)
        self._window_start += cut
        self._window = self._window[cut:]
        return -1

    def _over_budget(self) -> list[int]:
        budget = self.options.max_think_tokens
        if budget is not None and self.think_tokens >= budget:
            return self._force(self.markers.close_text, BY_BUDGET)
        return []

    def _force(self, text: str, why: str) -> list[int]:
        ids = self._encode(text)
        for t in ids:  # keep the streaming decoder in step with what the decoder is fed
            self._piece(t)
        self.state, self.stopped_by = "closed", why
        return ids

    def report(self) -> dict[str, Any]:
        """For the answer's JSON: reasoning tokens, the budget, what ended the block."""
        return {
            "tokens": self.think_tokens,
            "budget": self.options.max_think_tokens,
            "stopped_by": self.stopped_by or (STILL_OPEN if self.state == "thinking" else None),
        }


def decoded_tail_open(tokenizer: Any, ids: Sequence[int], markers: ThinkMarkers, window: int = 16) -> bool:
    """Whether prompt ``ids`` end inside a think block (the template or a prefix opened it, e.g. "...<think>\\n")."""
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    text_ids = [int(i) for i in ids if 0 <= int(i) < vocab]  # image sentinels are no token
    tail = tokenizer.decode(text_ids[-window:], skip_special_tokens=False)
    at = tail.rfind(markers.open)
    return at >= 0 and markers.close not in tail[at:]


def _tokenizer_fns(tokenizer: Any) -> tuple[Callable[[str], list[int]], Callable[[int], str]]:
    """(encode, piece) of a ``tokenizers.Tokenizer``: piece is a streaming decoder of its own (special tokens kept)."""
    from tokenizers.decoders import DecodeStream

    stream = DecodeStream(skip_special_tokens=False)

    def piece(t: int) -> str:
        nonlocal stream
        try:
            return stream.step(tokenizer, t) or ""
        except Exception:  # tokenizers raises a bare Exception
            # DecodeStream refuses a special token after text with some decoders (a Metaspace "<s>": "Invalid
            # prefix encountered"): that token is decoded alone and the stream starts over after it.
            stream = DecodeStream(skip_special_tokens=False)
            return tokenizer.decode([t], skip_special_tokens=False)

    return (lambda text: tokenizer.encode(text, add_special_tokens=False).ids), piece


def monitor_for(tokenizer: Any, options: ThinkOptions, markers: ThinkMarkers, prompt_open: bool) -> ThinkMonitor:
    """The monitor of one request (``prompt_open``: see :func:`decoded_tail_open`)."""
    return ThinkMonitor(options, markers, *_tokenizer_fns(tokenizer), prompt_open=prompt_open)


def count_think_tokens(
    tokenizer: Any, tokens: Sequence[int], prompt_open: bool = False, markers: ThinkMarkers | None = None
) -> int | None:
    """Reasoning tokens of a finished answer's ids (a reference run's too), counted as the monitor counts them;
    None when the answer had no think block."""
    mon = ThinkMonitor(ThinkOptions(), markers or ThinkMarkers(), *_tokenizer_fns(tokenizer), prompt_open=prompt_open)
    for t in tokens:
        mon.feed(int(t))
    return None if mon.state == "before" else mon.think_tokens
