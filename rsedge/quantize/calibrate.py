"""Turn a calibration set into what the reference model reads: teacher-forced embeddings per expert."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from tokenizers import Tokenizer

from rsedge.calibration.calibset import CalibrationSet
from rsedge.export.linear_map import LinearMap
from rsedge.models.rsunivlm.modeling import RSUniVLMForCausalLM
from rsedge.quantize.activations import LinearStats, cache_path, collect_stats, load_stats, save_stats
from rsedge.runtime.images import validate_image
from rsedge.runtime.preprocess import preprocess_anyres, preprocess_square
from rsedge.runtime.prompt import build_prompt, tokenize
from rsedge.runtime.router import route


def calibration_routing(calib: CalibrationSet, table: Mapping[str, int], default: int) -> list[int]:
    """The expert the bundle's router sends each item to.

    A set records each item's expert under the default (upstream) router; a bundle exported with another
    ``--router`` runs each prompt on the expert its own table picks, so that expert is the one to calibrate.
    """
    return [route(item.prompt, table, default) for item in calib.items]


def calibration_inputs(
    model: RSUniVLMForCausalLM, tok: Tokenizer, calib: CalibrationSet, experts: Sequence[int]
) -> Iterator[tuple[torch.Tensor, int]]:
    """(inputs_embeds [1, L, H], expert) per item: the prompt with its images, then its answer if it has one.

    ``experts`` gives each item's expert (``calibration_routing``). The answer is read back as the model would
    read its own output, so the [SEG] expert is calibrated on run-length text and the [VG] expert on boxes.
    """
    cfg = model.cfg
    end = tok.token_to_id("<|im_end|>")
    for item, expert in zip(calib.items, experts, strict=True):
        images = [validate_image(im) for im in calib.load_images(item)]
        ids = tokenize(tok, build_prompt(item.prompt, len(images)))
        if item.answer:
            ids = ids + tok.encode(item.answer, add_special_tokens=False).ids + ([end] if end is not None else [])
        visual = []
        for im in images:
            if cfg.anyres_max_patches is None:
                pixels = preprocess_square(im, cfg.vision.image_size)
            else:
                pixels = preprocess_anyres(im, cfg.vision.image_size, cfg.image_grid_pinpoints)
            visual.append(model.image_tokens(torch.from_numpy(pixels), im.size))
        yield model.embed_prompt(ids, visual), expert


def calibration_stats(
    model: RSUniVLMForCausalLM,
    tok: Tokenizer,
    calib: CalibrationSet,
    checkpoint_hash: str,
    experts: Sequence[int],
    linear_map: LinearMap | None = None,
) -> tuple[dict[str, LinearStats], bool]:
    """Activation statistics of every decoder linear ``linear_map`` names (the exporter's), each item routed to
    ``experts[i]``; from the disk cache when this (checkpoint, set, routing) was seen before."""
    path = cache_path(checkpoint_hash, calib.content_hash, experts)
    if path.is_file():
        return load_stats(path), True
    stats = collect_stats(model, calibration_inputs(model, tok, calib, experts), linear_map=linear_map)
    save_stats(stats, path)
    return stats, False
