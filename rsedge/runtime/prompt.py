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
# The flag tokenize() switches is state of a shared tokenizer: one lock for every template.
_ENCODE_LOCK = threading.Lock()


class ChatTemplate:
    """A conversation template with ``{system}`` and ``{user}`` slots (a bundle's ``prompt`` section), its own
    special tokens, and the image placeholder whose every occurrence becomes ``image_token_index``."""

    def __init__(
        self,
        template: str = CHAT_TEMPLATE,
        system: str = SYSTEM_PROMPT,
        specials: tuple[str, ...] = TEMPLATE_SPECIALS,
        placeholder: str = IMAGE_PLACEHOLDER,
        image_token_index: int = IMAGE_TOKEN_INDEX,
        image_separator: str = " ",
    ) -> None:
        if template.count("{system}") != 1 or template.count("{user}") != 1 or not placeholder:
            raise ValueError("a chat template needs one {system} and one {user} slot, and an image placeholder")
        self.template, self.system, self.placeholder = template, system, placeholder
        self.specials = tuple(s for s in specials if s)
        self.image_token_index = int(image_token_index)
        self.image_separator = image_separator
        self._head, rest = template.split("{system}")
        self._mid, self._tail = rest.split("{user}")
        self._split = re.compile("(" + "|".join(re.escape(t) for t in self.specials) + ")") if self.specials else None

    def user_message(self, question: str, num_images: int) -> str:
        """Put the image placeholders in front of the question, as the upstream demos do."""
        placed = question.count(self.placeholder)
        if placed:
            if placed != num_images:
                raise PromptError(f"the prompt has {placed} {self.placeholder} placeholders for {num_images} images")
            return question
        if num_images == 0:
            return question
        return self.image_separator.join([self.placeholder] * num_images) + "\n" + question

    def build(self, question: str, num_images: int, system: str | None = None) -> str:
        """The whole prompt; the slots are filled by concatenation, so braces in a question stay text."""
        user = self.user_message(question, num_images)
        return self._head + (self.system if system is None else system) + self._mid + user + self._tail

    def segments(self, prompt: str) -> list[tuple[str, bool]]:
        """The prompt as runs of (text, is_template_special): only the template's own specials are special.

        The prompt is read through the template's frame (head, system, middle, user, tail), so whatever was
        filled in for {system} and {user} stays text even when it spells a special token: a user cannot forge
        a turn.
        """
        head, mid_sep, tail = self._head, self._mid, self._tail
        wrong = PromptError("tokenize takes a prompt made by this template's build()")
        if not (prompt.startswith(head) and prompt.endswith(tail)) or len(prompt) < len(head) + len(tail):
            raise wrong
        system, mid, user = prompt[len(head) : len(prompt) - len(tail)].partition(mid_sep)
        if not mid:
            raise wrong
        runs: list[tuple[str, bool]] = []
        for text, frame in ((head, True), (system, False), (mid_sep, True), (user, False), (tail, True)):
            for part in self._split.split(text) if frame and self._split else [text]:
                special = frame and part in self.specials
                if runs and not special and not runs[-1][1]:
                    runs[-1] = (runs[-1][0] + part, False)  # text between two specials is encoded as one piece
                elif part:
                    runs.append((part, special))
        return runs

    def tokenize(self, tokenizer: Tokenizer, prompt: str) -> list[int]:
        """Token ids with ``image_token_index`` at each placeholder; chunks are encoded separately, as upstream.

        Text is encoded with the tokenizer's special-token matching off (``encode_special_tokens``), so only
        the template's own specials become special ids. For prompts without special-token look-alikes the ids
        are those of upstream's whole-string encoding: the tokenizer splits at specials anyway. The flag is
        state of the shared tokenizer (its encode runs without the GIL), so it is set and restored under a
        lock: two requests tokenizing at once cannot encode user text with matching switched back on.
        """
        runs = self.segments(prompt)
        with _ENCODE_LOCK:
            ids: list[int] = []
            before = tokenizer.encode_special_tokens
            try:
                for text, special in runs:
                    tokenizer.encode_special_tokens = not special
                    for k, chunk in enumerate(text.split(self.placeholder)):
                        if k:
                            ids.append(self.image_token_index)
                        if chunk:
                            ids.extend(tokenizer.encode(chunk, add_special_tokens=False).ids)
            finally:
                tokenizer.encode_special_tokens = before
            return ids


CHATML = ChatTemplate()  # RSUniVLM's (upstream conv template qwen_1_5)


def user_message(question: str, num_images: int) -> str:
    return CHATML.user_message(question, num_images)


def build_prompt(question: str, num_images: int, system: str = SYSTEM_PROMPT) -> str:
    return CHATML.build(question, num_images, system)


def template_segments(prompt: str) -> list[tuple[str, bool]]:
    return CHATML.segments(prompt)


def tokenize(tokenizer: Tokenizer, prompt: str) -> list[int]:
    return CHATML.tokenize(tokenizer, prompt)
