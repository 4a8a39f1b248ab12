"""Synthetic aerial scenes and RSUniVLM-format task samples, plus adapters for the shipped real samples."""

from rsedge.synth.scenes import (
    LABELS,
    OBJECT_CLASSES,
    SCENE_CLASSES,
    ChangePair,
    Scene,
    SceneObject,
    generate_scene,
    make_change_pair,
    mask_grid,
)

__all__ = [
    "LABELS",
    "OBJECT_CLASSES",
    "SCENE_CLASSES",
    "ChangePair",
    "Scene",
    "SceneObject",
    "generate_scene",
    "make_change_pair",
    "mask_grid",
]
