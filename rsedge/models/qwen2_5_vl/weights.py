"""The declared, strict weight map of a Qwen2.5-VL checkpoint.

Names are read in either spelling: the released checkpoints' (``visual.*``, ``model.*``, ``lm_head.weight``) and
transformers 5's in-memory one (``model.visual.*``, ``model.language_model.*``); both become the released names
here. Every missing, unexpected, duplicated or misshapen tensor is named in one CheckpointError line.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rsedge.errors import CheckpointError
from rsedge.models.qwen2_5_vl.config import Qwen25VLConfig
from rsedge.models.safetensors_files import iter_checkpoint

Shape = tuple[int, ...]
# transformers 5 prefix -> released prefix (the first match wins; lm_head.weight is the same in both)
PREFIXES = (("model.visual.", "visual."), ("model.language_model.", "model."))


def released_name(name: str) -> str:
    """A tensor's name in the released checkpoints' spelling."""
    for new, old in PREFIXES:
        if name.startswith(new):
            return old + name[len(new) :]
    return name


def text_tensors(c: Qwen25VLConfig) -> dict[str, Shape]:
    t = c.text
    H, FF, hd, nh, kv = t.hidden_size, t.intermediate_size, t.head_dim, t.num_attention_heads, t.num_key_value_heads
    out: dict[str, Shape] = {"model.embed_tokens.weight": (t.vocab_size, H), "model.norm.weight": (H,)}
    if not t.tie_word_embeddings:
        out["lm_head.weight"] = (t.vocab_size, H)
    for i in range(t.num_hidden_layers):
        p = f"model.layers.{i}."
        out |= {
            p + "self_attn.q_proj.weight": (nh * hd, H),
            p + "self_attn.q_proj.bias": (nh * hd,),
            p + "self_attn.k_proj.weight": (kv * hd, H),
            p + "self_attn.k_proj.bias": (kv * hd,),
            p + "self_attn.v_proj.weight": (kv * hd, H),
            p + "self_attn.v_proj.bias": (kv * hd,),
            p + "self_attn.o_proj.weight": (H, nh * hd),
            p + "mlp.gate_proj.weight": (FF, H),
            p + "mlp.up_proj.weight": (FF, H),
            p + "mlp.down_proj.weight": (H, FF),
            p + "input_layernorm.weight": (H,),
            p + "post_attention_layernorm.weight": (H,),
        }
    return out


def vision_tensors(c: Qwen25VLConfig) -> dict[str, Shape]:
    v = c.vision
    D, FF, out_d = int(v["hidden_size"]), int(v["intermediate_size"]), int(v["out_hidden_size"])
    merged = D * int(v["spatial_merge_size"]) ** 2
    patch = (D, int(v["in_channels"]), int(v["temporal_patch_size"]), int(v["patch_size"]), int(v["patch_size"]))
    out: dict[str, Shape] = {
        "visual.patch_embed.proj.weight": patch,
        "visual.merger.ln_q.weight": (D,),
        "visual.merger.mlp.0.weight": (merged, merged),
        "visual.merger.mlp.0.bias": (merged,),
        "visual.merger.mlp.2.weight": (out_d, merged),
        "visual.merger.mlp.2.bias": (out_d,),
    }
    for i in range(int(v["depth"])):
        p = f"visual.blocks.{i}."
        out |= {
            p + "norm1.weight": (D,),
            p + "norm2.weight": (D,),
            p + "attn.qkv.weight": (3 * D, D),
            p + "attn.qkv.bias": (3 * D,),
            p + "attn.proj.weight": (D, D),
            p + "attn.proj.bias": (D,),
            p + "mlp.gate_proj.weight": (FF, D),
            p + "mlp.gate_proj.bias": (FF,),
            p + "mlp.up_proj.weight": (FF, D),
            p + "mlp.up_proj.bias": (FF,),
            p + "mlp.down_proj.weight": (D, FF),
            p + "mlp.down_proj.bias": (D,),
        }
    return out


def expected_tensors(c: Qwen25VLConfig) -> dict[str, Shape]:
    return {**vision_tensors(c), **text_tensors(c)}


def load_checkpoint_tensors(path: str | Path, cfg: Qwen25VLConfig) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint under its released name; CheckpointError names the first problem."""
    path = Path(path)
    expected = expected_tensors(cfg)
    tensors: dict[str, torch.Tensor] = {}
    for raw, tensor in iter_checkpoint(path):
        name = released_name(raw)
        if name in tensors:
            raise CheckpointError(f"{path}: tensor {name} appears twice (as {raw} and under another spelling)")
        if name not in expected:
            raise CheckpointError(f"{path}: unexpected tensor {raw} (not in a Qwen2.5-VL of this config)")
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(
                f"{path}: tensor {raw} has shape {list(tensor.shape)}, the config implies {list(expected[name])}"
            )
        tensors[name] = tensor
    missing = [n for n in expected if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: missing tensor {missing[0]}{more}")
    return tensors
