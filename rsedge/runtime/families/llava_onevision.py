"""LLaVA-OneVision with RSUniVLM's task-routed experts (manifest ``architecture`` ``rsunivlm``).

- prompt: the manifest's ChatML template and system prompt; ``<image>`` placeholders in front of the question;
- images: square (one view) or anyres_max (base view + tiles) preprocessing with the manifest's normalisation;
  SigLIP features + projector in the vision graph, then LLaVA's newline merge (``rsedge.runtime.features``);
- routing: the prompt's task tag, anywhere in it, picks its router-table entry, else the default expert;
- answers: ``[VG]`` boxes on a 0-100 scale of the first image, ``[SEG]`` run-length masks.

Runtime module: numpy, Pillow, tokenizers and the stdlib only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from tokenizers import Tokenizer

from rsedge.errors import BundleError
from rsedge.runtime.families import register
from rsedge.runtime.families.base import Family
from rsedge.runtime.features import merge_anyres, merge_square
from rsedge.runtime.outputs import parse_boxes, parse_rle_mask
from rsedge.runtime.preprocess import Normalization, preprocess_anyres, preprocess_square
from rsedge.runtime.prompt import (
    CHAT_TEMPLATE,
    IMAGE_PLACEHOLDER,
    IMAGE_TOKEN_INDEX,
    SYSTEM_PROMPT,
    ChatTemplate,
)
from rsedge.runtime.router import IMAGE_COUNTS, TASK_TAGS, check_image_count, route, task_tag

if TYPE_CHECKING:
    from rsedge.runtime.bundle import Bundle


def template_specials(template: str, tokenizer: Tokenizer) -> tuple[str, ...]:
    """The tokenizer's special tokens that the template spells (bundles before ``prompt.specials``)."""
    added = tokenizer.get_added_tokens_decoder().values()
    return tuple(sorted({t.content for t in added if t.special and t.content and t.content in template}))


@register("rsunivlm")
class LlavaOneVisionFamily(Family):
    def __init__(self, bundle: Bundle, tokenizer: Tokenizer) -> None:
        super().__init__(bundle, tokenizer)
        where = f"{bundle.root}/manifest.json"
        p, r = bundle.prompt, bundle.router
        template = p.get("template", CHAT_TEMPLATE)
        specials = p.get("specials")
        try:
            self.template = ChatTemplate(
                template,
                p.get("system", SYSTEM_PROMPT),
                tuple(specials) if specials is not None else template_specials(template, tokenizer),
                p.get("image_placeholder", IMAGE_PLACEHOLDER),
                p.get("image_token_index", IMAGE_TOKEN_INDEX),
            )
            self.norm = Normalization.from_manifest(bundle.preprocess)
        except (ValueError, TypeError) as e:
            raise BundleError(f"{where}: manifest field prompt or preprocess: {e}") from e
        self.tags = tuple(r.get("tags", TASK_TAGS))
        counts = r.get("image_counts")
        self.counts = IMAGE_COUNTS if counts is None else {k: tuple(int(n) for n in v) for k, v in counts.items()}
        self.table, self.default = dict(r["table"]), int(r["default"])
        self.newline = np.asarray(bundle.array("image_newline"))

    @property
    def image_token_index(self) -> int:
        return self.template.image_token_index

    def task(self, prompt: str) -> str | None:
        return task_tag(prompt, self.tags)

    def check_request(self, prompt: str, num_images: int) -> None:
        check_image_count(prompt, num_images, self.tags, self.counts, self.template.placeholder)

    def route(self, prompt: str) -> int:
        return route(prompt, self.table, self.default, self.tags)

    def prompt_ids(self, prompt: str, num_images: int) -> list[int]:
        return self.template.tokenize(self.tokenizer, self.template.build(prompt, num_images))

    def pixel_values(self, image: Image.Image) -> np.ndarray:
        pre = self.bundle.preprocess
        if pre["kind"] == "square":
            return preprocess_square(image, pre["image_size"], self.norm)
        return preprocess_anyres(image, pre["image_size"], pre["pinpoints"], self.norm)

    def visual_tokens(self, features: np.ndarray, image: Image.Image) -> np.ndarray:
        pre = self.bundle.preprocess
        newline = self.newline.astype(features.dtype)
        if pre["kind"] == "square":
            return merge_square(features, newline)
        return merge_anyres(features, newline, image.size, pre["pinpoints"], pre["image_size"], pre["max_patches"])

    def parse(self, answer: Any, images: Sequence[Image.Image]) -> None:
        if answer.tag == "[VG]" and images:
            answer.boxes = parse_boxes(answer.text, *images[0].size)
        elif answer.tag == "[SEG]":
            answer.mask = parse_rle_mask(answer.text)
