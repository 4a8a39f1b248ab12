"""ChatML prompt of RSUniVLM (upstream conv template ``qwen_1_5``) and LLaVA-style tokenization."""

from __future__ import annotations

from tokenizers import Tokenizer

from rsedge.errors import PromptError

IMAGE_PLACEHOLDER = "<image>"
IMAGE_TOKEN_INDEX = -200  # sentinel id where an image's visual tokens are spliced in
SYSTEM_PROMPT = "You are a helpful assistant."
CHAT_TEMPLATE = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


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


def tokenize(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Token ids with IMAGE_TOKEN_INDEX at each placeholder; chunks are encoded separately, as upstream."""
    ids: list[int] = []
    for k, chunk in enumerate(prompt.split(IMAGE_PLACEHOLDER)):
        if k:
            ids.append(IMAGE_TOKEN_INDEX)
        if chunk:
            ids.extend(tokenizer.encode(chunk, add_special_tokens=False).ids)
    return ids
