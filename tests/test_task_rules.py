"""Task tags route and parse by one rule, and each task takes the number of images it was trained on."""

from __future__ import annotations

import pytest

from rsedge.errors import PromptError
from rsedge.runtime.router import check_image_count, route, task_tag
from tests.test_bad_input import assert_one_error_line, run

TABLE = {"[SEG]": 2, "[VG]": 1, "[REF]": 1}
PAIR = ("levircc_test_000289_A.png", "levircc_test_000289_B.png")


@pytest.mark.parametrize(
    "prompt,tag,expert",
    [
        ("[VG] Where is the tank?", "[VG]", 1),
        ("Where is the tank? [VG]", "[VG]", 1),  # anywhere, as upstream's substring test
        ("<image> <image>\n[CCD] changes?", "[CCD]", 0),
        ("Please [SEG] the water.", "[SEG]", 2),
        ("[SEG] water, [SEG] again.", "[SEG]", 2),  # the same tag twice is still one task
        ("[REF] what is [1, 20, 9, 30]?", "[REF]", 1),  # a box is not a tag
        ("What is this?", None, 0),
    ],
)
def test_tag_anywhere_routes_and_parses_alike(prompt, tag, expert):
    assert task_tag(prompt) == tag
    assert route(prompt, TABLE, 0) == expert


@pytest.mark.parametrize(
    "prompt,needles",
    [
        ("[CAP] [SEG] Describe the water.", ("[CAP]", "[SEG]")),
        ("[VG] Where is it? Then [REF] it.", ("[VG]", "[REF]")),
    ],
)
def test_two_different_tags_are_an_error(prompt, needles):
    for call in (lambda: task_tag(prompt), lambda: route(prompt, TABLE, 0)):
        with pytest.raises(PromptError) as err:
            call()
        assert all(n in str(err.value) for n in needles), err.value


@pytest.mark.parametrize(
    "prompt,bad,good", [("[vg] Where is the tank?", "[vg]", "[VG]"), ("x [Seg] water", "[Seg]", "[SEG]")]
)
def test_lower_case_tag_is_an_error_that_names_it(prompt, bad, good):
    with pytest.raises(PromptError) as err:
        route(prompt, TABLE, 0)
    assert bad in str(err.value) and good in str(err.value)


@pytest.mark.parametrize(
    "tag,count,ok",
    [
        ("[CCD]", 2, True),
        ("[CCD]", 1, False),
        ("[CCD]", 3, False),
        ("[SEG]", 1, True),
        ("[SEG]", 2, True),
        ("[SEG]", 3, False),
        ("[SEG]", 0, False),
        *((t, 1, True) for t in ("[CAP]", "[VQA]", "[CLS]", "[VG]", "[REF]", None)),
        *((t, n, False) for t in ("[CAP]", "[VQA]", "[CLS]", "[VG]", "[REF]", None) for n in (0, 2, 10)),
    ],
)
def test_image_count_rule(tag, count, ok):
    prompt = f"{tag or ''} something".strip()
    if ok:
        check_image_count(prompt, count)
    else:
        with pytest.raises(PromptError, match=rf"takes .* got {count}"):
            check_image_count(prompt, count)


def test_placed_image_placeholders_decide_the_count():
    """A prompt that places <image> itself takes as many images as it places (build_prompt checks the match)."""
    check_image_count("<image> <image>\n[VG] Where is the tank?", 2)
    check_image_count("<image>\n[CCD] changes?", 1)


@pytest.mark.parametrize(
    "prompt,count",
    [("[CCD] What changed?", 1), ("[VG] Where is the windmill?", 2), ("[CAP] Describe it.", 3), ("[SEG] water.", 3)],
)
def test_run_refuses_a_wrong_image_count(prompt, count, tiny_bundle, samples):
    images = [samples / "dior_05863.png", *(samples / p for p in PAIR)][:count]
    res = run("run", tiny_bundle, *(a for im in images for a in ("--image", im)), "--prompt", prompt)
    assert_one_error_line(res, prompt.split()[0], f"got {count}")


def test_run_without_an_image_is_refused(tiny_bundle):
    assert_one_error_line(run("run", tiny_bundle, "--prompt", "[CAP] Describe it."), "[CAP]", "got 0")


def test_generate_checks_the_count_before_any_work(tiny_bundle, samples, monkeypatch):
    from rsedge.runtime import pipeline as pipeline_mod
    from rsedge.runtime.pipeline import Pipeline

    pipe = Pipeline.load(tiny_bundle)

    def no_loading(*args, **kwargs):
        raise AssertionError("an image was loaded")

    monkeypatch.setattr(pipeline_mod, "load_image", no_loading)
    with pytest.raises(PromptError, match="got 10"):
        pipe.generate([samples / "dior_05863.png"] * 10, "[VQA] How many?", max_new_tokens=2)


def test_cli_mixed_and_lower_case_tags(tiny_bundle, samples):
    image = samples / "dior_05863.png"
    res = run("run", tiny_bundle, "--image", image, "--prompt", "[CAP] [SEG] water", "--max-new-tokens", "2")
    assert_one_error_line(res, "[CAP]", "[SEG]")
    res = run("run", tiny_bundle, "--image", image, "--prompt", "[vg] the tank", "--max-new-tokens", "2")
    assert_one_error_line(res, "[vg]", "[VG]")
