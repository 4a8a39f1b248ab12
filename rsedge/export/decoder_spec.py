"""What tells one decoder-only language model from another, to the decoder graph builder.

Qwen2 with RSUniVLM's experts and a dense LLaMA (VILA-1.5 / UniRS's Sheared-LLaMA) share every op the builder
emits: RMSNorm, rotate-half RoPE, grouped-query attention, a gated SiLU MLP. They differ in a few facts a
spec carries, so a new family is a spec, not a copy of the builder:

- ``qkv_bias``: Qwen2 has q/k/v biases, LLaMA none;
- ``mlp``: the weight-name prefix of a layer's MLP (``{layer}``, and ``{expert}`` when it has experts);
- ``text.num_experts``: 1 for a dense model (one graph, ``decoder_expert0``);
- ``activation`` and ``rope``: the gate's activation and the rotary convention (the builder emits SiLU, and
  rotate-half or Qwen2-VL's multimodal rotary ``mrope``; another value is refused rather than exported wrong);
- ``mrope_section``: under ``mrope``, how many of the head's ``head_dim / 2`` frequencies follow the temporal,
  height and width position (Qwen2.5-VL's ``mrope_section``, e.g. 16, 24, 24); the graph then takes a
  ``rope_position_ids`` [3, B, S] input beside ``position_ids`` (which keep naming the cache slots);
- ``text.tie_word_embeddings``: lm_head read from the embedding table.
"""

from __future__ import annotations

from dataclasses import dataclass

from rsedge.errors import OptionError
from rsedge.models.dimensions import TextConfig

ACTIVATIONS = ("silu",)
ROPE_KINDS = ("rotate-half", "mrope")


@dataclass(frozen=True)
class DecoderSpec:
    text: TextConfig
    name: str = "Qwen2"
    qkv_bias: bool = True
    mlp: str = "model.layers.{layer}.mlp.{expert}"
    activation: str = "silu"
    rope: str = "rotate-half"
    mrope_section: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise OptionError(f"decoder activation {self.activation!r} is not built (built: {', '.join(ACTIVATIONS)})")
        if self.rope not in ROPE_KINDS:
            raise OptionError(f"rotary embedding {self.rope!r} is not built (built: {', '.join(ROPE_KINDS)})")
        half = self.text.head_dim // 2
        if self.rope == "mrope" and (len(self.mrope_section) != 3 or sum(self.mrope_section) != half):
            raise OptionError(f"mrope needs 3 sections summing to head_dim/2 = {half}, got {list(self.mrope_section)}")
        if self.rope != "mrope" and self.mrope_section:
            raise OptionError(f"mrope_section is for rope 'mrope', not {self.rope!r}")
        if self.text.num_experts > 1 and "{expert}" not in self.mlp:
            raise OptionError(f"{self.text.num_experts} experts need an MLP name with {{expert}}, got {self.mlp!r}")

    def mlp_prefix(self, layer: int, expert: int) -> str:
        return self.mlp.format(layer=layer, expert=expert)


def qwen2_experts(text: TextConfig) -> DecoderSpec:
    """RSUniVLM's decoder: Qwen2 with q/k/v biases and ``text.num_experts`` MLPs per layer."""
    return DecoderSpec(text)


def llama(text: TextConfig) -> DecoderSpec:
    """A dense LLaMA decoder (no q/k/v biases, one MLP per layer), e.g. VILA-1.5's Sheared-LLaMA."""
    if text.num_experts != 1:
        raise OptionError(f"a dense LLaMA decoder has one MLP per layer, not {text.num_experts}")
    return DecoderSpec(text, name="LLaMA", qkv_bias=False, mlp="model.layers.{layer}.mlp")


def qwen2_5_vl(text: TextConfig, mrope_section: tuple[int, ...]) -> DecoderSpec:
    """Qwen2.5-VL's language model: dense Qwen2 (q/k/v biases, one MLP per layer) with multimodal rotary."""
    if text.num_experts != 1:
        raise OptionError(f"Qwen2.5-VL's decoder has one MLP per layer, not {text.num_experts}")
    return DecoderSpec(
        text, name="Qwen2.5-VL", mlp="model.layers.{layer}.mlp", rope="mrope", mrope_section=tuple(mrope_section)
    )
