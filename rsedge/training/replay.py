"""Replay a checkpoint's training: the configuration of every stage, read from its training record.

Each stage of ``scripts/train_demo_model.py`` nests the record of the run it continued as ``parent``, so
the shipped model's record names every stage's exact options. A stage a time limit stopped early is
replayed by step count (``stop_after``), not by time, so a slower or faster machine does the same steps.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from rsedge.errors import CheckpointError
from rsedge.training.train import TrainConfig


def stage_records(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The nested records, first stage first."""
    stages = []
    node: dict[str, Any] | None = record
    while node is not None:
        stages.append(node)
        node = node.get("parent")
    return stages[::-1]


def stage_config(stage: dict[str, Any], init_from: Path | None) -> TrainConfig:
    """One stage's TrainConfig: recorded options (absent ones at their default, as when it ran)."""
    known = {f.name for f in fields(TrainConfig)}
    recorded = stage["train_config"]
    unknown = sorted(set(recorded) - known)
    if unknown:
        raise CheckpointError(f"training record has options this version does not know: {', '.join(unknown)}")
    options = {k: v for k, v in recorded.items() if k not in ("init_from", "time_limit_s", "stop_after")}
    if "pointer_heads" in options:
        options["pointer_heads"] = tuple(options["pointer_heads"])
    done = int(stage["steps_done"])
    return TrainConfig(
        **options,
        init_from=None if init_from is None else str(init_from),
        stop_after=done if done < options.get("steps", TrainConfig.steps) else None,
    )


def replay_plan(record: dict[str, Any], work: Path) -> list[tuple[TrainConfig, Path]]:
    """(config, output folder) per stage; each stage continues from the previous one's folder."""
    plan: list[tuple[TrainConfig, Path]] = []
    previous: Path | None = None
    for i, stage in enumerate(stage_records(record), start=1):
        if (stage["train_config"].get("init_from") is None) != (previous is None):
            raise CheckpointError(f"training record stage {i}: its init_from does not match the stage before it")
        out = work / f"stage{i}"
        plan.append((stage_config(stage, previous), out))
        previous = out
    return plan
