"""The static, training-free router: a task tag in the prompt picks the decoder expert.

Routing and answer parsing read the tag with one rule, :func:`task_tag`: a tag anywhere in the prompt counts
(upstream's router is a substring test), so the expert that runs and the parser that reads its answer agree.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from rsedge.errors import PromptError
from rsedge.runtime.prompt import IMAGE_PLACEHOLDER

TASK_TAGS = ("[CAP]", "[VQA]", "[CLS]", "[VG]", "[REF]", "[SEG]", "[CCD]")
# Images per request each task was trained on; any other tag, or none, looks at exactly one image.
IMAGE_COUNTS: dict[str, tuple[int, ...]] = {"[CCD]": (2,), "[SEG]": (1, 2)}
_COUNT_WORDS = {"[CCD]": "2 images (before, after)", "[SEG]": "1 image, or 2 for a change mask"}
# A bracketed word; a [REF] box like "[1, 20, 9, 30]" is not one.
_BRACKET_WORD = re.compile(r"\[[A-Za-z][A-Za-z0-9_]*\]")
_LEADING_WORD = re.compile(r"^\s*(\[[A-Za-z][A-Za-z0-9_]*\])")


def task_tag(prompt: str, tags: Sequence[str] = TASK_TAGS) -> str | None:
    """The prompt's task tag, wherever it stands; None when it has none.

    A tag in the wrong letter case, two different tags, or a leading bracket word that is no tag is an error:
    upstream would route ``[vg]`` as a caption and ``[CAP] [SEG]`` to the [SEG] expert, answering garbage.
    """
    found: list[str] = []
    for word in _BRACKET_WORD.findall(prompt):
        if word in tags:
            found.append(word)
        elif word.upper() in tags:
            raise PromptError(f"task tag {word} must be written in capitals: {word.upper()}")
    lead = _LEADING_WORD.match(prompt)
    if lead is not None and lead.group(1) not in tags:
        raise PromptError(f"unknown task tag {lead.group(1)}; known tags: {' '.join(tags)}")
    distinct = list(dict.fromkeys(found))
    if len(distinct) > 1:
        raise PromptError(f"the prompt has {len(distinct)} task tags ({', '.join(distinct)}); give one")
    return distinct[0] if distinct else None


def route(prompt: str, table: Mapping[str, int], default: int, tags: Sequence[str] = TASK_TAGS) -> int:
    """Expert index for a prompt: its task tag's entry in the router table, else ``default``."""
    tag = task_tag(prompt, tags)
    return int(table[tag]) if tag in table else int(default)


def check_image_count(
    prompt: str,
    num_images: int,
    tags: Sequence[str] = TASK_TAGS,
    counts: Mapping[str, Sequence[int]] = IMAGE_COUNTS,
    placeholder: str = IMAGE_PLACEHOLDER,
) -> None:
    """Refuse a request whose image count its task cannot take ([CCD] 2, [SEG] 1 or 2, anything else 1).

    A prompt that places ``<image>`` itself lays out its own images; build_prompt matches them to the count.
    """
    if placeholder in prompt:
        return
    tag = task_tag(prompt, tags)
    allowed = tuple(counts.get(tag or "", (1,)))
    if num_images not in allowed:
        name = tag or "a prompt without a task tag"
        words = _COUNT_WORDS.get(tag or "") if counts is IMAGE_COUNTS else None
        words = words or " or ".join(f"{n} image{'s' if n != 1 else ''}" for n in allowed)
        raise PromptError(f"{name} takes {words}, got {num_images}")
