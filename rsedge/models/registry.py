"""Architectures rsedge knows, found by a checkpoint's config.json ``model_type``.

Each entry names a small module that exposes the same four things (config, reference model, test-checkpoint
maker, exporter), so adding UniRS or RSGround-R1 is a new module and a new row here, not a branch elsewhere.
Modules are imported on use: the runtime never pays for torch.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from rsedge.errors import CheckpointError


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    module: str  # must define CONFIG, REFERENCE, make_checkpoint, EXPORTER (an export.driver.Exporter) and export

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("rsunivlm", ("llava_qwen_gmoe",), "rsedge.models.rsunivlm"),
    # UniRS and plain VILA-1.5 share model_type and layout; the projector's tensor names tell them apart.
    Architecture("unirs", ("llava_llama",), "rsedge.models.unirs"),
    Architecture("qwen2_5_vl", ("qwen2_5_vl",), "rsedge.models.qwen2_5_vl"),
)


def by_name(name: str) -> Architecture:
    for arch in ARCHITECTURES:
        if arch.name == name:
            return arch
    raise CheckpointError(f"unknown architecture {name!r}; known: {', '.join(a.name for a in ARCHITECTURES)}")


def architecture_for(checkpoint: str | Path) -> Architecture:
    """The architecture of a checkpoint directory, from its config.json."""
    path = Path(checkpoint) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: no config.json (is this a checkpoint directory?)")
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable config.json ({e})") from None
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    known = ", ".join(t for a in ARCHITECTURES for t in a.model_types)
    raise CheckpointError(f"{path}: model_type {model_type!r} is not supported (supported: {known})")
