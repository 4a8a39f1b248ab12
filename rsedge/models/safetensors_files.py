"""The safetensors files of a checkpoint folder, read tensor by tensor: what every architecture's strict loader
starts from (a folder holds one ``model.safetensors`` or the shards its index names)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from rsedge.errors import CheckpointError


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: one model.safetensors, or the shards its index names."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable shard index ({e})") from None
        files = sorted({path / f for f in weight_map.values()})
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: shard named by the index is missing")
    return files


def iter_checkpoint(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (name, tensor) of a checkpoint folder's files; an unreadable file is one CheckpointError naming it."""
    for f in checkpoint_files(path):
        try:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():  # noqa: SIM118 (safe_open is not iterable)
                    yield name, sf.get_tensor(name)
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # truncated, garbage, unknown dtype...
            raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from None
