"""``rsedge export``: checkpoint directory -> self-describing, validated bundle folder.

The checkpoint's ``config.json`` finds its architecture (``rsedge.models.registry``), whose ``EXPORTER`` class
does what is particular to it; ``rsedge.export.driver`` does the rest. Everything is written into a temporary
folder beside the target and moved into place only after validation passed, so a failed or interrupted export
leaves nothing half-written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rsedge.export.driver import GRAPH_DTYPES, PRECISIONS, ExportOptions, run_export
from rsedge.fsutil import refuse_existing
from rsedge.models.registry import architecture_for

__all__ = ["GRAPH_DTYPES", "PRECISIONS", "ExportOptions", "export_bundle"]


def export_bundle(
    checkpoint: str | Path,
    out: str | Path,
    precision: str = "fp32",
    router: Mapping[str, int] | None = None,
    validate: bool = True,
    progress: Callable[[str], None] = lambda msg: None,
    block_size: int = 128,
    form: str = "ort",
    compute: str | None = None,
    algorithm: str = "rtn",
    calibration: str | Path = "rs-default",
    vision: str | None = None,
    vision_calibration: str = "percentile",
    attention: str | None = None,
    keep: tuple[str, ...] = (),
    prefill: str = "same",
    kv_cache: str = "float",
    target: str | None = None,
    also_target: str | None = None,
) -> dict[str, Any]:
    """Export a checkpoint to a bundle folder; returns the manifest. The options are :class:`ExportOptions`'
    (``target`` names the target they were picked for, ``also_target`` a second target whose decoder form the
    bundle carries too: rsedge.export.targets)."""
    options = ExportOptions(
        precision=precision,
        router=router,
        validate=validate,
        block_size=block_size,
        form=form,
        compute=compute,
        algorithm=algorithm,
        calibration=calibration,
        vision=vision,
        vision_calibration=vision_calibration,
        attention=attention,
        keep=tuple(keep),
        prefill=prefill,
        kv_cache=kv_cache,
        target=target,
        also_target=also_target,
    ).resolve()
    checkpoint, out = Path(checkpoint), Path(out)
    refuse_existing(out)  # before the checkpoint is read at all
    exporter = architecture_for(checkpoint).load().EXPORTER(checkpoint, options)
    return run_export(exporter, out, progress)
