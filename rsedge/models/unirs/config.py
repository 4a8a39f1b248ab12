"""UniRS / VILA-1.5 configuration, read from a checkpoint in the VILA layout.

The top-level config.json (model_type ``llava_llama``) names three parts, each saved in its own folder
with its own config.json: ``llm/`` (LlamaForCausalLM), ``vision_tower/`` (SiglipVisionModel) and
``mm_projector/`` (``mlp_downsample``). Like the original (``llava/model/utils.py`` get_model_config), the
dimensions are read from the folders' configs; the top-level dicts are copies.

The original overwrites ``cc_n_layers``, ``cc_head``, ``cc_dropout`` and ``vision_resolution`` from its
command line at evaluation (``llava/model/builder.py`` prepare_config_for_eval, lines 264-267; defaults 0, 8,
0 and 384 in every ``llava/eval/model_*.py``): they are not in config.json. Here they are explicit
:class:`EvalOverrides` with the same defaults, recorded in the config (and so in a manifest).
``cc_dropout`` is left out: dropout does nothing at evaluation.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from rsedge.errors import CheckpointError
from rsedge.models.dimensions import TextConfig, VisionConfig

MODEL_TYPE = "llava_llama"  # llava/model/language_model/llava_llama.py LlavaLlamaConfig
PROJECTOR_TYPE = "mlp_downsample"
TEMPLATE = "vicuna_v1"  # conv mode "v1" of the eval scripts (llava/conversation.py conv_vicuna_v1)
CHANGE_ATTENTION_DIM = 512  # AttentiveEncoder's default, never passed by MultipleApplicationLayers

# Defaults of transformers' SiglipVisionConfig / LlamaConfig, which AutoConfig applies to a field a folder's
# config.json omits.
SIGLIP_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "attention_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# mm_projector/model.safetensors as UniRS names it (MultipleApplicationLayers: .single and .change) and as
# VILA-1.5 does (one nn.Sequential: layers.1/2/4); multimodal_projector/builder.py
# get_state_of_change_caption_projector is the (never called) remap from the second to the first.
LAYOUT_UNIRS = "unirs"
LAYOUT_VILA = "vila"
_VILA_KEY = re.compile(r"layers\.\d+\.")


class ConfigError(CheckpointError):
    """A checkpoint's config files are missing, unreadable, or describe a model rsedge does not build."""


@dataclass(frozen=True)
class EvalOverrides:
    """What the original takes from its command line at evaluation, with its defaults."""

    cc_n_layers: int = 0
    cc_head: int = 8
    vision_resolution: int = 384  # -1: the tower's own image_size (AttentiveEncoder's rule)

    def __post_init__(self) -> None:
        if self.cc_n_layers < 0:
            raise ConfigError(f"cc_n_layers must be >= 0, got {self.cc_n_layers}")
        # Heads only matter when attention layers are built (the original builds none at cc_n_layers 0).
        if self.cc_n_layers and (self.cc_head < 1 or CHANGE_ATTENTION_DIM % self.cc_head):
            raise ConfigError(
                f"cc_head must divide the change attention width {CHANGE_ATTENTION_DIM}, got {self.cc_head}"
            )


