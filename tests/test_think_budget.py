"""The think budget (``max_think_tokens``) and think off in the generation loop, on the built-in demo model.

The demo model was never trained to reason, so a think block is opened for it: the prompt's ids get the demo
tokenizer's ids of "<think>\\n" appended (as an R1-style template that opens the block does), and a [SEG] prompt
makes it write long run-length text, which here is its "reasoning". What is asserted is the mechanics: the forced ids
of "</think>\\n<answer>" sit exactly after N reasoning tokens, and the rest is what the decoder gives when the same
ids are fed by hand (greedy tokens identical, logits within 1e-4), so the KV cache holds what the answer shows.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from rsedge.errors import OptionError
from rsedge.runtime.pipeline import Pipeline
from rsedge.runtime.think import (
    BY_BUDGET,
    BY_MODEL,
    SKIPPED,
    ThinkMarkers,
    ThinkMonitor,
    ThinkOptions,
    count_think_tokens,
)

SEG = "[SEG] Please segment the windmill."
BUDGET = 7
NEW = 40


@pytest.fixture(scope="module")
def pipe(demo_bundle) -> Pipeline:
    return Pipeline.load(demo_bundle)


@pytest.fixture(scope="module")
def image(samples):
    return samples / "dior_05863.png"


def encode(pipe: Pipeline, text: str) -> list[int]:
    return pipe.tokenizer.encode(text, add_special_tokens=False).ids


@pytest.fixture
def opened(pipe, monkeypatch) -> list[int]:
    """The prompt ends with "<think>\\n": the block is open before the first generated token."""
    ids = encode(pipe, "<think>\n")
    plain = pipe.family.prompt_ids
    monkeypatch.setattr(pipe.family, "prompt_ids", lambda prompt, n: plain(prompt, n) + ids)
    return ids


def by_hand(pipe: Pipeline, image, prompt: str, script: list[int | None], keep: list[np.ndarray]) -> list[int]:
    """Decode greedily one token at a time; ``script`` says per position a token to feed instead (forced) or None
    (take the argmax). Each argmax step's logits go to ``keep``."""
    from PIL import Image

    pil = [Image.open(image).convert("RGB")]
    ids = pipe.family.prompt_ids(prompt, 1)
    dec = pipe.decoder(pipe.choose_expert(prompt))
    embeds = pipe.embed(ids, pipe.family.images_to_tokens(pil, pipe.run_vision, pipe.run_graph), dec.dtype)
    state = dec.new_state(embeds.shape[1] + len(script))
    logits = pipe.prefill(dec, embeds, state)
    out = []
    for want in script:
        if want is None:
            keep.append(logits.copy())
            tok = int(np.argmax(logits))
        else:
            tok = want
        out.append(tok)
        logits = dec.step(pipe.embed_rows([tok])[None].astype(dec.dtype, copy=False), state)
    return out


