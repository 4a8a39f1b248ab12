"""The declared, strict weight-name map of an RSUniVLM checkpoint.

Every tensor a checkpoint must hold is listed here with its shape (derived from the config) and the
name of the parameter it fills in the reference model. Loading fails on the first missing, unexpected
or misshapen tensor, naming it: a silently skipped tensor is how a VLM ends up answering nonsense.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from rsedge.errors import CheckpointError
from rsedge.models.rsunivlm.config import RSUniVLMConfig
from rsedge.models.safetensors_files import checkpoint_files, iter_checkpoint

__all__ = ["check_finite", "checkpoint_files", "expected_tensors", "iter_checkpoint", "load_checkpoint_tensors"]

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
Shape = tuple[int, ...]


@dataclass(frozen=True)
class TensorRule:
    """One family of checkpoint tensors: a name template, the module parameter it maps to, its shape."""

    checkpoint: str  # may hold {i} (layer) and {e} (expert)
    module: str
    shape: Callable[[RSUniVLMConfig], Shape]
    scope: str = "none"  # "text_layers", "vision_layers" or "none": what {i} ranges over


def _t(c: RSUniVLMConfig):
    return c.text


def _v(c: RSUniVLMConfig):
    return c.vision


def _qkv_rows(c: RSUniVLMConfig, kind: str) -> int:
    heads = c.text.num_attention_heads if kind == "q" else c.text.num_key_value_heads
    return heads * c.text.head_dim


TEXT_RULES: tuple[TensorRule, ...] = (
    TensorRule(
        "model.embed_tokens.weight", "lm.model.embed_tokens.weight", lambda c: (_t(c).vocab_size, _t(c).hidden_size)
    ),
    TensorRule("model.norm.weight", "lm.model.norm.weight", lambda c: (_t(c).hidden_size,)),
    *(
        TensorRule(
            f"model.layers.{{i}}.self_attn.{p}_proj.weight",
            f"lm.model.layers.{{i}}.self_attn.{p}_proj.weight",
            lambda c, p=p: (_qkv_rows(c, p), _t(c).hidden_size),
            "text_layers",
        )
        for p in ("q", "k", "v")
    ),
    *(
        TensorRule(
            f"model.layers.{{i}}.self_attn.{p}_proj.bias",
            f"lm.model.layers.{{i}}.self_attn.{p}_proj.bias",
            lambda c, p=p: (_qkv_rows(c, p),),
            "text_layers",
        )
        for p in ("q", "k", "v")
    ),
    TensorRule(
        "model.layers.{i}.self_attn.o_proj.weight",
        "lm.model.layers.{i}.self_attn.o_proj.weight",
        lambda c: (_t(c).hidden_size, _qkv_rows(c, "q")),
        "text_layers",
    ),
    TensorRule(
        "model.layers.{i}.input_layernorm.weight",
        "lm.model.layers.{i}.input_layernorm.weight",
        lambda c: (_t(c).hidden_size,),
        "text_layers",
    ),
    TensorRule(
        "model.layers.{i}.post_attention_layernorm.weight",
        "lm.model.layers.{i}.post_attention_layernorm.weight",
        lambda c: (_t(c).hidden_size,),
        "text_layers",
    ),
    TensorRule(
        "model.layers.{i}.mlp.{e}.gate_proj.weight",
        "lm.model.layers.{i}.mlp.{e}.gate_proj.weight",
        lambda c: (_t(c).intermediate_size, _t(c).hidden_size),
        "text_layers",
    ),
    TensorRule(
        "model.layers.{i}.mlp.{e}.up_proj.weight",
        "lm.model.layers.{i}.mlp.{e}.up_proj.weight",
        lambda c: (_t(c).intermediate_size, _t(c).hidden_size),
        "text_layers",
    ),
    TensorRule(
        "model.layers.{i}.mlp.{e}.down_proj.weight",
        "lm.model.layers.{i}.mlp.{e}.down_proj.weight",
        lambda c: (_t(c).hidden_size, _t(c).intermediate_size),
        "text_layers",
    ),
)

LM_HEAD_RULE = TensorRule("lm_head.weight", "lm.lm_head.weight", lambda c: (_t(c).vocab_size, _t(c).hidden_size))

_VL = VISION_PREFIX + "encoder.layers.{i}."
VISION_RULES: tuple[TensorRule, ...] = (
    TensorRule(
        VISION_PREFIX + "embeddings.patch_embedding.weight",
        "vision_tower.vision_model.embeddings.patch_embedding.weight",
        lambda c: (_v(c).hidden_size, _v(c).num_channels, _v(c).patch_size, _v(c).patch_size),
    ),
    TensorRule(
        VISION_PREFIX + "embeddings.patch_embedding.bias",
        "vision_tower.vision_model.embeddings.patch_embedding.bias",
        lambda c: (_v(c).hidden_size,),
    ),
    TensorRule(
        VISION_PREFIX + "embeddings.position_embedding.weight",
        "vision_tower.vision_model.embeddings.position_embedding.weight",
        lambda c: (_v(c).num_patches, _v(c).hidden_size),
    ),
    # Computed upstream but unused (features are taken before it); kept so a checkpoint loads strictly.
    TensorRule(
        VISION_PREFIX + "post_layernorm.weight",
        "vision_tower.vision_model.post_layernorm.weight",
        lambda c: (_v(c).hidden_size,),
    ),
    TensorRule(
        VISION_PREFIX + "post_layernorm.bias",
        "vision_tower.vision_model.post_layernorm.bias",
        lambda c: (_v(c).hidden_size,),
    ),
    *(
        TensorRule(
            _VL + f"self_attn.{p}_proj.{w}",
            f"vision_tower.vision_model.encoder.layers.{{i}}.self_attn.{p}_proj.{w}",
            (lambda c: (_v(c).hidden_size, _v(c).hidden_size)) if w == "weight" else (lambda c: (_v(c).hidden_size,)),
            "vision_layers",
        )
        for p in ("q", "k", "v", "out")
        for w in ("weight", "bias")
    ),
    *(
        TensorRule(
            _VL + f"{n}.{w}",
            f"vision_tower.vision_model.encoder.layers.{{i}}.{n}.{w}",
            lambda c: (_v(c).hidden_size,),
            "vision_layers",
        )
        for n in ("layer_norm1", "layer_norm2")
        for w in ("weight", "bias")
    ),
    TensorRule(
        _VL + "mlp.fc1.weight",
        "vision_tower.vision_model.encoder.layers.{i}.mlp.fc1.weight",
        lambda c: (_v(c).intermediate_size, _v(c).hidden_size),
        "vision_layers",
    ),
    TensorRule(
        _VL + "mlp.fc1.bias",
        "vision_tower.vision_model.encoder.layers.{i}.mlp.fc1.bias",
        lambda c: (_v(c).intermediate_size,),
        "vision_layers",
    ),
    TensorRule(
        _VL + "mlp.fc2.weight",
        "vision_tower.vision_model.encoder.layers.{i}.mlp.fc2.weight",
        lambda c: (_v(c).hidden_size, _v(c).intermediate_size),
        "vision_layers",
    ),
    TensorRule(
        _VL + "mlp.fc2.bias",
        "vision_tower.vision_model.encoder.layers.{i}.mlp.fc2.bias",
        lambda c: (_v(c).hidden_size,),
        "vision_layers",
    ),
)

CONNECTOR_RULES: tuple[TensorRule, ...] = (
    TensorRule(
        "model.mm_projector.0.weight", "mm_projector.0.weight", lambda c: (_t(c).hidden_size, _v(c).hidden_size)
    ),
    TensorRule("model.mm_projector.0.bias", "mm_projector.0.bias", lambda c: (_t(c).hidden_size,)),
    TensorRule(
        "model.mm_projector.2.weight", "mm_projector.2.weight", lambda c: (_t(c).hidden_size, _t(c).hidden_size)
    ),
    TensorRule("model.mm_projector.2.bias", "mm_projector.2.bias", lambda c: (_t(c).hidden_size,)),
    TensorRule("model.image_newline", "image_newline", lambda c: (_t(c).hidden_size,)),
)


@dataclass(frozen=True)
class ExpectedTensor:
    module: str
    shape: Shape


def expected_tensors(cfg: RSUniVLMConfig) -> dict[str, ExpectedTensor]:
    """Every checkpoint tensor name of this config, with the module parameter it fills and its shape."""
    rules = [*TEXT_RULES, *VISION_RULES, *CONNECTOR_RULES]
    if not cfg.text.tie_word_embeddings:
        rules.append(LM_HEAD_RULE)
    out: dict[str, ExpectedTensor] = {}
    for r in rules:
        layers = {"text_layers": cfg.text.num_hidden_layers, "vision_layers": cfg.vision.num_hidden_layers}
        n_layers = layers.get(r.scope, 1)
        n_experts = cfg.text.num_experts if "{e}" in r.checkpoint else 1
        shape = tuple(int(s) for s in r.shape(cfg))
        for i in range(n_layers):
            for e in range(n_experts):
                out[r.checkpoint.format(i=i, e=e)] = ExpectedTensor(r.module.format(i=i, e=e), shape)
    return out


def load_checkpoint_tensors(path: str | Path, cfg: RSUniVLMConfig) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, checked name by name and shape by shape against the declared map."""
    path = Path(path)
    expected = expected_tensors(cfg)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in iter_checkpoint(path):
        spec = expected.get(name)
        if spec is None:
            raise CheckpointError(f"{path}: unexpected tensor {name!r} (not in the RSUniVLM weight map)")
        if tuple(t.shape) != spec.shape:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, config implies {spec.shape}")
        tensors[name] = t
    missing = [n for n in expected if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: missing tensor {missing[0]!r}{more}")
    return tensors


def check_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse a checkpoint with NaN or infinite weights, naming the first such tensor: nothing exported from it
    could answer, and validation (when run) would only report the graphs' outputs as NaN."""
    for name, t in tensors.items():
        if t.is_floating_point():
            bad = t.numel() - int(torch.isfinite(t).sum())
            if bad:
                raise CheckpointError(f"tensor {name!r} has {bad} NaN or infinite values; the checkpoint is broken")
