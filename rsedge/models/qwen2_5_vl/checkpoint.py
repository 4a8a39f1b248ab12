"""Random-weight Qwen2.5-VL checkpoints in the Hugging Face layout, for tests and export costs.

``full`` has Qwen2.5-VL-3B-Instruct's dimensions (LM 2048 wide, 36 layers, 16 heads / 2 KV heads, FFN 11008,
vocab 151936, tied head, mrope sections 16/24/24; vision 1280 wide, 32 blocks, window attention except blocks
7/15/23/31), bfloat16 in ~2 GB shards drawn shard by shard, so the model never sits in memory whole. ``tiny``
keeps every structural fact (14 px patches, 2 x 2 merge, 112 px windows with full-attention blocks between,
q/k/v biases, a tied head, three mrope sections) at toy widths, and caps images at 448 x 448 px so tests stay
seconds. The tokenizer is small either way (``tokenizer_files``); its special tokens' ids go to config.json.
Names are the released checkpoints' (``visual.*``, ``model.*``), as transformers 5's save_pretrained writes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from rsedge.errors import OptionError
from rsedge.fsutil import atomic_folder
from rsedge.models.qwen2_5_vl.config import MODEL_TYPE, Qwen25VLConfig
from rsedge.models.qwen2_5_vl.tokenizer_files import train_tokenizer, write_tokenizer_files
from rsedge.models.qwen2_5_vl.weights import expected_tensors

# OpenAI CLIP's normalisation, as Qwen2.5-VL's preprocessor_config.json gives it
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "tokenizer_vocab": 700,
        "vocab_size": 704,
        "text": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
        },
        "mrope_section": [2, 3, 3],
        "vision": {
            "depth": 4,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "fullatt_block_indexes": [1, 3],
            "tokens_per_second": 2,
            "window_size": 112,
        },
        "max_pixels": 448 * 448,
        "dtype": torch.float32,
        "shard_bytes": None,
    },
    "full": {
        "tokenizer_vocab": 4096,
        "vocab_size": 151936,
        "text": {
            "hidden_size": 2048,
            "intermediate_size": 11008,
            "num_hidden_layers": 36,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128000,
        },
        "mrope_section": [16, 24, 24],
        "vision": {
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2,
            "window_size": 112,
        },
        "max_pixels": 12845056,
        "dtype": torch.bfloat16,
        "shard_bytes": 2_000_000_000,
    },
}


def config_dict(size: str, ids: dict[str, int]) -> dict[str, Any]:
    """config.json in the released (transformers 4.x, flat) layout."""
    s = SIZES[size]
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": MODEL_TYPE,
        "vocab_size": s["vocab_size"],
        **s["text"],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": s["mrope_section"]},
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": 70,
        "attention_dropout": 0.0,
        "torch_dtype": "bfloat16" if s["dtype"] == torch.bfloat16 else "float32",
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "vision_config": {
            "model_type": "qwen2_5_vl",
            **s["vision"],
            "hidden_act": "silu",
            "in_chans": 3,
            "in_channels": 3,
            "out_hidden_size": s["text"]["hidden_size"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
        },
    }


def preprocessor_dict(size: str) -> dict[str, Any]:
    """preprocessor_config.json as Qwen2.5-VL releases it (max_pixels smaller for the tiny size)."""
    min_pixels, max_pixels = 56 * 56, SIZES[size]["max_pixels"]
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "image_processor_type": "Qwen2VLImageProcessor",
        "max_pixels": max_pixels,
        "min_pixels": min_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "merge_size": 2,
        "patch_size": 14,
        "processor_class": "Qwen2_5_VLProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "temporal_patch_size": 2,
    }


# Gains on the decoder's projections: peaked, position-dependent attention and layers that outweigh the input
# embedding, so a random model's greedy answer changes token to token instead of repeating one.
LM_GAINS = {"q_proj": 2.0, "k_proj": 2.0, "o_proj": 2.0, "down_proj": 2.0}


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Weights scaled so activations stay O(1) and the logits peaked (greedy tokens far from ties); norm
    scales near 1, biases small but non-zero so a dropped bias shows."""
    if len(shape) == 1 and ("norm" in name or "ln_q" in name):
        t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
    elif len(shape) == 1:
        t = 0.1 * torch.randn(shape, generator=gen)
    elif name == "model.embed_tokens.weight":
        # small beside the layers' outputs: with a tied head, a residual stream that is mostly the input
        # embedding echoes the last token forever (greedy decoding of one repeated token proves little)
        t = 0.25 * torch.randn(shape, generator=gen)
    else:
        t = torch.randn(shape, generator=gen) / math.prod(shape[1:]) ** 0.5
        if name.startswith("model.layers.") and any(p in name for p in LM_GAINS):
            t = t * LM_GAINS[next(p for p in LM_GAINS if p in name)]
    return t.to(dtype).contiguous()


def write_random_tensors(
    folder: Path, table: dict[str, tuple[int, ...]], gen: torch.Generator, dtype: torch.dtype, shard_bytes: int | None
) -> None:
    """Draw and save the tensors shard by shard, in the declared order (the draws do not depend on sharding)."""
    item = torch.empty((), dtype=dtype).element_size()
    nbytes = {n: math.prod(s) * item for n, s in table.items()}
    shards: list[list[str]] = [[]]
    size = 0
    for name in table:
        if shard_bytes is not None and shards[-1] and size + nbytes[name] > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes[name]
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    for fname, names in zip(files, shards, strict=True):
        tensors = {name: random_tensor(name, table[name], gen, dtype) for name in names}
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors
    if n > 1:
        weight_map = {name: f for f, names in zip(files, shards, strict=True) for name in names}
        index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def make_checkpoint(out: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight Qwen2.5-VL checkpoint to ``out`` (atomically); returns its path."""
    if size not in SIZES:
        raise OptionError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    out = Path(out)
    spec = SIZES[size]
    with atomic_folder(out) as tmp:
        ids = write_tokenizer_files(train_tokenizer(spec["tokenizer_vocab"]), tmp, model_max_length=32768)
        cfg = config_dict(size, ids)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "preprocessor_config.json").write_text(json.dumps(preprocessor_dict(size), indent=2) + "\n")
        generation = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": [cfg["eos_token_id"], ids["<|endoftext|>"]]}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        table = expected_tensors(Qwen25VLConfig.from_dict(cfg))
        gen = torch.Generator().manual_seed(seed)
        write_random_tensors(tmp, table, gen, spec["dtype"], spec["shard_bytes"])
    return out
