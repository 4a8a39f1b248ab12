"""Which reference linears each quantized decoder-graph weight stands for: ONE map per architecture.

The decoder builder fuses linears that share an input (q/k/v into ``qkv_proj``, gate/up into ``gate_up_proj``)
and names the quantized head ``LM_HEAD_T`` tied or not. Two stages need to know, per graph weight, which
modules of the PyTorch reference it came from:

- quantization (``rsedge.quantize.activations``) hooks the input of the first module of each entry: AWQ's
  activation statistics are recorded under the graph weight's name;
- validation (``rsedge.export.validate.apply_fake_quant``) splits each dequantized graph weight back into its
  modules' rows, so the reference computes what the graph's codes define.

An architecture's exporter provides the map (``Exporter.linear_map``), built here from the decoder's
``DecoderSpec`` and where the reference keeps its language model; both stages read that one object.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

from rsedge.export.decoder_graph import EMBED_TOKENS, LM_HEAD_T
from rsedge.export.decoder_spec import DecoderSpec

# The WeightStore cache entry holding the export's map (the driver puts it there): that cache is what validation
# reads of what the graphs carry (codes, q and AWQ scales, INT8 embedding rows), and now of what they stand for.
LINEAR_MAP = ("linear_map",)


@dataclass(frozen=True)
class FusedLinear:
    """One graph weight and the reference ``nn.Linear`` modules whose output rows it concatenates, in order."""

    graph: str  # the decoder graph's weight name, e.g. "model.layers.0.self_attn.qkv_proj.weight_t"
    modules: tuple[str, ...]  # e.g. ("lm.model.layers.0.self_attn.q_proj", ".k_proj", ".v_proj")

    @property
    def input_module(self) -> str:
        """The module whose input is the graph weight's input (fused modules share theirs)."""
        return self.modules[0]


@dataclass(frozen=True)
class LinearMap:
    """Every quantizable decoder weight of one architecture's graphs, and the reference's embedding table
    (the parameter a quantized bundle's per-row INT8 embeddings stand for)."""

    entries: tuple[FusedLinear, ...]
    embedding: str  # the reference parameter of the token embedding table

    def __iter__(self) -> Iterator[FusedLinear]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @cached_property
    def by_graph(self) -> dict[str, FusedLinear]:
        return {e.graph: e for e in self.entries}

    @cached_property
    def by_input_module(self) -> dict[str, str]:
        """Reference module -> the graph weight its input feeds (only the first module of a fused entry)."""
        return {e.input_module: e.graph for e in self.entries}


def decoder_linear_map(spec: DecoderSpec, reference_prefix: str = "lm.") -> LinearMap:
    """The map of the decoder ``spec`` describes, for a reference holding a transformers causal LM (its
    ``model.layers.*`` and ``lm_head``) under ``reference_prefix``.

    Names follow the builder (``decoder_graph._qkv_projection``, ``_o_projection``, ``_mlp``, ``_lm_head``):
    every expert's MLP of every layer, then the head.
    """
    text, p = spec.text, reference_prefix
    entries: list[FusedLinear] = []
    for i in range(text.num_hidden_layers):
        attn = f"model.layers.{i}.self_attn"
        qkv = tuple(f"{p}{attn}.{x}_proj" for x in ("q", "k", "v"))
        entries.append(FusedLinear(f"{attn}.qkv_proj.weight_t", qkv))
        entries.append(FusedLinear(f"{attn}.o_proj.weight_t", (f"{p}{attn}.o_proj",)))
        for e in range(text.num_experts):
            mlp = spec.mlp_prefix(i, e)
            entries.append(FusedLinear(f"{mlp}.gate_up_proj.weight_t", (f"{p}{mlp}.gate_proj", f"{p}{mlp}.up_proj")))
            entries.append(FusedLinear(f"{mlp}.down_proj.weight_t", (f"{p}{mlp}.down_proj",)))
    entries.append(FusedLinear(LM_HEAD_T, (f"{p}lm_head",)))
    return LinearMap(tuple(entries), f"{p}{EMBED_TOKENS}")
