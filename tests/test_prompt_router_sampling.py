"""Prompt template, router and sampler: small pure functions with hand-checked answers."""

from __future__ import annotations

import numpy as np
import pytest

from rsedge.errors import OptionError, PromptError
from rsedge.runtime.prompt import IMAGE_TOKEN_INDEX, build_prompt, tokenize
from rsedge.runtime.router import route, task_tag
from rsedge.runtime.sampling import Sampler, Sampling

TABLE = {"[SEG]": 2, "[VG]": 1, "[REF]": 1}


def test_prompt_matches_upstream_template():
    assert build_prompt("[VG] Where is the windmill?", 1) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
        "[VG] Where is the windmill?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "user\n<image> <image>\n[CCD]" in build_prompt("[CCD] changes?", 2)


def test_tokenize_puts_sentinels_at_images(tiny_checkpoint):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    ids = tokenize(tok, build_prompt("[CCD] changes?", 2))
    assert ids.count(IMAGE_TOKEN_INDEX) == 2
    first = ids.index(IMAGE_TOKEN_INDEX)
    assert ids[first + 2] == IMAGE_TOKEN_INDEX  # "<image> <image>": one space token between them


@pytest.mark.parametrize(
    "prompt,expert",
    [
        ("[SEG] water.", 2),
        ("[VG] Where is the tank?", 1),
        ("[REF] what is [1, 20, 9, 30]?", 1),
        ("[CAP] Describe this image.", 0),
        ("[CCD] changes?", 0),
        ("[VQA] How many?", 0),
        ("[CLS] Category?", 0),
        ("What is this?", 0),
        ("[SEG] Please segment the building area that have changed.", 2),
    ],
)
def test_router(prompt, expert):
    assert route(prompt, TABLE, 0) == expert


def test_unknown_tag_and_box_lookalike():
    with pytest.raises(PromptError, match=r"\[DET\]"):
        task_tag("[DET] planes")
    assert task_tag("[1, 2, 3, 4] what is this?") is None


def test_sampling_options_are_checked():
    for bad in ({"temperature": -0.1}, {"temperature": 11}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(OptionError):
            Sampling(**bad)


def test_greedy_and_seeded_sampling():
    logits = np.array([0.0, 2.0, 1.0, 1.9], dtype=np.float32)
    assert Sampler(Sampling())(logits) == 1
    draws = [Sampler(Sampling(temperature=1.0, seed=7))(logits) for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same draw
    s = Sampler(Sampling(temperature=1.0, seed=0))
    counts = np.bincount([s(logits) for _ in range(4000)], minlength=4) / 4000
    p = np.exp(logits - logits.max())
    p /= p.sum()
    assert np.allclose(counts, p, atol=0.03)
    nucleus = Sampler(Sampling(temperature=1.0, top_p=0.3, seed=0))
    assert {nucleus(logits) for _ in range(200)} == {1}  # the top token alone carries 0.4 >= 0.3


@pytest.mark.parametrize("seed", [-5, True, 1.5])
def test_sampling_seed_is_checked(seed):
    with pytest.raises(OptionError, match="seed"):
        Sampling(temperature=1.0, seed=seed)
