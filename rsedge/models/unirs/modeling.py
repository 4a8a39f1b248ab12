"""PyTorch reference of UniRS (VILA-1.5-3B with the change-extraction module), the yardstick for its exports.

Faithful to IntelliSensing/UniRS (commit 476abda):
- SigLIP with all its layers, features = ``hidden_states[mm_vision_select_layer]`` (-2), every token kept
  (``cls_patch``; ``multimodal_encoder/vision_encoder.py`` feature_select);
- ``mlp_downsample`` = ``MultipleApplicationLayers`` (``multimodal_projector/base_projector.py``): ``single``
  (DownSampleBlock, LayerNorm, Linear, GELU, Linear) for an image or a video frame; ``change``
  (``model_encoder.py`` AttentiveEncoder) then ``single`` for a pair;
- a LLaMA decoder (transformers' LlamaForCausalLM, eager attention: the CPU equivalent of the flash attention
  the original always calls).
The modules below transcribe the original's, under its parameter names; only ``.cuda()`` became the weights'
device and einops' rearranges became reshapes.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

from rsedge.errors import CheckpointError, ImageError, PromptError
from rsedge.models.unirs.config import CHANGE_ATTENTION_DIM, EvalOverrides, UniRSConfig
from rsedge.models.unirs.prompt import IMAGE, PAIR, placeholders
from rsedge.models.unirs.weights import expected_tensors, load_checkpoint_tensors

IMAGE_TOKEN_INDEX = -200  # llava/constants.py


class DownSampleBlock(nn.Module):
    """base_projector.py lines 35-56. Tokens come in row-major (row x g + col); the names ``w``/``h`` of
    ``flat_square`` are the original's: ``w`` is the ROW axis. Zero-pad to even, fuse column pairs, swap
    axes, fuse row pairs: the output token is column-pair x g/2 + row-pair (COLUMN-major), its channels
    [x(2r,2c), x(2r,2c+1), x(2r+1,2c), x(2r+1,2c+1)]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, -1)
        x = self.flat_square(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])

    @staticmethod
    def flat_square(x: torch.Tensor) -> torch.Tensor:
        n, w, h, c = x.size()
        if w % 2 == 1:
            x = torch.concat([x, x.new_zeros((n, 1, h, c))], dim=1).contiguous()
            n, w, h, c = x.size()
        if h % 2 == 1:
            x = torch.concat([x, x.new_zeros((n, w, 1, c))], dim=2).contiguous()
            n, w, h, c = x.size()
        x = x.view(n, w, h // 2, c * 2)
        x = x.permute(0, 2, 1, 3).contiguous()
        return x.view(n, h // 2, w // 2, c * 4)


def single_projector(mm_hidden: int, hidden: int) -> nn.Sequential:
    """MultipleApplicationLayers.single (nn.LayerNorm's eps 1e-5, nn.GELU's exact erf form)."""
    return nn.Sequential(
        DownSampleBlock(),
        nn.LayerNorm(mm_hidden * 4),
        nn.Linear(mm_hidden * 4, hidden),
        nn.GELU(),
        nn.Linear(hidden, hidden),
    )


class ResBlock(nn.Module):
    """model_encoder.py resblock(C, C): 1x1 to C/2, BN, ReLU, 3x3, BN, ReLU, 1x1 to C, BN; + x; ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.left = nn.Sequential(
            nn.Conv2d(channels, half, kernel_size=1),
            nn.BatchNorm2d(half),
            nn.ReLU(),
            nn.Conv2d(half, half, kernel_size=3, stride=1, padding=1),
            nn.BatchNorm2d(half),
            nn.ReLU(),
            nn.Conv2d(half, channels, kernel_size=1),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.left(x) + x)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        # Dropouts at 1 and 4 keep the original's indices (net.0, net.3); they do nothing at eval.
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(0.0), nn.Linear(hidden, dim), nn.Dropout(0.0)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MultiHeadAtt(nn.Module):
    """model_encoder.py MultiHeadAtt. The values come from ``to_k`` (line 67); ``to_v`` exists, unused."""

    def __init__(self, dim: int, attention_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (attention_dim // heads) ** -0.5
        self.to_q = nn.Linear(dim, attention_dim, bias=False)
        self.to_k = nn.Linear(dim, attention_dim, bias=False)
        self.to_v = nn.Linear(dim, attention_dim, bias=False)
        project_out = not (heads == 1 and attention_dim == dim)
        self.to_out = nn.Sequential(nn.Linear(attention_dim, dim), nn.Dropout(0.0)) if project_out else nn.Identity()

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # 'b n (h d) -> b h n d'
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.to_q(x1)), self._split(self.to_k(x2)), self._split(self.to_k(x3))
        attn = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.scale, dim=-1)
        out = torch.matmul(attn, v)
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))  # 'b h n d -> b n (h d)'


class ChangeTransformer(nn.Module):
    """model_encoder.py Transformer with norm_first=False (post-norm), as AttentiveEncoder builds it."""

    def __init__(self, dim: int, heads: int, attention_dim: int, hidden: int) -> None:
        super().__init__()
        self.att = MultiHeadAtt(dim, attention_dim, heads)
        self.feedforward = FeedForward(dim, hidden)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        x = self.norm1(self.att(x1, x2, x3) + x1)
        return self.norm2(self.feedforward(x) + x)


class AttentiveEncoder(nn.Module):
    """The change-extraction module (model_encoder.py lines 98-170): two [B,g*g,C] maps -> one [B,g*g,C]."""

    def __init__(self, n_layers: int, grid: int, channels: int, heads: int, attention_dim: int = CHANGE_ATTENTION_DIM):
        super().__init__()
        self.h_feat = self.w_feat = grid
        self.h_embedding = nn.Embedding(grid, channels // 2)
        self.w_embedding = nn.Embedding(grid, channels // 2)
        self.selftrans = nn.ModuleList(
            nn.ModuleList(
                [
                    ChangeTransformer(channels, heads, attention_dim, channels),
                    ChangeTransformer(channels * 2, heads, attention_dim, channels),
                ]
            )
            for _ in range(n_layers)
        )
        self.Conv1 = nn.Conv2d(channels * 2, channels, kernel_size=1)
        self.LN = ResBlock(channels)
        self.cos = nn.CosineSimilarity(dim=1)

    def position_embedding(self) -> torch.Tensor:
        """[g*g, C]: token (row i, col j) gets [h_embedding[j], w_embedding[i]] (the h table is indexed by
        column, as lines 134-142 build it)."""
        pos = torch.arange(self.h_feat, device=self.h_embedding.weight.device)
        embed_h = self.w_embedding(pos)
        embed_w = self.h_embedding(pos)
        table = torch.cat(
            [embed_w.unsqueeze(0).repeat(self.h_feat, 1, 1), embed_h.unsqueeze(1).repeat(1, self.w_feat, 1)], dim=-1
        )
        return table.permute(2, 0, 1).reshape(table.shape[-1], -1).transpose(0, 1)

    def forward(self, img1: torch.Tensor, img2: torch.Tensor) -> torch.Tensor:
        batch, _, dep = img1.shape
        pos = self.position_embedding()[None]
        img1 = img1 + pos
        img2 = img2 + pos
        img_sa1, img_sa2 = img1, img2
        for layer, joint in self.selftrans:
            img_sa1 = layer(img_sa1, img_sa1, img_sa1) + img_sa1
            img_sa2 = layer(img_sa2, img_sa2, img_sa2) + img_sa2
            img = torch.cat([img_sa1, img_sa2], dim=-1)
            img = joint(img, img, img)
            img_sa1 = img[:, :, :dep] + img1
            img_sa2 = img[:, :, dep:] + img2
        img1 = img_sa1.reshape(batch, self.h_feat, self.w_feat, dep).permute(0, 3, 1, 2)
        img2 = img_sa2.reshape(batch, self.h_feat, self.w_feat, dep).permute(0, 3, 1, 2)
        similarity = self.cos(img1, img2)
        x = torch.cat([img1, img2], dim=1) + similarity.unsqueeze(1)
        x = self.LN(self.Conv1(x))
        return x.reshape(batch, x.shape[1], -1).permute(0, 2, 1)


@dataclass
class StepOutput:
    logits: torch.Tensor  # [B, S, V] float32
    cache: DynamicCache


class UniRSForCausalLM(nn.Module):
    def __init__(self, cfg: UniRSConfig) -> None:
        super().__init__()
        self.cfg = cfg
        v, t = cfg.vision, cfg.text
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
                vision_use_head=False,  # the pooling head's output is never used; its tensors are checked, dropped
                attn_implementation="eager",
            )
        )
        # Parameter names read vision_tower.vision_model.*: transformers 4.x nests the transformer there, 5.x not.
        self.vision_tower = nn.Module()
        self.vision_tower.vision_model = getattr(tower, "vision_model", tower)
        self.mm_projector = nn.Module()
        self.mm_projector.single = single_projector(v.hidden_size, t.hidden_size)
        if cfg.has_change:
            self.mm_projector.change = AttentiveEncoder(cfg.cc_n_layers, cfg.change_grid, v.hidden_size, cfg.cc_head)
        lcfg = LlamaConfig(
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
            bos_token_id=cfg.bos_token_id,
            eos_token_id=cfg.eos_token_id,
        )
        lcfg._attn_implementation = "eager"
        self.lm = LlamaForCausalLM(lcfg)

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, overrides: EvalOverrides | None = None, dtype: torch.dtype = torch.float32
    ) -> UniRSForCausalLM:
        """Build from a VILA-layout checkpoint, offline, through the strict weight map."""
        cfg = UniRSConfig.from_checkpoint(path, overrides)
        return cls.from_tensors(cfg, load_checkpoint_tensors(path, cfg), dtype)

    @classmethod
    def from_tensors(
        cls, cfg: UniRSConfig, tensors: dict[str, dict[str, torch.Tensor]], dtype: torch.dtype = torch.float32
    ) -> UniRSForCausalLM:
        """Build from per-folder tensors already checked by ``load_checkpoint_tensors``."""
        model = cls(cfg).to(dtype)
        targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        filled: set[str] = set()
        with torch.no_grad():
            for folder, table in expected_tensors(cfg).items():
                for name, spec in table.items():
                    if spec.module is None:
                        continue
                    target = targets[spec.module]
                    target.copy_(tensors[folder][name].to(target.dtype))
                    filled.add(spec.module)
        unfilled = sorted(set(dict(model.named_parameters())) - filled)
        if unfilled:
            raise CheckpointError(f"reference parameter {unfilled[0]!r} has no checkpoint tensor")
        return model.eval()  # BatchNorm on its running statistics, dropout off

    # -- vision ----------------------------------------------------------------------------------

    @torch.no_grad()
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N,3,S,S] -> [N,T,C]: the hidden state ``mm_vision_select_layer`` of the whole tower, all tokens."""
        out = self.vision_tower.vision_model(pixel_values=pixel_values, output_hidden_states=True)
        return out.hidden_states[self.cfg.mm_vision_select_layer]

    @torch.no_grad()
    def change_features(self, features1: torch.Tensor, features2: torch.Tensor) -> torch.Tensor:
        """Two [1,T,C] tower outputs -> the change map [1,T,C] the projector then takes."""
        if not self.cfg.has_change:
            raise ImageError(
                "this checkpoint has no change module (a VILA-1.5 projector): it cannot take an image pair"
            )
        return self.mm_projector.change(features1, features2)

    @torch.no_grad()
    def visual_blocks(self, kind: str, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The [tokens_per_image, H] blocks spliced in, one per ``<image>`` of the prompt.

        ``image``: one image -> one block. ``pair``: two images -> ONE block (change module, then ``single``).
        ``video``: N frames -> N blocks, each frame through ``single`` alone. The original picks the branch by
        the image count (1, 2, or ``num_video_frames``); naming the kind keeps a 2-frame video a video.
        """
        n = int(pixel_values.shape[0])
        expected = {IMAGE: 1, PAIR: 2}.get(kind, n)
        placeholders(kind, n)  # refuses an unknown kind or an empty video
        if n != expected:
            what = "an image takes 1 image" if kind == IMAGE else f"a {kind} takes {expected} images"
            raise ImageError(f"{what}, got {n}")
        if kind == PAIR and not self.cfg.has_change:
            raise ImageError(
                "this checkpoint has no change module (a VILA-1.5 projector): it cannot take an image pair"
            )
        feats = self.vision_features(pixel_values)
        if kind == PAIR:
            feats = self.mm_projector.change(feats[0:1], feats[1:2])
        return list(self.mm_projector.single(feats))

    # -- language ----------------------------------------------------------------------------------

    @torch.no_grad()
    def embed_prompt(self, input_ids: list[int], blocks: list[torch.Tensor]) -> torch.Tensor:
        """Splice the blocks in at the -200 sentinels, in order: [1, S, H]."""
        if input_ids.count(IMAGE_TOKEN_INDEX) != len(blocks):
            raise PromptError(
                f"the prompt has {input_ids.count(IMAGE_TOKEN_INDEX)} <image> for {len(blocks)} visual blocks"
            )
        embed = self.lm.model.embed_tokens
        pieces: list[torch.Tensor] = []
        chunk: list[int] = []
        images = iter(blocks)
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
    def step(self, inputs_embeds: torch.Tensor, cache: DynamicCache | None = None) -> StepOutput:
        """One decoder call (prefill or decode)."""
        cache = cache if cache is not None else DynamicCache()
        past = cache.get_seq_length()
        positions = torch.arange(past, past + inputs_embeds.shape[1], device=inputs_embeds.device)[None]
        out = self.lm(inputs_embeds=inputs_embeds, position_ids=positions, cache=cache, use_cache=True)
        return StepOutput(out.logits.float(), cache)  # the DynamicCache grows in place

    @torch.no_grad()
    def generate(
        self,
        input_ids: list[int],
        pixel_values: np.ndarray,
        kind: str,
        max_new_tokens: int,
        eos_token_id: int | Collection[int] | None = None,
        timings: dict[str, float] | None = None,
    ) -> tuple[list[int], list[np.ndarray]]:
        """Greedy decoding until ``</s>`` (vicuna_v1's stop; the config's eos by default) or the budget.

        Returns the new tokens and each step's last-position logits. ``timings``, when given, receives
        ``prefill_ms`` (embedding + the prompt's forward pass, after the vision side, as the runtime times its
        prefill), ``decode_ms`` and ``decode_steps`` (the one-token forward passes).
        """
        eos = self.cfg.eos_token_id if eos_token_id is None else eos_token_id
        stops = {eos} if isinstance(eos, int) else set(eos)
        weight = self.lm.model.embed_tokens.weight
        blocks = self.visual_blocks(kind, torch.from_numpy(np.asarray(pixel_values)).to(weight.device, weight.dtype))
        t0 = time.perf_counter()
        out = self.step(self.embed_prompt(input_ids, blocks))
        t1 = time.perf_counter()
        tokens: list[int] = []
        logits_seen: list[np.ndarray] = []
        steps = 0
        for _ in range(max_new_tokens):
            last = out.logits[0, -1]
            logits_seen.append(last.cpu().numpy().copy())
            tok = int(torch.argmax(last))
            tokens.append(tok)
            if tok in stops:
                break
            out = self.step(self.lm.model.embed_tokens(torch.tensor([[tok]], device=weight.device)), out.cache)
            steps += 1
        if timings is not None:
            timings.update(prefill_ms=(t1 - t0) * 1e3, decode_ms=(time.perf_counter() - t1) * 1e3, decode_steps=steps)
        return tokens, logits_seen
