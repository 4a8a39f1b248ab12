"""Random-weight RSUniVLM checkpoints in the released on-disk layout, for tests and benchmarks.

``tiny`` is small enough for CI; ``full`` has the released dimensions (SigLIP-so400m with 26 layers,
Qwen2-0.5B with 24 layers x 3 experts, vocab 151,936), sharded like a hub checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from rsedge.errors import OptionError
from rsedge.fsutil import atomic_folder
from rsedge.models.rsunivlm.config import KNOWN_VISION_TOWERS, MODEL_TYPE, RSUniVLMConfig
from rsedge.models.rsunivlm.tokenizer_files import train_tokenizer, write_tokenizer_files
from rsedge.models.rsunivlm.weights import expected_tensors

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "tokenizer_vocab": 640,
        "text": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        "vision": {
            "hidden_size": 48,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "patch_size": 8,
            "image_size": 64,
            "layer_norm_eps": 1e-6,
            "hidden_act": "gelu_pytorch_tanh",
        },
        "tower": "rsedge/siglip-tiny-patch8-64",
        "dtype": torch.float32,
        "shard_bytes": None,
    },
    "full": {
        "tokenizer_vocab": 4096,
        "vocab_size": 151936,
        "text": {
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
        },
        "vision": None,  # the released config names the tower only; its shape comes from the known table
        "tower": "google/siglip-so400m-patch14-384",
        "dtype": torch.bfloat16,
        "shard_bytes": 2_000_000_000,
    },
}

# anyres_max pinpoints for a tiny tower: every (i*64, j*64) grid up to 3x3, as OneVision lists 384-multiples.
TINY_ANYRES_PINPOINTS = [[64 * i, 64 * j] for i in range(1, 4) for j in range(1, 4)]


def checkpoint_config_dict(
    text: dict[str, int],
    vision: dict[str, Any] | None,
    tower: str,
    vocab_size: int,
    special: dict[str, int],
    dtype: str = "float32",
    aspect: str = "square",
    pinpoints: list[list[int]] | None = None,
    tied: bool = False,
) -> dict[str, Any]:
    """config.json with the released fields; ``vision`` None means the tower is known by its hub id.

    ``tied``: lm_head reads the embedding table (Qwen2-0.5B's own ``tie_word_embeddings: true``).
    """
    cfg: dict[str, Any] = {
        "architectures": ["LlavaQwenGMoeForCausalLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": vocab_size,
        **text,
        "max_position_embeddings": 32768,
        "max_window_layers": text["num_hidden_layers"],
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": tied,
        "use_sliding_window": False,
        "torch_dtype": dtype,
        "bos_token_id": special["<|endoftext|>"],
        "eos_token_id": special["<|im_end|>"],
        "mm_vision_tower": tower,
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": (vision or KNOWN_VISION_TOWERS[tower])["hidden_size"],
        "mm_patch_merge_type": "spatial_unpad",
        "mm_newline_position": "grid",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_spatial_pool_mode": "bilinear",
        "image_aspect_ratio": aspect,
        "image_grid_pinpoints": pinpoints,
        "num_experts": 3,
    }
    if vision is not None:
        cfg["vision_config"] = dict(vision)
    return cfg


def checkpoint_config(
    size: str, vocab_size: int, special: dict[str, int], aspect: str, tied: bool = False
) -> dict[str, Any]:
    spec = SIZES[size]
    if aspect != "square" and size != "tiny":
        raise OptionError("anyres checkpoints are made at size tiny only")
    return checkpoint_config_dict(
        spec["text"],
        spec["vision"],
        spec["tower"],
        vocab_size,
        special,
        dtype="bfloat16" if spec["dtype"] == torch.bfloat16 else "float32",
        aspect=aspect,
        pinpoints=TINY_ANYRES_PINPOINTS if aspect != "square" else None,
        tied=tied,
    )


def write_config_files(folder: Path, config: dict[str, Any]) -> None:
    """config.json and the greedy generation_config.json of the released layout."""
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"], "do_sample": False}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def random_tensors(cfg: RSUniVLMConfig, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Weights scaled so activations stay O(1) and logits are peaked (greedy parity then has margin).

    Every expert draws its own weights, so a routing mistake changes the answer.
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, spec in expected_tensors(cfg).items():
        shape = spec.shape
        if name.endswith(("layernorm.weight", "norm.weight", "layer_norm1.weight", "layer_norm2.weight")):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) == 1:
            t = 0.02 * torch.randn(shape, generator=gen)
        elif name in ("model.embed_tokens.weight",):
            t = torch.randn(shape, generator=gen)
        elif name == "lm_head.weight":
            t = torch.randn(shape, generator=gen) * (4.0 / shape[1] ** 0.5)
        else:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            t = torch.randn(shape, generator=gen) / fan_in**0.5
        out[name] = t.to(dtype).contiguous()
    return out


def _save_sharded(tensors: dict[str, torch.Tensor], out: Path, shard_bytes: int | None) -> None:
    if shard_bytes is None:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )


def make_checkpoint(
    out: str | Path, size: str = "tiny", seed: int = 0, aspect: str = "square", tied: bool = False
) -> Path:
    """Write a random-weight checkpoint to ``out`` (atomically: a temp folder moved into place).

    ``tied``: no ``lm_head.weight``; the decoder's head reads ``model.embed_tokens.weight``.
    """
    if size not in SIZES:
        raise OptionError(f"unknown checkpoint size {size!r}; choose from {', '.join(SIZES)}")
    spec = SIZES[size]
    out = Path(out)
    with atomic_folder(out) as tmp:
        tok = train_tokenizer(spec["tokenizer_vocab"])
        special = write_tokenizer_files(tok, tmp)
        vocab = spec.get("vocab_size", tok.get_vocab_size())
        cfg_dict = checkpoint_config(size, vocab, special, aspect, tied)
        write_config_files(tmp, cfg_dict)
        cfg = RSUniVLMConfig.from_dict(cfg_dict)
        _save_sharded(random_tensors(cfg, seed, spec["dtype"]), tmp, spec["shard_bytes"])
    return out
