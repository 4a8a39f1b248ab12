"""The PyTorch reference: transformers' own Qwen2_5_VLForConditionalGeneration (the oracle), filled strictly.

rsedge writes no model code for Qwen2.5-VL: parity is measured against transformers (pinned: 5.24.0, recorded
in every manifest's ``tools``), with eager attention, in float32. The weights come through rsedge's strict loader,
so a checkpoint that would load with missing keys in transformers is refused here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import DynamicCache, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from rsedge.errors import CheckpointError
from rsedge.models.qwen2_5_vl.config import Qwen25VLConfig
from rsedge.models.qwen2_5_vl.weights import load_checkpoint_tensors


def internal_name(name: str) -> str:
    """A released name -> transformers 5's module path."""
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model."):
        return "model.language_model." + name[len("model.") :]
    return name


class LanguageModel(NamedTuple):
    """transformers' language model where the other references keep theirs (``lm.model``, ``lm.lm_head``)."""

    model: torch.nn.Module
    lm_head: torch.nn.Module


@dataclass
class StepOutput:
    logits: torch.Tensor  # [B, S, V] float32
    cache: DynamicCache


class Qwen25VLReference:
    """transformers' model with rsedge's config beside it (``cfg``) and the released-name tensors it was given."""

    def __init__(self, cfg: Qwen25VLConfig, model: Qwen2_5_VLForConditionalGeneration) -> None:
        self.cfg = cfg
        self.model = model

    @property
    def lm(self) -> LanguageModel:
        return LanguageModel(self.model.model.language_model, self.model.lm_head)

    @torch.no_grad()
    def step(self, inputs_embeds: torch.Tensor, cache: DynamicCache | None = None) -> StepOutput:
        """One call of transformers' language model and head (prefill or decode) on ``inputs_embeds`` [B, S, H] of a
        text-only prompt after ``cache``, which grows in place: all three rotary rows are the positions ``past ..
        past+S-1``, what ``get_rope_index`` gives text (rsedge.bench.decode_floor times this)."""
        lm = self.model.model.language_model
        cache = cache if cache is not None else DynamicCache(config=lm.config)
        past, (batch, new) = cache.get_seq_length(), inputs_embeds.shape[:2]
        positions = torch.arange(past, past + new, device=inputs_embeds.device).view(1, 1, -1).expand(3, batch, -1)
        out = lm(inputs_embeds=inputs_embeds, position_ids=positions, cache=cache, use_cache=True)
        return StepOutput(self.model.lm_head(out.last_hidden_state).float(), cache)

    @classmethod
    def from_tensors(
        cls, path: str | Path, cfg: Qwen25VLConfig, tensors: Mapping[str, torch.Tensor]
    ) -> Qwen25VLReference:
        hf_cfg = Qwen2_5_VLConfig.from_pretrained(str(path))  # the local config.json; nothing is downloaded
        hf_cfg._attn_implementation = "eager"
        hf_cfg.vision_config._attn_implementation = "eager"
        hf_cfg.text_config._attn_implementation = "eager"
        with torch.device("meta"):
            model = Qwen2_5_VLForConditionalGeneration(hf_cfg)
        state = {internal_name(k): v.float() for k, v in tensors.items()}
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        tied = {"lm_head.weight"} if cfg.text.tie_word_embeddings else set()
        if unexpected or set(missing) - tied:
            raise CheckpointError(f"{path}: transformers' model disagrees with the weight map: {missing or unexpected}")
        if cfg.text.tie_word_embeddings:
            model.tie_weights()
        model = model.float().eval()
        # buffers made on the meta device (rotary inv_freq) are recomputed on the CPU
        for module in model.modules():
            if hasattr(module, "inv_freq") and module.inv_freq.is_meta:
                _reset_inv_freq(module)
        return cls(cfg, model)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> Qwen25VLReference:
        cfg = Qwen25VLConfig.from_checkpoint(path)
        return cls.from_tensors(path, cfg, load_checkpoint_tensors(path, cfg))


def _reset_inv_freq(module: torch.nn.Module) -> None:
    if hasattr(module, "compute_default_rope_parameters") and hasattr(module, "config"):
        inv_freq, _ = module.compute_default_rope_parameters(module.config)
    else:  # the vision tower's rotary: theta ** (-2i / dim)
        dim = module.inv_freq.shape[0] * 2
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    module.inv_freq = inv_freq
    if hasattr(module, "original_inv_freq"):
        module.original_inv_freq = inv_freq.clone()
