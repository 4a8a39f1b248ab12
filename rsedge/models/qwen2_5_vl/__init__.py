"""Qwen2.5-VL (and the reasoning grounders fine-tuned from it): the registry entry.

Dynamic-resolution vision tower with window attention (``vision``), Qwen2.5 decoder with multimodal rotary
(``rsedge.export.decoder_spec.qwen2_5_vl``); transformers' own model is the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def export(
    checkpoint: str | Path,
    out: str | Path,
    progress: Callable[[str], None] = lambda msg: None,
    **options: Any,
) -> dict[str, Any]:
    """Export a Qwen2.5-VL checkpoint (Hugging Face layout) to a bundle folder; returns the manifest.

    ``options`` are :class:`rsedge.export.driver.ExportOptions` fields (the recipes' defaults: an INT8 export
    quantizes the vision graph to static INT8, INT4 keeps it in the compute dtype).
    """
    from rsedge.export.driver import run_export
    from rsedge.fsutil import refuse_existing
    from rsedge.models.qwen2_5_vl.exporter import Qwen25VLExporter, export_options

    opts = export_options(options)
    refuse_existing(Path(out))
    return run_export(Qwen25VLExporter(Path(checkpoint), opts), Path(out), progress)


def __getattr__(name: str) -> Any:
    # Lazy: importing the package (e.g. for its config) must not pull torch in.
    if name == "CONFIG":
        from rsedge.models.qwen2_5_vl.config import Qwen25VLConfig

        return Qwen25VLConfig
    if name == "REFERENCE":
        from rsedge.models.qwen2_5_vl.modeling import Qwen25VLReference

        return Qwen25VLReference
    if name == "EXPORTER":
        from rsedge.models.qwen2_5_vl.exporter import Qwen25VLExporter

        return Qwen25VLExporter
    if name == "make_checkpoint":
        from rsedge.models.qwen2_5_vl.checkpoint import make_checkpoint

        return make_checkpoint
    raise AttributeError(name)
