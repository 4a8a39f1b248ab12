"""Random-weight UniRS / VILA-1.5 checkpoints in the VILA on-disk layout, for tests and benchmarks.

``full`` has VILA-1.5-3B's dimensions (Sheared-LLaMA-2.7B: 2560 wide, 32 layers, 20 heads, FFN 6912,
vocab 32000; SigLIP-so400m at 384 px: 1152 wide, 27 layers), in bfloat16, the LLM sharded. ``tiny`` keeps
SigLIP's 384 px / 14 px patches, so the 27x27 grid, the odd-size zero padding of the downsample, the 14x14
output grid (196 tokens per image) and the change module's 27-entry position tables are the released ones;
only the widths and depths shrink, which keeps a test to seconds.

``cc_layers`` is the number of change-transformer pairs (the original's ``cc_n_layers``; 0 as released).
Like the original, it is not written to config.json: load such a checkpoint with the same cc_n_layers.
``change=False`` writes a plain VILA-1.5 checkpoint: no change branch, projector keys ``layers.{1,2,4}.*``.
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
from rsedge.models.unirs.config import (
    LAYOUT_UNIRS,
    LAYOUT_VILA,
    MODEL_TYPE,
    PROJECTOR_TYPE,
    EvalOverrides,
    UniRSConfig,
)
from rsedge.models.unirs.tokenizer_files import train_tokenizer, write_tokenizer_files
from rsedge.models.unirs.weights import ExpectedTensor, expected_tensors

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "tokenizer_vocab": 640,
        "llm": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
        },
        "tower": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
        },
        "dtype": torch.float32,
        "shard_bytes": None,
    },
    "full": {
        "tokenizer_vocab": 4096,
        "vocab_size": 32000,
        "llm": {
            "hidden_size": 2560,
            "intermediate_size": 6912,
            "num_hidden_layers": 32,
            "num_attention_heads": 20,
            "num_key_value_heads": 20,
        },
        "tower": {
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
        },
        "dtype": torch.bfloat16,
        "shard_bytes": 2_000_000_000,
    },
}
SIGLIP_384 = {
    "image_size": 384,
    "patch_size": 14,
    "num_channels": 3,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}


def config_dicts(size: str, vocab_size: int, change: bool) -> tuple[dict, dict, dict, dict]:
    """(top-level config.json, llm/config.json, vision_tower/config.json, mm_projector/config.json)."""
    spec = SIZES[size]
    dtype = "bfloat16" if spec["dtype"] == torch.bfloat16 else "float32"
    llm = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        **spec["llm"],
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": dtype,
    }
    tower = {
        "architectures": ["SiglipVisionModel"],
        "model_type": "siglip_vision_model",
        **spec["tower"],
        **SIGLIP_384,
        "torch_dtype": dtype,
    }
    projector = {
        "architectures": ["MultimodalProjector"],
        "mm_projector_type": PROJECTOR_TYPE,
        "model_type": "v2l_projector",
    }
    top = {
        "architectures": ["LlavaLlamaModel"],
        "model_type": MODEL_TYPE,
        "llm_cfg": llm,
        "vision_tower_cfg": tower,
        "mm_projector_cfg": projector,
        "hidden_size": llm["hidden_size"],
        "mm_hidden_size": tower["hidden_size"],
        # UniRS trains with --image_aspect_ratio pad (sft.sh); VILA-1.5-3B ships "resize".
        "image_aspect_ratio": "pad" if change else "resize",
        "num_video_frames": 8,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "cls_patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "vision_resolution": -1,
        "interpolate_mode": "linear",
        "s2": False,
        "model_dtype": f"torch.{dtype}",
    }
    return top, llm, tower, projector


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Weights scaled so activations stay O(1) and logits are peaked; BatchNorm statistics away from 0/1 so
    that eval-mode BatchNorm (not batch statistics) is what a test sees."""
    if name.endswith("num_batches_tracked"):
        return torch.tensor(1000, dtype=torch.int64)
    if name.endswith("running_var"):
        t = 0.5 + torch.rand(shape, generator=gen)
    elif name.endswith("running_mean"):
        t = 0.2 * torch.randn(shape, generator=gen)
    elif _is_gamma(name, shape):
        t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
    elif len(shape) <= 1:
        t = 0.02 * torch.randn(shape, generator=gen)
    elif name == "model.embed_tokens.weight":
        t = torch.randn(shape, generator=gen)
    elif name == "lm_head.weight":
        t = torch.randn(shape, generator=gen) * (4.0 / shape[1] ** 0.5)
    elif name.endswith("_embedding.weight") and "change" in name:
        t = 0.5 * torch.randn(shape, generator=gen)
    else:
        fan_in = 1
        for s in shape[1:]:
            fan_in *= s
        t = torch.randn(shape, generator=gen) / fan_in**0.5
    return t.to(dtype).contiguous()


