"""The static, training-free router: a task tag in the prompt picks the decoder expert."""

from __future__ import annotations

import re
from collections.abc import Mapping

from rsedge.errors import PromptError

TASK_TAGS = ("[CAP]", "[VQA]", "[CLS]", "[VG]", "[REF]", "[SEG]", "[CCD]")
# A leading all-caps bracket word is a task tag; a [REF] box like "[1, 20, 9, 30]" is not.
_LEADING_TAG = re.compile(r"^\s*(\[[A-Z][A-Z0-9_]*\])")


def task_tag(prompt: str) -> str | None:
    """The prompt's leading task tag, None when it has none; an unknown tag is an error."""
    m = _LEADING_TAG.match(prompt)
    if m is None:
        return None
    tag = m.group(1)
    if tag not in TASK_TAGS:
        raise PromptError(f"unknown task tag {tag}; known tags: {' '.join(TASK_TAGS)}")
    return tag


def route(prompt: str, table: Mapping[str, int], default: int) -> int:
    """Expert index for a prompt, as upstream: the first table tag contained in the prompt, else default."""
    task_tag(prompt)
    for tag, expert in table.items():
        if tag in prompt:
            return int(expert)
    return int(default)
