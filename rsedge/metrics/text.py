"""Exact-match accuracy for [VQA] and [CLS] answers."""

from __future__ import annotations

from collections.abc import Sequence

_UNITS = {
    "zero": 0,
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
    "thirteen": 13,
    "fourteen": 14,
    "fifteen": 15,
    "sixteen": 16,
    "seventeen": 17,
    "eighteen": 18,
    "nineteen": 19,
}
_TENS = {
    "twenty": 20,
    "thirty": 30,
    "forty": 40,
    "fifty": 50,
    "sixty": 60,
    "seventy": 70,
    "eighty": 80,
    "ninety": 90,
}


def _number_words_to_digits(tokens: list[str]) -> list[str]:
    """Replace number words 0-99 ("three", "twenty-one", "twenty one") by digits."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        tens, _, unit = token.partition("-")
        if token in _UNITS:
            out.append(str(_UNITS[token]))
        elif tens in _TENS and unit in _UNITS and 1 <= _UNITS[unit] <= 9:
            out.append(str(_TENS[tens] + _UNITS[unit]))
        elif token in _TENS:
            nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
            if nxt in _UNITS and 1 <= _UNITS[nxt] <= 9:
                out.append(str(_TENS[token] + _UNITS[nxt]))
                i += 1
            else:
                out.append(str(_TENS[token]))
        else:
            out.append(token)
        i += 1
    return out


def normalize_answer(text: str) -> str:
    """Lower-case, trim surrounding whitespace and one trailing period, collapse inner whitespace,
    and write number words (0-99) as digits: " Three." -> "3", "Twenty-one cars" -> "21 cars".
    """
    text = text.strip().lower()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return " ".join(_number_words_to_digits(text.split()))


def exact_match_accuracy(predictions: Sequence[str], targets: Sequence[str]) -> float:
    """Fraction of predictions equal to their target after ``normalize_answer`` (VQA, classification)."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    if not predictions:
        raise ValueError("no samples to score")
    hits = sum(normalize_answer(p) == normalize_answer(t) for p, t in zip(predictions, targets, strict=True))
    return hits / len(predictions)
