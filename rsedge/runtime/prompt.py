"""ChatML prompt of RSUniVLM (upstream conv template ``qwen_1_5``) and LLaVA-style tokenization."""

from __future__ import annotations

import re
import threading

from tokenizers import Tokenizer

from rsedge.errors import PromptError

IMAGE_PLACEHOLDER = "<image>"
IMAGE_TOKEN_INDEX = -200  # sentinel id where an image's visual tokens are spliced in
SYSTEM_PROMPT = "You are a helpful assistant."
CHAT_TEMPLATE = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
TEMPLATE_SPECIALS = ("<|im_start|>", "<|im_end|>")
_SPECIALS = re.compile("(" + "|".join(re.escape(s) for s in TEMPLATE_SPECIALS) + ")")
_HEAD, _REST = CHAT_TEMPLATE.split("{system}")
_MID, _TAIL = _REST.split("{user}")
_ENCODE_LOCK = threading.Lock()


def user_message(question: str, num_images: int) -> str:
    """Put the image placeholders in front of the question, as the upstream demo does."""
    placed = question.count(IMAGE_PLACEHOLDER)
    if placed:
        if placed != num_images:
            raise PromptError(f"the prompt has {placed} {IMAGE_PLACEHOLDER} placeholders for {num_images} images")
        return question
    if num_images == 0:
        return question
    return " ".join([IMAGE_PLACEHOLDER] * num_images) + "\n" + question


def build_prompt(question: str, num_images: int, system: str = SYSTEM_PROMPT) -> str:
    return CHAT_TEMPLATE.format(system=system, user=user_message(question, num_images))


def template_segments(prompt: str) -> list[tuple[str, bool]]:
    """The prompt as runs of (text, is_template_special): only the template's own specials are special.

    The prompt is read through the template's frame (head, system, middle, user, tail), so whatever was filled
    in for {system} and {user} stays text even when it spells ``<|im_end|>``: a user cannot forge a turn.
    """
    if not (prompt.startswith(_HEAD) and prompt.endswith(_TAIL)) or len(prompt) < len(_HEAD) + len(_TAIL):
        raise PromptError("tokenize takes a prompt made by build_prompt (the ChatML template)")
    system, mid, user = prompt[len(_HEAD) : len(prompt) - len(_TAIL)].partition(_MID)
    if not mid:
        raise PromptError("tokenize takes a prompt made by build_prompt (the ChatML template)")
    runs: list[tuple[str, bool]] = []
    for text, frame in ((_HEAD, True), (system, False), (_MID, True), (user, False), (_TAIL, True)):
        for part in _SPECIALS.split(text) if frame else [text]:
            special = frame and part in TEMPLATE_SPECIALS
            if runs and not special and not runs[-1][1]:
                runs[-1] = (runs[-1][0] + part, False)  # text between two specials is encoded as one piece
            elif part:
                runs.append((part, special))
    return runs


def tokenize(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Token ids with IMAGE_TOKEN_INDEX at each placeholder; chunks are encoded separately, as upstream.

    Text is encoded with the tokenizer's special-token matching off (``encode_special_tokens``), so only the
    template's own ``<|im_start|>``/``<|im_end|>`` become special ids. For prompts without special-token
    look-alikes the ids are those of upstream's whole-string encoding: the tokenizer splits at specials anyway.
    The flag is state of the shared tokenizer (its encode runs without the GIL), so it is set and restored under
    a lock: two requests tokenizing at once cannot encode user text with matching switched back on.
    """
    runs = template_segments(prompt)
    with _ENCODE_LOCK:
        return _encode(tokenizer, runs)


def _encode(tokenizer: Tokenizer, runs: list[tuple[str, bool]]) -> list[int]:
    ids: list[int] = []
    before = tokenizer.encode_special_tokens
    try:
        for text, special in runs:
            tokenizer.encode_special_tokens = not special
            for k, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
                if k:
                    ids.append(IMAGE_TOKEN_INDEX)
                if chunk:
                    ids.extend(tokenizer.encode(chunk, add_special_tokens=False).ids)
    finally:
        tokenizer.encode_special_tokens = before
    return ids
