"""Caption metrics as in coco-caption (pycocoevalcap 1.2): corpus BLEU-1..4 and CIDEr-D.

Re-implemented here rather than depending on pycocoevalcap: its wheel is about 104 MB (it bundles the
Java tools for METEOR, SPICE and the PTB tokenizer) and pulls in pycocotools, while the two scorers used
here are a few dozen lines of pure Python. The algorithms follow ``bleu/bleu_scorer.py`` and
``cider/cider_scorer.py`` of that release step for step, quirks included (noted inline), so numbers are
comparable with published ones.

Tokenisation replaces coco-caption's Java PTBTokenizer: lower-case, punctuation replaced by spaces,
split on whitespace (``tokenize_caption``). Captions are tokenised the same way on both sides.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_PUNCTUATION = re.compile(r"[^\w\s]")
MAX_N = 4
CIDER_SIGMA = 6.0


def tokenize_caption(text: str) -> list[str]:
    """Lower-case, punctuation to spaces, split on whitespace: "A road, built." -> ["a", "road", "built"]."""
    return _PUNCTUATION.sub(" ", text.lower()).split()


def _ngrams(words: Sequence[str], n: int = MAX_N) -> Counter[tuple[str, ...]]:
    """Counts of all 1..n-grams of a token list (coco-caption's ``precook``)."""
    counts: Counter[tuple[str, ...]] = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def _check(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference sets")
    if not predictions:
        raise ValueError("no samples to score")
    if isinstance(references, str) or any(isinstance(refs, str) or len(refs) == 0 for refs in references):
        raise ValueError("each sample needs a non-empty list of reference captions")


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]], n: int = MAX_N) -> list[float]:
    """Corpus-level BLEU-1..n as coco-caption's ``Bleu(4)`` computes it.

    Clipped n-gram matches and candidate n-gram counts are summed over the corpus; the reference length
    of each sample is the reference length closest to the candidate's (ties to the shorter); the
    brevity penalty ``exp(1 - r/c)`` uses the corpus totals and applies when c < r. coco-caption's
    smoothing constants are kept (1e-15 added to matches, 1e-9 to counts), so a corpus with no 4-gram
    match scores about 1e-4 rather than exactly 0.
    """
    _check(predictions, references)
    tiny, small = 1e-15, 1e-9
    correct = [0] * n
    guess = [0] * n
    test_total = 0
    ref_total = 0
    for prediction, refs in zip(predictions, references, strict=True):
        words = tokenize_caption(prediction)
        max_counts: dict[tuple[str, ...], int] = {}
        ref_lens = []
        for ref in refs:
            ref_words = tokenize_caption(ref)
            ref_lens.append(len(ref_words))
            for gram, count in _ngrams(ref_words, n).items():
                max_counts[gram] = max(max_counts.get(gram, 0), count)
        test_len = len(words)
        test_total += test_len
        ref_total += min((abs(length - test_len), length) for length in ref_lens)[1]  # "closest"
        for gram, count in _ngrams(words, n).items():
            correct[len(gram) - 1] += min(max_counts.get(gram, 0), count)
        for k in range(1, n + 1):
            guess[k - 1] += max(0, test_len - k + 1)
    scores = []
    product = 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_total + tiny) / (ref_total + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def bleu4(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 (coco-caption definition, see ``bleu``), on a 0-1 scale."""
    return bleu(predictions, references, MAX_N)[MAX_N - 1]


def cider_d_scores(
    predictions: Sequence[str], references: Sequence[Sequence[str]], sigma: float = CIDER_SIGMA
) -> list[float]:
    """Per-sample CIDEr-D as coco-caption's ``Cider`` computes it (its mean is the corpus score).

    For n = 1..4 each caption becomes a TF-IDF vector of its n-grams: tf is the raw count, idf is
    ``log(N) - log(max(1, df))`` with N the number of samples and df the number of samples whose
    references contain the n-gram. Per reference, the candidate's weights are clipped to the
    reference's (``min(c, r) * r``), divided by both norms, and multiplied by the Gaussian length
    penalty ``exp(-delta^2 / (2 sigma^2))``. Scores average over n and over references, times 10.
    With a single sample every idf is 0, so CIDEr-D needs a corpus: score all samples in one call.
    """
    _check(predictions, references)
    cooked_refs = [[_ngrams(tokenize_caption(ref)) for ref in refs] for refs in references]
    cooked_tests = [_ngrams(tokenize_caption(prediction)) for prediction in predictions]
    doc_freq: Counter[tuple[str, ...]] = Counter()
    for refs in cooked_refs:
        doc_freq.update({gram for ref in refs for gram in ref})
    log_n = math.log(float(len(cooked_refs)))

    def vectorise(counts: Counter[tuple[str, ...]]) -> tuple[list[dict], list[float], int]:
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(MAX_N)]
        norm = [0.0] * MAX_N
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            vec[k][gram] = float(tf) * (log_n - math.log(max(1.0, doc_freq[gram])))
            norm[k] += vec[k][gram] ** 2
            # coco-caption quirk: the "length" is the bigram count (its `if n == 1` tests the 0-based
            # index), i.e. words - 1. Only differences are used, and an empty caption scores 0 anyway,
            # so this equals the word-length difference.
            if k == 1:
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def similarity(hyp, ref) -> list[float]:
        (vec_h, norm_h, len_h), (vec_r, norm_r, len_r) = hyp, ref
        penalty = math.exp(-(float(len_h - len_r) ** 2) / (2 * sigma**2))
        values = []
        for k in range(MAX_N):
            value = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec_h[k].items())
            if norm_h[k] != 0 and norm_r[k] != 0:
                value /= norm_h[k] * norm_r[k]
            values.append(value * penalty)
        return values

    scores = []
    for test, refs in zip(cooked_tests, cooked_refs, strict=True):
        hyp = vectorise(test)
        total = [0.0] * MAX_N
        for ref in refs:
            for k, value in enumerate(similarity(hyp, vectorise(ref))):
                total[k] += value
        scores.append(sum(total) / MAX_N / len(refs) * 10.0)
    return scores


def cider_d(predictions: Sequence[str], references: Sequence[Sequence[str]], sigma: float = CIDER_SIGMA) -> float:
    """Corpus CIDEr-D (coco-caption's "CIDEr"): the mean of ``cider_d_scores``; x10 scale."""
    scores = cider_d_scores(predictions, references, sigma)
    return sum(scores) / len(scores)


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """``{"bleu4": corpus BLEU-4 (0-1), "cider": CIDEr-D (x10 scale)}`` for captions and their references."""
    return {"bleu4": bleu4(predictions, references), "cider": cider_d(predictions, references)}
