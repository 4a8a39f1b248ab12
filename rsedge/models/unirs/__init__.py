"""UniRS (VILA-1.5-3B with a change-extraction module) and plain VILA-1.5: the registry entry."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def export(
    checkpoint: str | Path,
    out: str | Path,
    cc_n_layers: int = 0,
    cc_head: int = 8,
    vision_resolution: int = 384,
    progress: Callable[[str], None] = lambda msg: None,
    **options: Any,
) -> dict[str, Any]:
    """Export a UniRS / VILA-1.5 checkpoint to a bundle folder; returns the manifest.

    ``cc_n_layers``, ``cc_head`` and ``vision_resolution`` are the original's eval-time overrides (config.json
    does not save them; the defaults are its eval scripts'), recorded in the manifest. ``options`` are
    :class:`rsedge.export.driver.ExportOptions` fields.
    """
    from rsedge.export.driver import ExportOptions, run_export
    from rsedge.fsutil import refuse_existing
    from rsedge.models.unirs.config import EvalOverrides
    from rsedge.models.unirs.exporter import UniRSExporter

    opts = ExportOptions(**options).resolve()
    overrides = EvalOverrides(cc_n_layers=cc_n_layers, cc_head=cc_head, vision_resolution=vision_resolution)
    refuse_existing(Path(out))
    return run_export(UniRSExporter(Path(checkpoint), opts, overrides), Path(out), progress)


def __getattr__(name: str) -> Any:
    # Lazy: importing the package (e.g. for its config) must not pull torch in.
    if name == "CONFIG":
        from rsedge.models.unirs.config import UniRSConfig

        return UniRSConfig
    if name == "REFERENCE":
        from rsedge.models.unirs.modeling import UniRSForCausalLM

        return UniRSForCausalLM
    if name == "EXPORTER":
        from rsedge.models.unirs.exporter import UniRSExporter

        return UniRSExporter
    if name == "make_checkpoint":
        from rsedge.models.unirs.checkpoint import make_checkpoint

        return make_checkpoint
    raise AttributeError(name)
