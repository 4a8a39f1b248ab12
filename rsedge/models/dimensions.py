"""The dimensions of a VLM's parts that every architecture shares: a ViT-style vision tower and a decoder-only
language model. An architecture's config holds one of each (RSUniVLM's Qwen2 with experts, UniRS's LLaMA);
the graph builders and the runtime's decoder records read them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int
    image_size: int
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    num_channels: int = 3

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    num_experts: int = 3  # RSUniVLM's MLPs per layer (a field its configs may omit); 1 for a dense model

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads
