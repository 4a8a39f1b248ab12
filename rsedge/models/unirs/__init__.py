"""UniRS (VILA-1.5-3B with a change-extraction module) and plain VILA-1.5: the registry entry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rsedge.errors import OptionError


def export(checkpoint: str | Path, out: str | Path, **options: Any) -> dict[str, Any]:
    """Not built yet: the reference, config and checkpoint sides exist; bundles come with the exporter."""
    raise OptionError("exporting a UniRS / VILA-1.5 bundle is not built yet (the reference model is; see issue 12)")


def __getattr__(name: str) -> Any:
    # Lazy: importing the package (e.g. for its config) must not pull torch in.
    if name == "CONFIG":
        from rsedge.models.unirs.config import UniRSConfig

        return UniRSConfig
    if name == "REFERENCE":
        from rsedge.models.unirs.modeling import UniRSForCausalLM

        return UniRSForCausalLM
    if name == "make_checkpoint":
        from rsedge.models.unirs.checkpoint import make_checkpoint

        return make_checkpoint
    raise AttributeError(name)
