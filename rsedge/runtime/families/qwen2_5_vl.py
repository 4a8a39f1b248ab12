"""Qwen2.5-VL (manifest ``architecture`` ``qwen2_5_vl``) and the reasoning grounders built on it (RSGround-R1,
RSThinker, VLM-R1-style models): one dense decoder with multimodal rotary, no router.

- prompt: the manifest's ChatML template; each image is ``<|vision_start|><|image_pad|><|vision_end|>`` in front
  of the question (Qwen2.5-VL's chat template), the pad standing for the image's visual tokens, whose count
  depends on the image's size (dynamic resolution);
- images: ``qwen2_5_vl_image.preprocess`` (smart_resize to multiples of 28, CLIP normalisation, patches) and the
  vision graph, fed the grid's window/rotary inputs, -> ``image_embeds`` [tokens, H], spliced at the pad;
- decoder inputs: the rotary positions (``rsedge.runtime.mrope``) of the spliced prompt, continued by
  ``slot + delta`` while decoding;
- answers: ``<think>..</think><answer>..</answer>`` read by ``rsedge.runtime.reasoning``; boxes (``bbox_2d`` JSON
  or bare lists, absolute pixels of the resized input) mapped to the first image's own pixels.

Runtime module: numpy, Pillow, tokenizers and the stdlib only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from tokenizers import Tokenizer

from rsedge.errors import BundleError
from rsedge.runtime.families import register
from rsedge.runtime.families.base import Family, GraphFn, VisionFn
from rsedge.runtime.families.qwen2_5_vl_image import (
    PIXEL_VALUES,
    VisionPreprocess,
    preprocess,
    smart_resize,
    vision_feeds,
)
from rsedge.runtime.mrope import MropePositions, expand_image_tokens, merged_tokens, rope_index
from rsedge.runtime.outputs import Box
from rsedge.runtime.prompt import ChatTemplate
from rsedge.runtime.reasoning import map_boxes, parse_reasoning

if TYPE_CHECKING:
    from rsedge.runtime.bundle import Bundle


@register("qwen2_5_vl")
class Qwen25VLFamily(Family):
    def __init__(self, bundle: Bundle, tokenizer: Tokenizer) -> None:
        super().__init__(bundle, tokenizer)
        p, model = bundle.prompt, bundle.model
        where = f"{bundle.root}/manifest.json"
        try:
            self.template = ChatTemplate(
                p["template"],
                p["system"],
                tuple(p.get("specials", ())),
                p["image_placeholder"],
                int(p["image_token_index"]),
                "",
            )
            self.vision_start, self.vision_end = int(p["vision_start_token_id"]), int(p["vision_end_token_id"])
            self.merge = int(model["spatial_merge_size"])
            self.vision_record = dict(bundle.manifest["vision"])
        except (KeyError, ValueError, TypeError) as e:
            raise BundleError(f"{where}: manifest field prompt, model or vision: {e}") from e
        self.pre = VisionPreprocess.from_manifest(bundle.preprocess)

    @property
    def image_token_index(self) -> int:
        return self.template.image_token_index

    def task(self, prompt: str) -> str | None:
        return None  # no task tags: one decoder answers everything

    def check_request(self, prompt: str, num_images: int) -> None:
        self.template.user_message(self._user(prompt, num_images), num_images)

    def route(self, prompt: str) -> int:
        return 0

    def _user(self, prompt: str, num_images: int) -> str:
        """Images first, then the question, as Qwen2.5-VL's chat template lays a user turn out (no separator);
        a prompt that places its own placeholders keeps them."""
        if self.template.placeholder in prompt:
            return prompt
        return self.template.placeholder * num_images + prompt

    def prompt_ids(self, prompt: str, num_images: int) -> list[int]:
        """The conversation's ids, each image as vision_start, ONE pad (the splice's sentinel), vision_end."""
        ids = self.template.tokenize(self.tokenizer, self.template.build(self._user(prompt, num_images), num_images))
        out: list[int] = []
        for tok in ids:
            out.extend((self.vision_start, tok, self.vision_end) if tok == self.image_token_index else (tok,))
        return out

    # -- images ----------------------------------------------------------------------------------------

    def resized(self, image: Image.Image) -> tuple[int, int]:
        """(height, width) the model sees ``image`` at (its boxes are in these pixels)."""
        w, h = image.size
        return smart_resize(h, w, self.pre.factor, self.pre.min_pixels, self.pre.max_pixels)

    def grid(self, image: Image.Image) -> tuple[int, int, int]:
        h, w = self.resized(image)
        return 1, h // self.pre.patch_size, w // self.pre.patch_size

    def pixel_values(self, image: Image.Image) -> np.ndarray:
        """float32 [patches, 3 * 2 * 14 * 14] (dynamic resolution: not the base class's square views)."""
        return preprocess(image, self.pre)[0]

    def images_to_tokens(
        self, images: Sequence[Image.Image], vision: VisionFn, graph: GraphFn | None = None
    ) -> list[np.ndarray]:
        if not images:
            return []
        if graph is None:
            raise BundleError("a Qwen2.5-VL bundle runs its vision graph with grid inputs through Pipeline.run_graph")
        blocks = []
        for image in images:  # one call per image: each has its own grid
            pixels, grid_thw, _ = preprocess(image, self.pre)
            feeds = {PIXEL_VALUES: pixels, **vision_feeds(grid_thw, self.vision_record)}
            blocks.append(graph("vision", feeds)[0])
        return blocks

    def blank_image(self) -> Image.Image:
        return Image.new("RGB", (224, 224), (128, 128, 128))

    def tile_size(self) -> int:
        # Any size is read at its own resolution up to max_pixels: the largest square tile that is not shrunk.
        side = math.isqrt(self.pre.max_pixels) // self.pre.factor * self.pre.factor
        return max(side, self.pre.factor)

    # -- decoding and answers --------------------------------------------------------------------------------

    def decoder_inputs(
        self, ids: Sequence[int], images: Sequence[Image.Image]
    ) -> Callable[[int, int], dict[str, np.ndarray]]:
        grids = [self.grid(im) for im in images]
        counts = [merged_tokens(g, self.merge) for g in grids]
        expanded = expand_image_tokens(ids, counts, self.image_token_index)
        positions, delta = rope_index(expanded, grids, self.image_token_index, self.merge)
        return MropePositions(positions, delta)

    def parse(self, answer: Any, images: Sequence[Image.Image]) -> None:
        """Boxes of a grounding answer (think/answer or plain), in the first image's pixels."""
        if not images:
            return
        parsed = parse_reasoning(answer.text)
        w, h = images[0].size
        answer.boxes = [Box(*b) for b in map_boxes(parsed, self.resized(images[0]), (h, w))]
        answer.box_labels = list(parsed.labels)
