"""What a model family does around the graphs: prompt ids, pixels, visual tokens, routing, answer parsing.

``Pipeline`` runs graphs and decoding; everything that differs between architectures (the conversation
template, where images go, how features become the tokens spliced into the prompt, which expert a request
takes, how an answer is read) is a :class:`Family`, chosen by the manifest's ``architecture`` through
:mod:`rsedge.runtime.families`. A family reads what it needs from the manifest: the bundle is the single
source of truth, so a bundle exported with another system prompt, router or normalisation runs as exported.

Runtime module: numpy, Pillow, tokenizers and the stdlib only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from PIL import Image
from tokenizers import Tokenizer

if TYPE_CHECKING:
    from rsedge.runtime.bundle import Bundle

# (pixels [views, 3, S, S]) -> features [views, T, H]: the vision graph, on whatever device runs it.
VisionFn = Callable[[np.ndarray], np.ndarray]
# (graph key, feeds) -> outputs: any graph of the manifest's ``graphs`` (e.g. a projector, a change module).
GraphFn = Callable[[str, dict[str, np.ndarray]], list[np.ndarray]]
# token ids -> embedding rows [len(ids), H]
EmbedFn = Callable[[Sequence[int]], np.ndarray]


class Family(ABC):
    """One architecture's request logic; one instance per Pipeline, shared by its threads (keep it stateless)."""

    # The manifest ``architecture`` values this family runs (set by families.register).
    architectures: ClassVar[tuple[str, ...]] = ()

    def __init__(self, bundle: Bundle, tokenizer: Tokenizer) -> None:
        self.bundle = bundle
        self.tokenizer = tokenizer

    # -- the request ---------------------------------------------------------------------------------

    @abstractmethod
    def task(self, prompt: str) -> str | None:
        """The prompt's task (its tag), or None; a malformed tag is a PromptError."""

    @abstractmethod
    def check_request(self, prompt: str, num_images: int) -> None:
        """Refuse, before any image is read, a request whose image count its task cannot take."""

    @abstractmethod
    def route(self, prompt: str) -> int:
        """The decoder expert a prompt runs on (0 for a dense model)."""

    @abstractmethod
    def prompt_ids(self, prompt: str, num_images: int) -> list[int]:
        """Token ids of the whole conversation, with :attr:`image_token_index` where each image goes."""

    @property
    @abstractmethod
    def image_token_index(self) -> int:
        """The sentinel id in :meth:`prompt_ids` that an image's visual tokens replace."""

    # -- images --------------------------------------------------------------------------------------

    @abstractmethod
    def pixel_values(self, image: Image.Image) -> np.ndarray:
        """float32 [views, 3, S, S] the vision graph takes for one image."""

    def visual_tokens(self, features: np.ndarray, image: Image.Image) -> np.ndarray:
        """The vision graph's features of one image -> the [N, H] rows spliced at its sentinel (a family that
        overrides :meth:`images_to_tokens` need not have it)."""
        raise NotImplementedError(f"{type(self).__name__} makes visual tokens in images_to_tokens")

    def images_to_tokens(
        self, images: Sequence[Image.Image], vision: VisionFn, graph: GraphFn | None = None
    ) -> list[np.ndarray]:
        """Visual tokens of every image of one request, one [N, H] block per sentinel. A family that encodes
        images jointly or runs more graphs than ``vision`` (through ``graph``) overrides this."""
        return [self.visual_tokens(vision(self.pixel_values(im)), im) for im in images]

    def tile_size(self) -> int:
        """The side of the square tile a scene (a GeoTIFF larger than one input) is cut into: the vision input."""
        return int(self.bundle.preprocess["image_size"])

    def blank_image(self) -> Image.Image:
        """An image of the input size, for warming the vision graph up."""
        side = int(self.bundle.preprocess["image_size"])
        return Image.new("RGB", (side, side), (128, 128, 128))

    # -- embeddings and answers ------------------------------------------------------------------------

    def splice(self, ids: Sequence[int], visual: Sequence[np.ndarray], embed: EmbedFn, dtype: Any) -> np.ndarray:
        """[1, S, H] input embeddings: text rows, with each sentinel replaced by the next image's tokens."""
        pieces: list[np.ndarray] = []
        chunk: list[int] = []
        it = iter(visual)
        for tok in ids:
            if tok == self.image_token_index:
                if chunk:
                    pieces.append(embed(chunk))
                    chunk = []
                pieces.append(next(it))
            else:
                chunk.append(tok)
        if chunk:
            pieces.append(embed(chunk))
        return np.concatenate([p.astype(dtype, copy=False) for p in pieces])[None]

    def decoder_inputs(
        self, ids: Sequence[int], images: Sequence[Image.Image]
    ) -> Callable[[int, int], dict[str, np.ndarray]] | None:
        """The decoder's inputs beyond embeddings and cache slots for one request (``prompt_ids``' ``ids``):
        ``(start, count)`` -> feeds for the slots ``start .. start+count-1`` (prompt and decode steps alike),
        e.g. Qwen2-VL's rotary positions; None (the default) for a graph that takes none."""
        return None

    @abstractmethod
    def parse(self, answer: Any, images: Sequence[Image.Image]) -> None:
        """Fill the answer's structured parts (boxes, masks) from its text, in the images' pixels."""