@dataclass(frozen=True)
class UniRSConfig:
    text: TextConfig
    vision: VisionConfig
    projector_layout: str  # LAYOUT_UNIRS (single + change branches) or LAYOUT_VILA (no change branch)
    cc_n_layers: int = 0
    cc_head: int = 8
    vision_resolution: int = 384
    mm_vision_select_layer: int = -2
    num_video_frames: int = 8
    image_aspect_ratio: str = "resize"
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    template: str = TEMPLATE
    bos_token_id: int = 1
    eos_token_id: int = 2
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def has_change(self) -> bool:
        return self.projector_layout == LAYOUT_UNIRS

    @property
    def mm_hidden_size(self) -> int:
        return self.vision.hidden_size

    @property
    def change_grid(self) -> int:
        """Side of the change module's position tables: vision_resolution // patch (384 when -1)."""
        res = 384 if self.vision_resolution == -1 else self.vision_resolution
        return res // self.vision.patch_size

    @property
    def downsampled_grid(self) -> int:
        """Side of the projector's token grid: the tower's grid padded to even, halved (27 -> 14)."""
        return (self.vision.patches_per_side + 1) // 2

    @property
    def tokens_per_image(self) -> int:
        return self.downsampled_grid**2

    @classmethod
    def from_checkpoint(cls, path: str | Path, overrides: EvalOverrides | None = None) -> UniRSConfig:
        path = Path(path)
        top = _read_json(path / "config.json")
        if top.get("model_type") != MODEL_TYPE:
            raise ConfigError(
                f"{path / 'config.json'}: model_type is {top.get('model_type')!r}, expected {MODEL_TYPE!r}"
            )
        missing = [k for k in ("llm_cfg", "vision_tower_cfg", "mm_projector_cfg") if not top.get(k)]
        if missing:
            raise ConfigError(f"{path / 'config.json'}: no {', '.join(missing)} (not a VILA-layout checkpoint)")
        llm = {**LLAMA_DEFAULTS, **_read_json(path / "llm" / "config.json")}
        tower = {**SIGLIP_DEFAULTS, **_read_json(path / "vision_tower" / "config.json")}
        projector = _read_json(path / "mm_projector" / "config.json")
        layout = projector_layout(path / "mm_projector")
        return cls.from_dicts(top, llm, tower, projector, layout, overrides or EvalOverrides(), _preprocessor(path))

    @classmethod
    def from_dicts(
        cls,
        top: dict[str, Any],
        llm: dict[str, Any],
        tower: dict[str, Any],
        projector: dict[str, Any],
        layout: str,
        overrides: EvalOverrides,
        preprocessor: dict[str, Any] | None = None,
    ) -> UniRSConfig:
        if projector.get("mm_projector_type") != PROJECTOR_TYPE:
            raise ConfigError(
                f"mm_projector_type {projector.get('mm_projector_type')!r} is not built ({PROJECTOR_TYPE})"
            )
        if llm.get("hidden_act") != "silu" or llm.get("attention_bias") or llm.get("rope_scaling"):
            raise ConfigError("llm/config.json: only a plain LLaMA (silu, no attention bias, no rope_scaling) is built")
        if top.get("mm_use_im_start_end"):
            raise ConfigError("mm_use_im_start_end is not built (VILA-1.5 and UniRS train without it)")
        if top.get("s2"):
            raise ConfigError("the S2 multi-scale tower is not built")
        feature = top.get("mm_vision_select_feature", "cls_patch")
        if feature != "cls_patch":
            # "patch" drops the first of SigLIP's 729 tokens, which has no class token: the grid breaks.
            raise ConfigError(f"mm_vision_select_feature {feature!r} is not built (cls_patch keeps all tokens)")
        text = TextConfig(
            vocab_size=int(llm["vocab_size"]),
            hidden_size=int(llm["hidden_size"]),
            intermediate_size=int(llm["intermediate_size"]),
            num_hidden_layers=int(llm["num_hidden_layers"]),
            num_attention_heads=int(llm["num_attention_heads"]),
            num_key_value_heads=int(llm.get("num_key_value_heads") or llm["num_attention_heads"]),
            rms_norm_eps=float(llm["rms_norm_eps"]),
            rope_theta=float(llm["rope_theta"]),
            max_position_embeddings=int(llm["max_position_embeddings"]),
            tie_word_embeddings=bool(llm["tie_word_embeddings"]),
            num_experts=1,
        )
        vision = VisionConfig(**{k: tower[k] for k in VisionConfig.__dataclass_fields__ if k in tower})
        if vision.hidden_act != "gelu_pytorch_tanh":
            raise ConfigError(f"vision_tower hidden_act {vision.hidden_act!r} is not built (gelu_pytorch_tanh)")
        select = int(top.get("mm_vision_select_layer", -2))
        if not -(vision.num_hidden_layers + 1) <= select <= vision.num_hidden_layers:
            raise ConfigError(
                f"mm_vision_select_layer {select} is outside the tower's {vision.num_hidden_layers} layers"
            )
        for name, value in (("hidden_size", text.hidden_size), ("mm_hidden_size", vision.hidden_size)):
            if top.get(name) not in (None, value):
                raise ConfigError(f"config.json {name} {top[name]} disagrees with its folder's config ({value})")
        cfg = cls(
            text=text,
            vision=vision,
            projector_layout=layout,
            cc_n_layers=overrides.cc_n_layers,
            cc_head=overrides.cc_head,
            vision_resolution=overrides.vision_resolution,
            mm_vision_select_layer=select,
            num_video_frames=int(top.get("num_video_frames") or 8),
            image_aspect_ratio=str(top.get("image_aspect_ratio") or "resize"),
            image_mean=tuple(float(x) for x in (preprocessor or {}).get("image_mean", (0.5, 0.5, 0.5))),
            image_std=tuple(float(x) for x in (preprocessor or {}).get("image_std", (0.5, 0.5, 0.5))),
            bos_token_id=int(llm["bos_token_id"]),
            eos_token_id=int(llm["eos_token_id"]),
            raw=top,
        )
        if cfg.has_change and cfg.vision.hidden_size % 2:
            raise ConfigError(f"the change module halves the tower width; {cfg.vision.hidden_size} is odd")
        if cfg.has_change and cfg.change_grid != cfg.vision.patches_per_side:
            # The original would fail in AttentiveEncoder.forward's view: the tower is not resized at eval.
            raise ConfigError(
                f"vision_resolution {cfg.vision_resolution} gives a {cfg.change_grid}x{cfg.change_grid} change grid, "
                f"the tower a {cfg.vision.patches_per_side}x{cfg.vision.patches_per_side} one"
            )
        return cfg

    def to_manifest(self) -> dict[str, Any]:
        """What a runtime and an exporter need, as plain JSON, the eval-time overrides included."""
        return {
            "text": asdict(self.text),
            "vision": asdict(self.vision),
            "projector_layout": self.projector_layout,
            "has_change": self.has_change,
            "eval_overrides": {
                "cc_n_layers": self.cc_n_layers,
                "cc_head": self.cc_head,
                "vision_resolution": self.vision_resolution,
            },
            "mm_vision_select_layer": self.mm_vision_select_layer,
            "tokens_per_image": self.tokens_per_image,
            "num_video_frames": self.num_video_frames,
            "image_aspect_ratio": self.image_aspect_ratio,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "template": self.template,
        }


def projector_layout(folder: Path) -> str:
    """Which naming ``mm_projector/model.safetensors`` uses, from its tensor names (header only)."""
    f = folder / "model.safetensors"
    if not f.is_file():
        raise CheckpointError(f"{f}: missing")
    try:
        with safe_open(str(f), framework="numpy") as sf:  # names only: no torch needed
            keys = list(sf.keys())
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from None
    if keys and all(_VILA_KEY.match(k) for k in keys):
        return LAYOUT_VILA
    return LAYOUT_UNIRS  # anything else is checked tensor by tensor against UniRS's names


def _preprocessor(path: Path) -> dict[str, Any] | None:
    p = path / "vision_tower" / "preprocessor_config.json"
    return _read_json(p) if p.is_file() else None


def _read_json(p: Path) -> dict[str, Any]:
    if not p.is_file():
        raise ConfigError(f"{p}: missing (is this a VILA-layout checkpoint?)")
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{p}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: not a JSON object")
    return data
