"""UniRS's prompt: the vicuna_v1 template, one ``<image>`` per visual block, LLaMA-style ids (torch-free).

``llava/conversation.py`` conv_vicuna_v1 (SeparatorStyle.TWO, sep " ", sep2 "</s>") renders one turn as
``{system} USER: {question} ASSISTANT:``; the eval scripts put ``<image>\\n`` in front of the question
(``"<image>\\n" * N`` for N video frames, ``llava/eval/model_vqa_video.py`` line 52). A change pair is ONE
``<image>``: its two images become one block (``llava/eval/model_changecaption.py``, image_num 2).
``llava/mm_utils.py`` tokenizer_image_token encodes each chunk between placeholders separately, with the
BOS of the first chunk only.
"""

from __future__ import annotations

from tokenizers import Tokenizer

from rsedge.errors import PromptError
from rsedge.runtime.prompt import ChatTemplate

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
STOP = "</s>"  # sep2: the answer ends at LLaMA's EOS
VICUNA_V1 = ChatTemplate(template="{system} USER: {user} ASSISTANT:", system=SYSTEM, specials=(), image_separator="\n")

IMAGE, PAIR, VIDEO = "image", "pair", "video"
KINDS = (IMAGE, PAIR, VIDEO)


def placeholders(kind: str, frames: int = 0) -> int:
    """How many ``<image>`` a prompt of this kind carries: 1 for an image or a pair, one per video frame."""
    if kind not in KINDS:
        raise PromptError(f"unknown visual input kind {kind!r} (one of {', '.join(KINDS)})")
    if kind == VIDEO:
        if frames < 1:
            raise PromptError(f"a video needs at least one frame, got {frames}")
        return frames
    return 1


def build_prompt(question: str, kind: str = IMAGE, frames: int = 0) -> str:
    return VICUNA_V1.build(question, placeholders(kind, frames))


def tokenize(tokenizer: Tokenizer, prompt: str, bos_token_id: int) -> list[int]:
    """BOS, then each chunk between placeholders encoded on its own, -200 at each placeholder."""
    return [bos_token_id, *VICUNA_V1.tokenize(tokenizer, prompt)]
