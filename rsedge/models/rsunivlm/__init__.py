"""RSUniVLM (LLaVA-OneVision-Qwen2-0.5B with a static, task-routed granularity MoE): the registry entry."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # Lazy: importing the package (e.g. for its config) must not pull torch in.
    if name == "CONFIG":
        from rsedge.models.rsunivlm.config import RSUniVLMConfig

        return RSUniVLMConfig
    if name == "REFERENCE":
        from rsedge.models.rsunivlm.modeling import RSUniVLMForCausalLM

        return RSUniVLMForCausalLM
    if name == "make_checkpoint":
        from rsedge.models.rsunivlm.checkpoint import make_checkpoint

        return make_checkpoint
    if name == "EXPORTER":
        from rsedge.models.rsunivlm.exporter import RSUniVLMExporter

        return RSUniVLMExporter
    if name == "export":
        from rsedge.export.bundle import export_bundle

        return export_bundle
    raise AttributeError(name)
