"""The OpenAI chat-completions format: a request's messages to (prompt, images), an Answer to a completion
or to server-sent chunks, as llama.cpp's server and vLLM speak it, so OpenAI client libraries work unchanged.

RSUniVLM answers one user turn: the request holds one user message (text parts joined by newlines and
image_url parts in order); system and earlier turns are refused rather than silently dropped.
"""

from __future__ import annotations

import time
from typing import Any

from rsedge.errors import OptionError, PromptError
from rsedge.runtime.pipeline import Answer
from rsedge.serve.ask import finish_reason


def user_turn(body: dict[str, Any]) -> tuple[str, list[str]]:
    """(prompt text, image URLs) of the request's one user message."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise OptionError("messages must be a non-empty list")
    if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "user":
        roles = [m.get("role") if isinstance(m, dict) else type(m).__name__ for m in messages]
        raise PromptError(f"rsedge answers one user message with its images; got messages with roles {roles}")
    content = messages[0].get("content")
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise OptionError("a message's content must be a string or a list of text and image_url parts")
    texts, urls = [], []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str):
                raise OptionError(f"content part {i}: image_url needs a url")
            urls.append(url)
        else:
            raise OptionError(f"content part {i}: expected a text or image_url part, got {kind!r}")
    return "\n".join(texts), urls


def completion(rid: str, model: str, ans: Answer, usage: dict[str, int], extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{rid}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": ans.text},
                "finish_reason": finish_reason(ans),
            }
        ],
        "usage": usage,
        "rsedge": extra,  # boxes in pixels, mask, expert, token ids: clients that do not know it ignore it
    }


def chunk(rid: str, model: str, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    out = {
        "id": f"chatcmpl-{rid}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    out.update(extra)
    return out
