"""RSUniVLM configuration, read from a checkpoint's config.json.

The released config.json (model_type ``llava_qwen_gmoe``) carries the Qwen2 fields at the top level and
names the vision tower only by its hub id. The tower's shape comes from ``vision_config`` when the
checkpoint has one (our tiny checkpoints do), else from a table of known towers, so nothing is ever
downloaded.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rsedge.errors import CheckpointError
from rsedge.models.dimensions import TextConfig, VisionConfig
from rsedge.runtime.router import TASK_TAGS as ROUTER_TAGS

MODEL_TYPE = "llava_qwen_gmoe"

# Static router of the released demo: a plain substring test on the prompt, first match wins.
DEFAULT_ROUTER: dict[str, int] = {"[SEG]": 2, "[VG]": 1, "[REF]": 1}
DEFAULT_EXPERT = 0
# Every task tag the model answers (one home: the runtime's router); an unknown tag is a user error.
TASK_TAGS = ROUTER_TAGS

# SigLIP towers by hub id. num_hidden_layers counts the layers kept: LLaVA deletes the last one.
KNOWN_VISION_TOWERS: dict[str, dict[str, Any]] = {
    "google/siglip-so400m-patch14-384": {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 26,
        "num_attention_heads": 16,
        "patch_size": 14,
        "image_size": 384,
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu_pytorch_tanh",
    },
}


class ConfigError(CheckpointError):
    """A checkpoint's config.json is missing, unreadable or not an RSUniVLM config."""


@dataclass(frozen=True)
class RSUniVLMConfig:
    text: TextConfig
    vision: VisionConfig
    vision_tower: str
    projector_type: str = "mlp2x_gelu"
    image_aspect_ratio: str = "square"
    image_grid_pinpoints: list[list[int]] | None = None
    mm_patch_merge_type: str = "spatial_unpad"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    router: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_ROUTER))
    default_expert: int = DEFAULT_EXPERT
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def anyres_max_patches(self) -> int | None:
        """N of ``anyres_max_N``, or None for the square path."""
        m = re.fullmatch(r"anyres_max_(\d+)", self.image_aspect_ratio)
        return int(m.group(1)) if m else None

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> RSUniVLMConfig:
        if cfg.get("model_type") != MODEL_TYPE:
            raise ConfigError(f"model_type is {cfg.get('model_type')!r}, expected {MODEL_TYPE!r}")
        try:
            text = TextConfig(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=int(cfg["hidden_size"]),
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=int(cfg["num_attention_heads"]),
                # Qwen2-0.5B defaults where the released config may omit a field.
                num_key_value_heads=int(cfg.get("num_key_value_heads", 2)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(cfg.get("rope_theta", 1_000_000.0)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                num_experts=int(cfg.get("num_experts", 3)),
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks the field {e.args[0]!r}") from None
        tower = str(cfg.get("mm_vision_tower", ""))
        if isinstance(cfg.get("vision_config"), dict):
            vc = dict(cfg["vision_config"])
        elif tower in KNOWN_VISION_TOWERS:
            vc = dict(KNOWN_VISION_TOWERS[tower])
        else:
            raise ConfigError(
                f"unknown vision tower {tower!r} and no vision_config in config.json; "
                f"known towers: {', '.join(KNOWN_VISION_TOWERS)}"
            )
        fields = VisionConfig.__dataclass_fields__
        vision = VisionConfig(**{k: v for k, v in vc.items() if k in fields})
        if cfg.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
            raise ConfigError(f"unsupported mm_projector_type {cfg.get('mm_projector_type')!r}")
        aspect = str(cfg.get("image_aspect_ratio", "square"))
        if aspect != "square" and not re.fullmatch(r"anyres_max_\d+", aspect):
            raise ConfigError(f"unsupported image_aspect_ratio {aspect!r} (square or anyres_max_N)")
        pinpoints = cfg.get("image_grid_pinpoints")
        if aspect != "square" and not pinpoints:
            raise ConfigError(f"image_aspect_ratio {aspect!r} needs image_grid_pinpoints")
        router = cfg.get("rsedge_router", DEFAULT_ROUTER)
        return cls(
            text=text,
            vision=vision,
            vision_tower=tower,
            projector_type="mlp2x_gelu",
            image_aspect_ratio=aspect,
            image_grid_pinpoints=[list(map(int, p)) for p in pinpoints] if pinpoints else None,
            mm_patch_merge_type=str(cfg.get("mm_patch_merge_type", "spatial_unpad")),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            router={str(k): int(v) for k, v in router.items()},
            default_expert=int(cfg.get("rsedge_default_expert", DEFAULT_EXPERT)),
            raw=cfg,
        )

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> RSUniVLMConfig:
        p = Path(path) / "config.json"
        if not p.is_file():
            raise ConfigError(f"{p}: no config.json (is this a checkpoint directory?)")
        try:
            cfg = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{p}: unreadable config.json ({e})") from None
        return cls.from_dict(cfg)

    def to_manifest(self) -> dict[str, Any]:
        """The parts of the config a runtime needs, as plain JSON."""
        return {
            "text": asdict(self.text),
            "vision": asdict(self.vision),
            "vision_tower": self.vision_tower,
            "image_aspect_ratio": self.image_aspect_ratio,
            "image_grid_pinpoints": self.image_grid_pinpoints,
            "mm_patch_merge_type": self.mm_patch_merge_type,
        }
