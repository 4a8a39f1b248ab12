"""One question for the model, whichever endpoint it came through, and the answer's common JSON parts."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from rsedge.errors import OptionError
from rsedge.runtime.outputs import mask_for_image
from rsedge.runtime.pipeline import Answer
from rsedge.runtime.router import task_tag
from rsedge.runtime.sampling import Sampling
from rsedge.runtime.think import ThinkOptions
from rsedge.serve.models import ServedModel
from rsedge.serve.scenes import SceneJob


@dataclass
class Ask:
    model: ServedModel
    images: list[Image.Image]
    prompt: str
    max_new_tokens: int
    sampling: Sampling
    ignore_eos: bool = False  # decode the whole budget (load tests, benchmarks), as vLLM's extra parameter
    mask_format: frozenset[str] = frozenset({"rle"})  # a [SEG] answer's mask as rle text, png, geotiff (scenes)
    scene: SceneJob | None = None  # a GeoTIFF scene, answered tile by tile, instead of images
    preview: bool = False  # return each image as the model saw it, a PNG (for a TIFF a browser cannot show)
    think: ThinkOptions | None = None  # reasoning models: a think budget or think off (max_think_tokens, think)

    @property
    def task(self) -> str:
        return task_tag(self.prompt) or "none"


def max_tokens(value: Any, cap: int, default: int = 256) -> int:
    if value is None:
        return min(default, cap)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= cap:
        raise OptionError(f"max_tokens must be an integer between 1 and {cap}, got {value!r}")
    return value


def sampling(body: dict[str, Any]) -> Sampling:
    """temperature / top_p / seed; greedy by default (as `rsedge run`), not the OpenAI API's temperature 1."""

    def number(key: str, default: float) -> float:
        value = body.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise OptionError(f"{key} must be a number, got {value!r}")
        return float(value)

    seed = body.get("seed")
    return Sampling(temperature=number("temperature", 0.0), top_p=number("top_p", 1.0), seed=seed)


def think_options(body: dict[str, Any]) -> ThinkOptions | None:
    """rsedge's own fields ``max_think_tokens`` (an integer) and ``think`` (true / false); None when neither is set,
    so a request without them decodes exactly as before."""
    budget, think = body.get("max_think_tokens"), body.get("think", True)
    options = ThinkOptions(max_think_tokens=budget, think=think)  # refuses a bad value in one line
    return options if options.active else None


def finish_reason(ans: Answer) -> str:
    return {"eos": "stop", "max_new_tokens": "length"}.get(ans.stopped_by, ans.stopped_by)


def usage(ans: Answer) -> dict[str, int]:
    return {
        "prompt_tokens": ans.prompt_tokens,
        "completion_tokens": len(ans.tokens),
        "total_tokens": ans.prompt_tokens + len(ans.tokens),
    }


def answer_json(
    ans: Answer, images: list[Image.Image], mask_format: frozenset[str] = frozenset({"rle"})
) -> dict[str, Any]:
    """The answer's structured parts: boxes in pixels of the first image, the mask as run-length text and/or a
    PNG at the size of the image it belongs to (the second of a pair, for a change mask)."""
    out = ans.to_json()
    out.pop("mask", None)
    out["boxes"] = [b.to_list() for b in ans.boxes]
    if ans.mask is not None:
        mask: dict[str, Any] = {"labels": ans.mask.labels, "grid": list(ans.mask.shape)}
        if "rle" in mask_format:
            mask["rle"] = ans.text
        if "png" in mask_format and images:
            target = images[-1]
            pixels = mask_for_image(ans.mask, target.width, target.height).astype(np.uint8) * 255
            buf = io.BytesIO()
            Image.fromarray(pixels, mode="L").save(buf, format="PNG")
            mask["png"] = base64.b64encode(buf.getvalue()).decode("ascii")
        out["mask"] = mask
    else:
        out["mask"] = None
    return out


def result_json(ask: Ask, ans: Any) -> dict[str, Any]:
    """The structured parts of an image's Answer or a scene's SceneAnswer."""
    if ask.scene is not None:
        from rsedge.serve.scenes import answer_json as scene_json

        return scene_json(ans, ask.scene, ask.mask_format)
    out = answer_json(ans, ask.images, ask.mask_format)
    if ask.preview:
        from rsedge.serve.scenes import preview

        out["preview"] = [preview(np.asarray(im.convert("RGB"))) for im in ask.images]
    return out


def result_usage(ask: Ask, ans: Any) -> dict[str, int]:
    if ask.scene is not None:
        from rsedge.serve.scenes import usage as scene_usage

        return scene_usage(ans)
    return usage(ans)
