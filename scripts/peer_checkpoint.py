"""One expert of an RSUniVLM checkpoint as a plain Qwen2 checkpoint, for the peers rsedge is measured against.

onnxruntime-genai's model builder and llama.cpp's convert_hf_to_gguf.py read Hugging Face Qwen2 folders, not
the G-MoE layout; a request runs one expert from start to end, so that expert's decoder *is* a Qwen2 model.
This writes it (config.json with model_type qwen2, model.safetensors, the tokenizer files) with the very
weights the rsedge bundle carries, so every engine in scripts/bench_engines.py runs identical weights.

    python scripts/peer_checkpoint.py CHECKPOINT OUT [--expert 0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
)


def write_qwen2(checkpoint: Path, out: Path, expert: int) -> Path:
    import torch
    from safetensors.torch import save_file

    from rsedge.fsutil import refuse_existing
    from rsedge.models.rsunivlm.config import RSUniVLMConfig
    from rsedge.models.rsunivlm.weights import load_checkpoint_tensors

    refuse_existing(out)
    cfg = RSUniVLMConfig.from_checkpoint(checkpoint)
    t = cfg.text
    if not 0 <= expert < t.num_experts:
        raise SystemExit(f"error: expert must be between 0 and {t.num_experts - 1}")
    tensors = load_checkpoint_tensors(checkpoint, cfg)
    picked: dict[str, torch.Tensor] = {}
    marker = f".mlp.{expert}."
    for name, value in tensors.items():
        if name.startswith(("model.vision_tower.", "model.mm_projector.")) or name == "model.image_newline":
            continue
        if ".mlp." in name:
            if marker not in name:
                continue
            name = name.replace(marker, ".mlp.")
        picked[name] = value.to(torch.float16).contiguous()
    if t.tie_word_embeddings:
        picked.pop("lm_head.weight", None)
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "tie_word_embeddings": t.tie_word_embeddings,
        "hidden_act": "silu",
        "use_sliding_window": False,
        "torch_dtype": "float16",
    }
    out.mkdir(parents=True)
    save_file(picked, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, out / name)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--expert", type=int, default=0)
    a = ap.parse_args(argv)
    print(write_qwen2(a.checkpoint, a.out, a.expert))
    return 0


if __name__ == "__main__":
    sys.exit(main())
