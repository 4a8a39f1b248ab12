"""VILA-1.5 and UniRS (manifest ``architecture`` ``unirs``): one dense LLaMA decoder, no router.

- prompt: the manifest's vicuna_v1 template, BOS once in front, one ``<image>`` per visual block
  (``<image>\\n`` per video frame);
- requests by image count, as the original dispatches: 1 image -> one block (tower -> projector); 2 images ->
  a change pair, ONE block (tower on both -> ``change`` -> projector; refused by a bundle without the change
  module); 3 or more -> video frames, one block each;
- images: SigLIP's square input, stretched (``resize``) or padded to a square with the mean colour first
  (``pad``, LLaVA's expand2square), per the manifest;
- answers: free text (captions, answers, class names): nothing to parse.

Runtime module: numpy, Pillow, tokenizers and the stdlib only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from tokenizers import Tokenizer

from rsedge.errors import BundleError, ImageError
from rsedge.runtime.families import register
from rsedge.runtime.families.base import Family, GraphFn, VisionFn
from rsedge.runtime.preprocess import Normalization, preprocess_square
from rsedge.runtime.prompt import ChatTemplate

if TYPE_CHECKING:
    from rsedge.runtime.bundle import Bundle

PAIR_FEATURES, VISION_FEATURES = "pair_features", "vision_features"  # rsedge.models.unirs.graphs' I/O names


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """LLaVA's expand2square: the image centred on a square of ``background`` (``mm_utils.py``)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), background)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def visual_blocks(num_images: int) -> int:
    """``<image>`` placeholders of a request: a pair is one block, a video one per frame."""
    return 1 if num_images == 2 else num_images


@register("unirs")
class VilaFamily(Family):
    def __init__(self, bundle: Bundle, tokenizer: Tokenizer) -> None:
        super().__init__(bundle, tokenizer)
        p, pre = bundle.prompt, bundle.preprocess
        try:
            self.template = ChatTemplate(
                p["template"],
                p["system"],
                tuple(p.get("specials", ())),
                p["image_placeholder"],
                int(p["image_token_index"]),
                p.get("image_separator", "\n"),
            )
            self.bos = p.get("bos_token_id")
            self.norm = Normalization.from_manifest(pre)
            self.aspect, self.size = str(pre.get("aspect_ratio", "resize")), int(pre["image_size"])
        except (KeyError, ValueError, TypeError) as e:
            raise BundleError(f"{bundle.root}/manifest.json: manifest field prompt or preprocess: {e}") from e
        if pre["kind"] != "square" or self.aspect not in ("pad", "resize"):
            raise BundleError(
                f"{bundle.root}/manifest.json: preprocess must be square with aspect_ratio pad or resize, "
                f"not {pre['kind']!r} / {self.aspect!r}"
            )
        # expand2square's background: the mean colour, as the original computes it (int(x * 255))
        self.background = tuple(int(m * 255) for m in self.norm.mean)
        self.has_change = "change" in bundle.manifest["graphs"]

    @property
    def image_token_index(self) -> int:
        return self.template.image_token_index

    def task(self, prompt: str) -> str | None:
        return None  # no task tags: one decoder answers everything

    def check_request(self, prompt: str, num_images: int) -> None:
        if num_images == 2 and not self.has_change:
            raise ImageError(
                "this bundle has no change module (a VILA-1.5 checkpoint): it cannot take an image pair; "
                "video frames come 3 or more"
            )
        self.template.user_message(prompt, visual_blocks(num_images))  # placeholders the user wrote must fit

    def route(self, prompt: str) -> int:
        return 0

    def prompt_ids(self, prompt: str, num_images: int) -> list[int]:
        ids = self.template.tokenize(self.tokenizer, self.template.build(prompt, visual_blocks(num_images)))
        return ids if self.bos is None else [int(self.bos), *ids]  # tokenizer_image_token: BOS once, in front

    def pixel_values(self, image: Image.Image) -> np.ndarray:
        if image.mode != "RGB":
            image = image.convert("RGB")
        if self.aspect == "pad":
            image = expand2square(image, self.background)
        return preprocess_square(image, self.size, self.norm)

    def images_to_tokens(
        self, images: Sequence[Image.Image], vision: VisionFn, graph: GraphFn | None = None
    ) -> list[np.ndarray]:
        if not images:
            return []
        if graph is None:
            raise BundleError("a UniRS bundle runs its projector (and change module) through Pipeline.run_graph")
        features = vision(np.concatenate([self.pixel_values(im) for im in images]))
        if len(images) == 2:  # a change pair: two tower outputs -> one change map
            features = graph("change", {PAIR_FEATURES: features})[0]
        return list(graph("projector", {VISION_FEATURES: features})[0])

    def parse(self, answer: Any, images: Sequence[Image.Image]) -> None:
        return None  # free text
