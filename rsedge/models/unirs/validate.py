"""UniRS / VILA-1.5 bundle validation: each graph of a fresh bundle against the PyTorch reference.

The generic pieces (tolerances, the runtime's decoder session and KV cache, the float-activation twin, the one
error line) are ``rsedge.export.validate``'s; what is UniRS's is which graphs there are and what feeds them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsedge.export.validate import (
    GraphCheck,
    compare,
    decoder_checks,
    ort_session,
    raise_on_failure,
    validation_image,
)
from rsedge.models.unirs.graphs import PAIR_FEATURES, PIXEL_VALUES, VISION_FEATURES
from rsedge.models.unirs.modeling import IMAGE_TOKEN_INDEX, UniRSForCausalLM


def validate_graphs(
    root: Path, manifest: dict[str, Any], model: UniRSForCausalLM, precision: str, vision: bool = True
) -> list[GraphCheck]:
    """Each vision-side graph on a pair's pixels, then the decoder (prefill of a prompt around the pair's block
    and two decode steps), against the reference; ExportValidationError at the first failed check. ``vision`` False
    checks the decoder alone (a bundle's second decoder form shares the first's vision-side graphs)."""
    cfg, graphs = model.cfg, manifest["graphs"]
    checks: list[GraphCheck] = []

    def run(key: str, name: str, x: np.ndarray) -> np.ndarray:
        sess = ort_session(root / graphs[key]["file"])
        want = np.float16 if sess.get_inputs()[0].type == "tensor(float16)" else np.float32
        return sess.run(None, {name: x.astype(want)})[0].astype(np.float32)

    def bound(key: str) -> str:
        if graphs[key].get("quantized"):
            return "vision-int8"
        return "fp16" if manifest["compute_dtype"] == "fp16" else "fp32"

    pixels = np.concatenate([validation_image(cfg.vision.image_size, s) for s in (0, 1)])
    ref_feats = model.vision_features(torch.from_numpy(pixels))
    if vision:
        feats = run("vision", PIXEL_VALUES, pixels)
        checks.append(compare("vision", feats, ref_feats.numpy(), bound("vision")))
    # Each later graph takes the reference's input: a check measures its own error, not its inputs'.
    ref_tokens = model.mm_projector.single(ref_feats)
    if vision:
        tokens = run("projector", VISION_FEATURES, ref_feats.numpy())
        checks.append(compare("projector", tokens, ref_tokens.numpy(), bound("projector")))
    block = ref_tokens[0]
    if "change" in graphs:
        ref_change = model.change_features(ref_feats[:1], ref_feats[1:])
        if vision:
            change = run("change", PAIR_FEATURES, ref_feats.numpy())
            checks.append(compare("change", change, ref_change.numpy(), bound("change")))
        block = model.mm_projector.single(ref_change)[0]

    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.text.vocab_size, size=12).tolist()
    embeds = model.embed_prompt([*ids[:6], IMAGE_TOKEN_INDEX, *ids[6:]], [block])
    next_ids = rng.integers(3, cfg.text.vocab_size, size=2).tolist()
    model.step(embeds[:, :4])  # a throwaway first pass: lazy set-up happens outside the compared ones
    step_embeds = [embeds] + [model.lm.model.embed_tokens(torch.tensor([[t]])) for t in next_ids]
    out = model.step(embeds)
    ref_logits = [out.logits[0, -1].numpy()]
    for emb in step_embeds[1:]:
        out = model.step(emb, out.cache)
        ref_logits.append(out.logits[0, -1].numpy())
    ref = np.stack(ref_logits)
    shared = graphs["decoder"]["kv_cache"] == "shared"
    entry = graphs["decoder"]["experts"]["0"]
    checks += decoder_checks(root, entry, "decoder_expert0", cfg, shared, step_embeds, ref, precision)
    raise_on_failure(checks, precision)
    return checks
