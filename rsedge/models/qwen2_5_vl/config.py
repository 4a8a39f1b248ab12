"""Qwen2.5-VL configuration, read from a Hugging Face checkpoint's config.json (model_type ``qwen2_5_vl``).

Two layouts of the same config exist: the released checkpoints' (transformers 4.x: the language model's fields at
the top level, ``rope_scaling: {"type": "mrope", "mrope_section": [...]}``) and transformers 5's save
(``text_config`` nested, ``rope_parameters``). Both are read; a field both omit takes transformers' default.
The vision tower's config is kept whole (``vision``): the vision graph builder reads it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rsedge.errors import CheckpointError
from rsedge.models.dimensions import TextConfig

MODEL_TYPE = "qwen2_5_vl"
# Qwen2_5_VLVisionConfig's defaults (transformers 5.24), for a field a config.json omits.
VISION_DEFAULTS: dict[str, Any] = {
    "depth": 32,
    "hidden_size": 3584,
    "hidden_act": "silu",
    "intermediate_size": 3420,
    "num_heads": 16,
    "in_channels": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "tokens_per_second": 4,
    "window_size": 112,
    "out_hidden_size": 3584,
    "fullatt_block_indexes": [7, 15, 23, 31],
}
# Token ids of the released checkpoints (the Qwen2.5 vocabulary), for a config.json that omits them.
TOKEN_DEFAULTS = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}


class ConfigError(CheckpointError):
    """A checkpoint's config.json is missing, unreadable or describes a model rsedge does not build."""


@dataclass(frozen=True)
class Qwen25VLConfig:
    text: TextConfig
    mrope_section: tuple[int, int, int]
    vision: dict[str, Any]
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def spatial_merge_size(self) -> int:
        return int(self.vision["spatial_merge_size"])

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> Qwen25VLConfig:
        if cfg.get("model_type") != MODEL_TYPE:
            raise ConfigError(f"model_type is {cfg.get('model_type')!r}, expected {MODEL_TYPE!r}")
        nested = cfg.get("text_config")
        t = {**cfg, **nested} if isinstance(nested, dict) else cfg  # 5.x nests the text fields, 4.x does not
        rope = t.get("rope_parameters") or t.get("rope_scaling") or cfg.get("rope_scaling") or {}
        try:
            kind = rope.get("rope_type", rope.get("type", "default"))
            if kind not in ("default", "mrope"):
                raise ConfigError(f"rope type {kind!r} is not built (Qwen2.5-VL's default mrope only)")
            if t.get("use_sliding_window"):
                raise ConfigError("use_sliding_window is not built (the released checkpoints leave it off)")
            if t.get("hidden_act", "silu") != "silu":
                raise ConfigError(f"hidden_act {t['hidden_act']!r} is not built (silu)")
            text = TextConfig(
                vocab_size=int(t["vocab_size"]),
                hidden_size=int(t["hidden_size"]),
                intermediate_size=int(t["intermediate_size"]),
                num_hidden_layers=int(t["num_hidden_layers"]),
                num_attention_heads=int(t["num_attention_heads"]),
                num_key_value_heads=int(t.get("num_key_value_heads", t["num_attention_heads"])),
                rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 1_000_000.0))),
                max_position_embeddings=int(t.get("max_position_embeddings", 128000)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", t.get("tie_word_embeddings", False))),
                num_experts=1,
            )
            section = tuple(int(s) for s in rope.get("mrope_section", (16, 24, 24)))
            vision = {**VISION_DEFAULTS, **cfg.get("vision_config", {})}
            ids = {k: int(cfg.get(k, t.get(k, v))) for k, v in TOKEN_DEFAULTS.items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"config.json: missing or malformed field {e}") from None
        if len(section) != 3 or sum(section) != text.head_dim // 2:
            raise ConfigError(
                f"mrope_section {list(section)} must be 3 numbers summing to head_dim/2 = {text.head_dim // 2}"
            )
        if vision["out_hidden_size"] != text.hidden_size:
            raise ConfigError(
                f"vision_config.out_hidden_size {vision['out_hidden_size']} is not the LM's hidden_size "
                f"{text.hidden_size}"
            )
        return cls(
            text=text,
            mrope_section=section,  # type: ignore[arg-type]
            vision=vision,
            **ids,
            bos_token_id=t.get("bos_token_id"),
            eos_token_id=t.get("eos_token_id"),
            raw=cfg,
        )

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> Qwen25VLConfig:
        p = Path(path) / "config.json"
        if not p.is_file():
            raise ConfigError(f"{p}: no config.json (is this a checkpoint directory?)")
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{p}: unreadable config.json ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: config.json is not an object")
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None

    def to_manifest(self) -> dict[str, Any]:
        """The manifest's ``model`` section: dimensions, the rotary sections and the template's token ids."""
        return {
            "text": asdict(self.text),
            "mrope_section": list(self.mrope_section),
            "spatial_merge_size": self.spatial_merge_size,
            "image_token_id": self.image_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
        }
