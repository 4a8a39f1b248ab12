"""Pipeline.generate's ``on_token`` pieces add up to ``Answer.text``, also when the answer ends in a multi-byte
character (the token decoder holds back an unfinished UTF-8 sequence: an answer cut mid-character must still stream
its last character). The tokens are forced, so the test does not depend on what the random tiny model says."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from rsedge.runtime import pipeline as pipeline_module
from rsedge.runtime.pipeline import Pipeline

TEXT = "the tank 中"  # byte-level BPE: 中 is three tokens, one per UTF-8 byte


class Forced:
    """A sampler that answers the given token ids in order, whatever the logits."""

    def __init__(self, ids: list[int]) -> None:
        self.ids: Iterator[int] = iter(ids)

    def __call__(self, logits: np.ndarray) -> int:
        return next(self.ids)


@pytest.fixture(scope="module")
def pipe(tiny_bundle) -> Pipeline:
    return Pipeline.load(tiny_bundle)


def _streamed(pipe: Pipeline, samples, monkeypatch, ids: list[int], max_new_tokens: int) -> tuple[str, list[str]]:
    monkeypatch.setattr(pipeline_module, "Sampler", lambda sampling: Forced(ids))
    pieces: list[str] = []
    ans = pipe.generate([samples / "dior_05863.png"], "[CAP] x", max_new_tokens=max_new_tokens, on_token=pieces.append)
    assert ans.tokens == ids[:max_new_tokens]
    return ans.text, pieces


def test_an_answer_cut_inside_a_character_streams_its_last_character(pipe, samples, monkeypatch):
    ids = pipe.tokenizer.encode(TEXT, add_special_tokens=False).ids
    assert pipe.tokenizer.decode(ids[-3:]) == "中"  # the case under test: one character over three tokens
    text, pieces = _streamed(pipe, samples, monkeypatch, ids, max_new_tokens=len(ids) - 1)
    assert text == "the tank \ufffd"  # two of 中's three bytes: the replacement character, as decode gives it
    assert "".join(pieces) == text
    assert pieces[-1] == "\ufffd"


def test_an_answer_ending_in_a_whole_multibyte_character(pipe, samples, monkeypatch):
    ids = pipe.tokenizer.encode(TEXT, add_special_tokens=False).ids
    eos = min(pipe.stop_ids)
    for forced, budget in ((ids, len(ids)), ([*ids, eos], len(ids) + 5)):  # cut by the budget, stopped by EOS
        text, pieces = _streamed(pipe, samples, monkeypatch, forced, max_new_tokens=budget)
        assert text == TEXT and "".join(pieces) == TEXT


def test_rsedge_run_stream_prints_the_whole_answer(tiny_bundle, pipe, samples, monkeypatch):
    """The issue as users met it: ``rsedge run --stream`` printed the answer without its last character."""
    from tests.test_bad_input import run

    ids = pipe.tokenizer.encode(TEXT, add_special_tokens=False).ids[:-1]
    monkeypatch.setattr(pipeline_module, "Sampler", lambda sampling: Forced(ids))
    res = run("run", tiny_bundle, "--image", samples / "dior_05863.png", "--prompt", "[CAP] x", "--stream",
              "--max-new-tokens", str(len(ids)))  # fmt: skip
    assert res.exit_code == 0, res.output
    assert res.stdout == "the tank \ufffd\n"
