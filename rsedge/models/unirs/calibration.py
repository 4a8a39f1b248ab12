"""UniRS's calibration pass: each item of a UniRS set through the PyTorch reference, fed as the bundle's runtime
family will feed the exported graphs (its vicuna_v1 prompt ids and its pixels), teacher-forced on the item's
answer, for AWQ's activation statistics.

A change pair needs the change module: a VILA-1.5 checkpoint (none) skips the set's pairs (the manifest's
calibration record counts them, ``rsedge.models.unirs.exporter``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

from rsedge.calibration.calibset import CalibrationSet
from rsedge.export.linear_map import LinearMap
from rsedge.models.unirs.modeling import UniRSForCausalLM
from rsedge.models.unirs.prompt import IMAGE, PAIR, VIDEO
from rsedge.quantize.activations import LinearStats, cache_path, collect_stats, load_stats, save_stats
from rsedge.runtime.families.base import Family
from rsedge.synth.unirs_real import pan_frames


def request_images(calib: CalibrationSet, item_index: int, frames: int) -> list:
    """The images of one item as a request carries them: a ``video`` item's scene becomes ``frames`` frames."""
    item = calib.items[item_index]
    images = calib.load_images(item)
    return pan_frames(images[0], frames) if item.task == "video" else images


def calibration_inputs(
    model: UniRSForCausalLM, family: Family, tok: Tokenizer, calib: CalibrationSet
) -> Iterator[tuple[torch.Tensor, int]]:
    """(inputs_embeds [1, L, H], 0) per item: the family's prompt ids around the reference's visual blocks, then
    the answer and ``</s>`` where the item has an answer (the model reads its own answer back)."""
    cfg = model.cfg
    for k, item in enumerate(calib.items):
        images = request_images(calib, k, cfg.num_video_frames)
        kind = {1: IMAGE, 2: PAIR}.get(len(images), VIDEO)
        if kind == PAIR and not cfg.has_change:
            continue
        ids = family.prompt_ids(item.prompt, len(images))
        if item.answer:
            ids = ids + tok.encode(item.answer, add_special_tokens=False).ids + [cfg.eos_token_id]
        pixels = np.concatenate([family.pixel_values(im) for im in images])
        blocks = model.visual_blocks(kind, torch.from_numpy(pixels))
        yield model.embed_prompt(ids, blocks), 0


def calibration_stats(
    model: UniRSForCausalLM,
    family: Family,
    tok: Tokenizer,
    calib: CalibrationSet,
    reference_key: str,
    linear_map: LinearMap,
    routing: Sequence[int],
) -> tuple[dict[str, LinearStats], bool]:
    """Activation statistics of every decoder linear ``linear_map`` names; from the disk cache when this
    (reference, set) was seen before. ``reference_key`` must tell apart references that compute differently
    on the same checkpoint (the eval overrides)."""
    path = cache_path(reference_key, calib.content_hash, routing)
    if path.is_file():
        return load_stats(path), True
    batches = calibration_inputs(model, family, tok, calib)
    stats = collect_stats(model, batches, linear_map=linear_map, step=lambda embeds, _expert: model.step(embeds))
    save_stats(stats, path)
    return stats, False