def test_the_budget_forces_the_close_after_n_reasoning_tokens(pipe, image, opened, monkeypatch):
    close = encode(pipe, "</think>\n<answer>")
    dec, states = pipe.decoder(pipe.choose_expert(SEG)), []
    new_state = dec.new_state
    monkeypatch.setattr(dec, "new_state", lambda capacity: states.append(new_state(capacity)) or states[-1])
    ans = pipe.generate([image], SEG, max_new_tokens=NEW, think=ThinkOptions(max_think_tokens=BUDGET), keep_logits=True)
    # the KV cache holds the prompt and every answer token but the last (eos, or the one the budget cut): forced ids too
    assert states[0].length == ans.prompt_tokens + len(ans.tokens) - 1
    assert ans.tokens[BUDGET : BUDGET + len(close)] == close
    assert close not in [ans.tokens[i : i + len(close)] for i in range(BUDGET)]  # not earlier
    assert ans.think == {"tokens": BUDGET, "budget": BUDGET, "stopped_by": BY_BUDGET}
    free = pipe.generate([image], SEG, max_new_tokens=NEW)
    assert ans.tokens[:BUDGET] == free.tokens[:BUDGET]  # the reasoning itself is untouched
    # the same forced ids fed one by one through the decoder: the same continuation, the same logits
    keep: list[np.ndarray] = []
    script = [None] * BUDGET + close + [None] * (len(ans.tokens) - BUDGET - len(close))
    manual = by_hand(pipe, image, SEG, script, keep)
    assert ans.tokens == manual[: len(ans.tokens)]
    assert len(ans.tokens) > BUDGET + len(close) + 3  # the answer went on after the forced ids
    assert len(ans.step_logits) == len(keep)  # forced tokens have no logits of their own
    for got, want in zip(ans.step_logits, keep, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_the_answer_reads_the_reasoning_and_the_answer(pipe, image, opened):
    ans = pipe.generate([image], SEG, max_new_tokens=NEW, think=ThinkOptions(max_think_tokens=BUDGET))
    reasoning = pipe.tokenizer.decode(ans.tokens[:BUDGET])
    assert ans.reasoning == reasoning.strip()
    assert ans.final_answer == ans.text.split("<answer>", 1)[1].strip()
    out = json.loads(json.dumps(ans.to_json()))
    assert out["reasoning"] == ans.reasoning and out["answer"] == ans.final_answer
    assert out["think"]["stopped_by"] == BY_BUDGET


def test_a_budget_never_reached_and_no_budget_decode_the_same(pipe, image, opened):
    free = pipe.generate([image], SEG, max_new_tokens=NEW)
    wide = pipe.generate([image], SEG, max_new_tokens=NEW, think=ThinkOptions(max_think_tokens=10_000))
    assert wide.tokens == free.tokens and wide.text == free.text
    assert (
        wide.think["stopped_by"] in ("open", None) and wide.think["tokens"] == len(free.tokens) - 1
    )  # eos is no piece


def test_no_options_leave_the_answer_json_as_it_was(pipe, image):
    plain = pipe.generate([image], "[VG] Where is the windmill?", max_new_tokens=24)
    out = plain.to_json()
    assert not {"reasoning", "answer", "think", "box_labels"} & set(out)
    assert plain.think is None and plain.final_answer is None


def test_think_off_forces_an_empty_block_first(pipe, image):
    skip = encode(pipe, "<think>\n</think>\n<answer>")
    prompt = "[VG] Where is the windmill?"
    ans = pipe.generate([image], prompt, max_new_tokens=NEW, think=ThinkOptions(think=False))
    assert ans.tokens[: len(skip)] == skip
    assert ans.think == {"tokens": 0, "budget": None, "stopped_by": SKIPPED}
    assert ans.reasoning == "" and ans.final_answer == ans.text.split("<answer>", 1)[1].strip()
    manual = by_hand(pipe, image, prompt, skip + [None] * (len(ans.tokens) - len(skip)), [])
    assert ans.tokens == manual


def test_think_off_on_an_opened_prompt_closes_it(pipe, image, opened):
    close = encode(pipe, "</think>\n<answer>")
    ans = pipe.generate([image], SEG, max_new_tokens=NEW, think=ThinkOptions(think=False))
    assert ans.tokens[: len(close)] == close and ans.reasoning == ""


def test_a_budget_of_zero_closes_before_any_reasoning(pipe, image, opened):
    close = encode(pipe, "</think>\n<answer>")
    ans = pipe.generate([image], SEG, max_new_tokens=NEW, think=ThinkOptions(max_think_tokens=0))
    assert ans.tokens[: len(close)] == close and ans.think["tokens"] == 0


def test_forced_ids_count_against_max_new_tokens(pipe, image, opened):
    ans = pipe.generate([image], SEG, max_new_tokens=BUDGET + 3, think=ThinkOptions(max_think_tokens=BUDGET))
    assert len(ans.tokens) == BUDGET + 3 and ans.stopped_by == "max_new_tokens"
    assert ans.tokens[BUDGET:] == encode(pipe, "</think>\n<answer>")[:3]


def test_streamed_pieces_hold_the_forced_text(pipe, image, opened):
    pieces: list[str] = []
    ans = pipe.generate(
        [image], SEG, max_new_tokens=NEW, think=ThinkOptions(max_think_tokens=BUDGET), on_token=pieces.append
    )
    assert "".join(pieces) == ans.text and "</think>\n<answer>" in ans.text


def test_the_model_closing_its_own_block_is_counted_not_forced():
    """The monitor alone, on a character-per-token stream: the model's own close is seen in the text, whatever its
    tokens, and its marker's tokens are not reasoning."""
    text = "ab c</think>\n<answer>x"
    mon = ThinkMonitor(ThinkOptions(max_think_tokens=50), ThinkMarkers(), list, chr, prompt_open=True)
    forced = [mon.feed(ord(ch)) for ch in text]
    assert not any(forced) and mon.stopped_by == BY_MODEL and mon.think_tokens == len("ab c")
    before = ThinkMonitor(ThinkOptions(max_think_tokens=2), ThinkMarkers(), lambda s: [ord(c) for c in s], chr)
    out = [before.feed(ord(ch)) for ch in "hi <think>abc"]
    assert out[-1] == [] and out[-2] == [ord(c) for c in "</think>\n<answer>"]  # after 2 reasoning tokens "ab"


def test_the_monitor_counts_as_a_whole_text_scan_would():
    """Random pieces (markers split across them, stray brackets): the monitor's windowed search agrees with scanning
    the whole text each step, on the state, the count and what closed the block."""
    rng = random.Random(1)
    alphabet = [*"ab<>/thinkz ", "<think>", "</think>", "</", "think>", "k>", "<thin", "</think", "<think", "</thin"]
    for _ in range(2000):
        pieces = [rng.choice(alphabet) for _ in range(rng.randrange(0, 30))]
        opened = rng.random() < 0.5
        mon = ThinkMonitor(ThinkOptions(), ThinkMarkers(), list, pieces.__getitem__, prompt_open=opened)
        for i in range(len(pieces)):
            mon.feed(i)
        text, rest = "", pieces
        if not opened:
            at = next((k for k in range(len(pieces)) if "<think>" in "".join(pieces[: k + 1])), None)
            if at is None:
                assert mon.state == "before"
                continue
            joined = "".join(pieces[: at + 1])
            text, rest = joined[joined.find("<think>") + len("<think>") :], pieces[at + 1 :]
        starts, count, closed = [], 0, None
        for p in rest:
            starts.append(len(text))
            text += p
            if "</think>" in text:
                count, closed = sum(s < text.find("</think>") for s in starts), BY_MODEL
                break
            count = len(starts)
        assert (mon.think_tokens, mon.stopped_by) == (count, closed), pieces


def test_count_think_tokens_replays_an_answer(pipe, image, opened):
    ans = pipe.generate([image], SEG, max_new_tokens=NEW, think=ThinkOptions(max_think_tokens=BUDGET))
    assert count_think_tokens(pipe.tokenizer, ans.tokens, prompt_open=True) == BUDGET
    assert count_think_tokens(pipe.tokenizer, encode(pipe, "[10, 20, 30, 40]")) is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_think_tokens": -1},
        {"max_think_tokens": 1.5},
        {"max_think_tokens": True},
        {"max_think_tokens": 4, "think": False},
    ],
)
def test_bad_options_are_refused(kwargs):
    with pytest.raises(OptionError):
        ThinkOptions(**kwargs)