def _is_gamma(name: str, shape: tuple[int, ...]) -> bool:
    """A LayerNorm / RMSNorm / BatchNorm scale: drawn near 1, so a random checkpoint does not vanish."""
    if len(shape) != 1 or not name.endswith("weight"):
        return False
    return (
        "norm" in name.rsplit(".", 2)[-2]
        or ".LN.left." in name
        or name in ("layers.single.1.weight", "layers.1.weight")
    )


def write_random_folder(
    folder: Path, table: dict[str, ExpectedTensor], gen: torch.Generator, dtype: torch.dtype, shard_bytes: int | None
) -> None:
    """Draw and save one folder's tensors shard by shard: a full-size LLM never sits in memory whole."""
    item = torch.empty((), dtype=dtype).element_size()
    nbytes = {n: math.prod(s.shape) * (8 if n.endswith("num_batches_tracked") else item) for n, s in table.items()}
    shards: list[list[str]] = [[]]
    size = 0
    for name in table:  # the declared order, so the draws (and the weights) do not depend on the sharding
        if shard_bytes is not None and shards[-1] and size + nbytes[name] > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes[name]
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    )
    for fname, names in zip(files, shards, strict=True):
        tensors = {n: random_tensor(n, table[n].shape, gen, dtype) for n in names}
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors
    if len(files) > 1:
        weight_map = {n: f for f, names in zip(files, shards, strict=True) for n in names}
        index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def make_checkpoint(
    out: str | Path, size: str = "tiny", seed: int = 0, cc_layers: int = 0, change: bool = True
) -> Path:
    """Write a random-weight checkpoint in the VILA layout to ``out`` (atomically)."""
    if size not in SIZES:
        raise OptionError(f"unknown checkpoint size {size!r}; choose from {', '.join(SIZES)}")
    if cc_layers < 0:
        raise OptionError(f"--cc-layers must be >= 0, got {cc_layers}")
    if cc_layers and not change:
        raise OptionError("--cc-layers needs the change module; a --no-change (VILA-1.5) checkpoint has none")
    spec = SIZES[size]
    out = Path(out)
    with atomic_folder(out) as tmp:
        tok = train_tokenizer(spec["tokenizer_vocab"])
        special = write_tokenizer_files(tok, tmp / "llm")
        vocab = spec.get("vocab_size", tok.get_vocab_size())
        top, llm, tower, projector = config_dicts(size, vocab, change)
        llm |= {"bos_token_id": special["<s>"], "eos_token_id": special["</s>"], "pad_token_id": special["<unk>"]}
        top["llm_cfg"] = llm
        _write_json(tmp / "config.json", top)
        _write_json(tmp / "llm" / "config.json", llm)
        generation = {"bos_token_id": llm["bos_token_id"], "eos_token_id": llm["eos_token_id"], "do_sample": False}
        _write_json(tmp / "llm" / "generation_config.json", generation)
        _write_json(tmp / "vision_tower" / "config.json", tower)
        _write_json(
            tmp / "vision_tower" / "preprocessor_config.json",
            {
                "image_processor_type": "SiglipImageProcessor",
                "do_resize": True,
                "size": {"height": tower["image_size"], "width": tower["image_size"]},
                "resample": 3,
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
            },
        )
        _write_json(tmp / "mm_projector" / "config.json", projector)
        layout = LAYOUT_UNIRS if change else LAYOUT_VILA
        cfg = UniRSConfig.from_dicts(top, llm, tower, projector, layout, EvalOverrides(cc_n_layers=cc_layers))
        gen = torch.Generator().manual_seed(seed)
        for folder, table in expected_tensors(cfg).items():
            write_random_folder(
                tmp / folder, table, gen, spec["dtype"], spec["shard_bytes"] if folder == "llm" else None
            )
    return out
