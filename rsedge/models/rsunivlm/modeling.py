"""PyTorch reference of RSUniVLM, the yardstick every exported bundle is checked against.

It reproduces the released forward: SigLIP with its last layer deleted and features taken before
``post_layernorm``; the mlp2x_gelu connector; ``image_newline``; a Qwen2 decoder whose every MLP is
``num_experts`` experts, one of which runs for the whole request (the static "granularity" router).
The building blocks are transformers' own SigLIP and Qwen2 modules, as upstream uses them.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

from rsedge.errors import CheckpointError
from rsedge.models.rsunivlm.config import RSUniVLMConfig
from rsedge.models.rsunivlm.merge import merge_anyres_torch, merge_square_torch
from rsedge.models.rsunivlm.weights import expected_tensors, load_checkpoint_tensors

IMAGE_TOKEN_INDEX = -200  # LLaVA's sentinel id for an <image> placeholder


class GranularityExperts(nn.ModuleList):
    """The G-MoE MLP: a list of Qwen2 MLPs, of which ``active`` runs (upstream ``self.mlp[granularity]``)."""

    def __init__(self, experts: list[nn.Module]) -> None:
        super().__init__(experts)
        self.active = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self[self.active](x)


@dataclass
class StepOutput:
    logits: torch.Tensor  # [B, S, V] float32
    cache: DynamicCache


class RSUniVLMForCausalLM(nn.Module):
    def __init__(self, cfg: RSUniVLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        v = cfg.vision
        tower = SiglipVisionModel(
            SiglipVisionConfig(
                hidden_size=v.hidden_size,
                intermediate_size=v.intermediate_size,
                num_hidden_layers=v.num_hidden_layers,
                num_attention_heads=v.num_attention_heads,
                num_channels=v.num_channels,
                image_size=v.image_size,
                patch_size=v.patch_size,
                hidden_act=v.hidden_act,
                layer_norm_eps=v.layer_norm_eps,
                vision_use_head=False,
            )
        )
        # Parameter names must read vision_tower.vision_model.*: transformers 4.x nests the transformer
        # under .vision_model, 5.x does not.
        self.vision_tower = nn.Module()
        self.vision_tower.vision_model = getattr(tower, "vision_model", tower)
        t = cfg.text
        self.mm_projector = nn.Sequential(
            nn.Linear(v.hidden_size, t.hidden_size), nn.GELU(), nn.Linear(t.hidden_size, t.hidden_size)
        )
        self.image_newline = nn.Parameter(torch.zeros(t.hidden_size))
        qcfg = Qwen2Config(
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_key_value_heads,
            rms_norm_eps=t.rms_norm_eps,
            rope_theta=t.rope_theta,
            max_position_embeddings=t.max_position_embeddings,
            tie_word_embeddings=t.tie_word_embeddings,
            use_sliding_window=False,
        )
        qcfg._attn_implementation = "eager"
        self.lm = Qwen2ForCausalLM(qcfg)
        for layer in self.lm.model.layers:
            layer.mlp = GranularityExperts([Qwen2MLP(qcfg) for _ in range(t.num_experts)])
        self.last_expert: int | None = None

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> RSUniVLMForCausalLM:
        """Build from a checkpoint directory, offline, through the strict weight map."""
        cfg = RSUniVLMConfig.from_checkpoint(path)
        return cls.from_tensors(cfg, load_checkpoint_tensors(path, cfg), dtype)

    @classmethod
    def from_tensors(
        cls, cfg: RSUniVLMConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
    ) -> RSUniVLMForCausalLM:
        """Build from checkpoint-named tensors already checked by ``load_checkpoint_tensors``."""
        model = cls(cfg).to(dtype)
        params = dict(model.named_parameters())  # a tied lm_head is the embedding Parameter, listed once
        mapping = expected_tensors(cfg)
        filled: set[str] = set()
        with torch.no_grad():
            for name, t in tensors.items():  # copy one by one: no second full-size state dict in RAM
                target = mapping[name].module
                params[target].copy_(t)
                filled.add(target)
        unfilled = sorted(set(params) - filled)
        if unfilled:
            raise CheckpointError(f"reference parameter {unfilled[0]!r} has no checkpoint tensor")
        return model.eval()

    # -- vision ----------------------------------------------------------------------------------

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N,3,S,S] -> [N,T,H]: tower output before post_layernorm, then the connector.

        Differentiable (training backpropagates through it); inference callers hold no_grad themselves.
        """
        out = self.vision_tower.vision_model(pixel_values=pixel_values, output_hidden_states=True)
        return self.mm_projector(out.hidden_states[-1])

    @torch.no_grad()
    def image_tokens(self, pixel_values: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Visual tokens of one image (its base tile first for anyres): [N_tokens, H]."""
        feats = self.encode_images(pixel_values)
        if self.cfg.anyres_max_patches is None:
            return merge_square_torch(feats, self.image_newline)
        return merge_anyres_torch(
            feats,
            self.image_newline,
            image_size,
            self.cfg.image_grid_pinpoints,
            self.cfg.vision.image_size,
            self.cfg.anyres_max_patches,
        )

    # -- language ----------------------------------------------------------------------------------

    @torch.no_grad()
    def embed_prompt(self, input_ids: list[int], image_tokens: list[torch.Tensor]) -> torch.Tensor:
        """Splice each image's tokens in at its -200 sentinel: [1, S, H]."""
        embed = self.lm.model.embed_tokens
        pieces: list[torch.Tensor] = []
        chunk: list[int] = []
        images = iter(image_tokens)
        for tok in input_ids:
            if tok == IMAGE_TOKEN_INDEX:
                if chunk:
                    pieces.append(embed(torch.tensor(chunk, device=embed.weight.device)))
                    chunk = []
                pieces.append(next(images).to(embed.weight.dtype))
            else:
                chunk.append(tok)
        if chunk:
            pieces.append(embed(torch.tensor(chunk, device=embed.weight.device)))
        return torch.cat(pieces, dim=0)[None]

    @torch.no_grad()
    def step(self, inputs_embeds: torch.Tensor, expert: int, cache: DynamicCache | None = None) -> StepOutput:
        """One decoder call (prefill or decode) with the given expert routed in every layer."""
        if not 0 <= expert < self.cfg.text.num_experts:
            raise ValueError(f"expert {expert} out of range 0..{self.cfg.text.num_experts - 1}")
        for layer in self.lm.model.layers:
            layer.mlp.active = expert
        self.last_expert = expert
        cache = cache if cache is not None else DynamicCache()
        past = cache.get_seq_length()
        positions = torch.arange(past, past + inputs_embeds.shape[1], device=inputs_embeds.device)[None]
        out = self.lm(inputs_embeds=inputs_embeds, position_ids=positions, past_key_values=cache, use_cache=True)
        return StepOutput(out.logits.float(), out.past_key_values)

    @torch.no_grad()
    def generate(
        self,
        input_ids: list[int],
        pixel_values: list[np.ndarray],
        image_sizes: list[tuple[int, int]],
        expert: int,
        max_new_tokens: int,
        eos_token_id: int | Collection[int] | None,
        timings: dict[str, float] | None = None,
    ) -> tuple[list[int], list[np.ndarray]]:
        """Greedy decoding until a stop id (Qwen2 stops on <|im_end|> and <|endoftext|>) or the budget.

        Returns the new tokens and each step's last-position logits. ``timings``, when given, receives
        ``prefill_ms`` (embedding + the prompt's forward pass, after the vision tower, as the runtime times its
        prefill), ``decode_ms`` and ``decode_steps`` (the one-token forward passes).
        """
        stops = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        weight = self.lm.model.embed_tokens.weight
        images = [
            self.image_tokens(torch.from_numpy(p).to(weight.device, weight.dtype), s)
            for p, s in zip(pixel_values, image_sizes, strict=False)
        ]
        t0 = time.perf_counter()
        embeds = self.embed_prompt(input_ids, images)
        tokens: list[int] = []
        logits_seen: list[np.ndarray] = []
        out = self.step(embeds, expert)
        t1 = time.perf_counter()
        steps = 0
        for _ in range(max_new_tokens):
            last = out.logits[0, -1]
            logits_seen.append(last.cpu().numpy().copy())
            tok = int(torch.argmax(last))
            tokens.append(tok)
            if tok in stops:
                break
            out = self.step(self.lm.model.embed_tokens(torch.tensor([[tok]], device=weight.device)), expert, out.cache)
            steps += 1
        if timings is not None:
            t2 = time.perf_counter()
            timings.update(prefill_ms=(t1 - t0) * 1e3, decode_ms=(t2 - t1) * 1e3, decode_steps=steps)
        return tokens, logits_seen