def test_rsedge_run_streams_the_forced_text(demo_bundle, image):
    from tests.test_bad_input import run

    args = ("run", demo_bundle, "--image", image, "--prompt", "[VG] Where is the windmill?", "--no-think")
    streamed, whole = run(*args, "--stream"), run(*args, "--json")
    assert streamed.exit_code == 0 and whole.exit_code == 0, streamed.output + whole.output
    assert streamed.stdout.strip() == json.loads(whole.stdout)["text"].strip()
    assert streamed.stdout.startswith("<think>\n</think>\n<answer>")


def test_rsedge_run_takes_the_flags(demo_bundle, image):
    from tests.test_bad_input import assert_one_error_line, run

    res = run("run", demo_bundle, "--image", image, "--prompt", "[VG] Where is the windmill?", "--no-think", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["text"].startswith("<think>\n</think>\n<answer>") and out["think"]["stopped_by"] == SKIPPED
    assert out["reasoning"] == ""
    res = run("run", demo_bundle, "--image", image, "--prompt", "x", "--max-think-tokens", "-2")
    assert_one_error_line(res, "max_think_tokens")


def test_the_service_takes_the_fields(demo_bundle, pipe, image):
    from fastapi.testclient import TestClient

    from rsedge.serve.app import create_app
    from rsedge.serve.config import ServeConfig
    from rsedge.serve.models import ModelSet
    from tests.serve_helpers import data_uri

    want = pipe.generate([image], "[VG] Where is the windmill?", max_new_tokens=40, think=ThinkOptions(think=False))
    body = {"task": "vg", "question": "Where is the windmill?", "images": [data_uri(image)], "max_new_tokens": 40}
    with TestClient(create_app(ModelSet.load([demo_bundle]), ServeConfig())) as c:
        off = c.post("/v1/rs/answer", json={**body, "think": False})
        form = c.post(
            "/v1/rs/answer",
            data={"task": "vg", "question": "Where is the windmill?", "max_new_tokens": "40", "think": "false"},
            files={"image": (image.name, image.read_bytes(), "image/png")},
        )
        plain = c.post("/v1/rs/answer", json=body)
        bad = c.post("/v1/rs/answer", json={**body, "max_think_tokens": "many"})
    for r in (off, form):
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["token_ids"] == want.tokens and out["think"] == want.think
        assert out["reasoning"] == "" and out["answer"] == want.final_answer
    assert plain.status_code == 200 and "think" not in plain.json() and "reasoning" not in plain.json()
    assert (
        bad.status_code == 400 and "max_think_tokens must be a non-negative integer" in bad.json()["error"]["message"]
    )
