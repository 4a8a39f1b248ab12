"""Calibration statistics: what each decoder linear sees, per expert, on remote-sensing prompts.

The reference model runs each calibration item teacher-forced (prompt + answer, as at inference the model
reads its own answer back) with its own expert routed, and hooks record, per linear input, the mean
absolute value of every channel and a sample of token rows. AWQ reads both. Results are cached on disk
by (checkpoint hash, calibration-set hash, version), so a second export is fast.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rsedge.calibration.readers import CalibrationError
from rsedge.export.decoder_graph import as_spec
from rsedge.export.linear_map import LinearMap, decoder_linear_map

STATS_VERSION = 1
ROWS_PER_LINEAR = 256  # token rows kept per linear for the scale search


@dataclass
class LinearStats:
    abs_sum: np.ndarray  # [K] sum over tokens of |x|
    tokens: int = 0
    rows: list[np.ndarray] = field(default_factory=list)

    @property
    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / max(self.tokens, 1)

    def sample(self) -> np.ndarray:
        return np.concatenate(self.rows)[:ROWS_PER_LINEAR] if self.rows else np.zeros((0, self.abs_sum.size))


def collect_stats(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, int]],
    seed: int = 0,
    linear_map: LinearMap | None = None,
    step: Callable[[torch.Tensor, int], object] | None = None,
) -> dict[str, LinearStats]:
    """Run ``(inputs_embeds [1,L,H], expert)`` pairs through the reference and record, under each graph weight's
    name, the input of the first reference linear ``linear_map`` gives it (the exporter's map; by default the
    one of the decoder the builder makes of ``model.cfg``, RSUniVLM's). ``step(embeds, expert)`` runs one pass
    (default ``model.step``)."""
    rng = np.random.default_rng(seed)
    lmap = linear_map if linear_map is not None else decoder_linear_map(as_spec(model.cfg))
    run = step if step is not None else model.step
    stats: dict[str, LinearStats] = {}
    hooks = []

    def hook_for(name: str):
        def hook(_module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float().numpy()
            st = stats.setdefault(name, LinearStats(np.zeros(x.shape[1])))
            st.abs_sum += np.abs(x).sum(axis=0)
            st.tokens += x.shape[0]
            if sum(r.shape[0] for r in st.rows) < ROWS_PER_LINEAR:
                st.rows.append(x[rng.choice(x.shape[0], size=min(32, x.shape[0]), replace=False)])

        return hook

    modules = dict(model.named_modules())
    for module_name, name in lmap.by_input_module.items():
        module = modules.get(module_name)
        if not isinstance(module, torch.nn.Linear):
            raise CalibrationError(f"the linear map names {module_name}, which the reference has no Linear for")
        hooks.append(module.register_forward_pre_hook(hook_for(name)))
    try:
        with torch.no_grad():
            for embeds, expert in batches:
                run(embeds, expert)
    finally:
        for h in hooks:
            h.remove()
    return stats


def cache_path(checkpoint_hash: str, calibration_hash: str, experts: Sequence[int]) -> Path:
    """Where the statistics of a checkpoint on a calibration set, each item routed to ``experts[i]``, live.

    The routing is part of the key: the same set under another router calibrates other experts."""
    root = Path(os.environ.get("RSEDGE_CACHE", Path.home() / ".cache" / "rsedge"))
    routing = ",".join(str(int(e)) for e in experts)
    key = hashlib.sha256(f"{checkpoint_hash}:{calibration_hash}:{routing}:{STATS_VERSION}".encode()).hexdigest()[:24]
    return root / "calibration-stats" / f"{key}.npz"


def save_stats(stats: dict[str, LinearStats], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name, st in stats.items():
        arrays[f"{name}|abs_sum"] = st.abs_sum
        arrays[f"{name}|tokens"] = np.array(st.tokens)
        arrays[f"{name}|rows"] = st.sample()
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_stats(path: Path) -> dict[str, LinearStats]:
    data = np.load(path)
    stats: dict[str, LinearStats] = {}
    for key in data.files:
        name, part = key.rsplit("|", 1)
        st = stats.setdefault(name, LinearStats(np.zeros(0)))
        if part == "abs_sum":
            st.abs_sum = data[key]
        elif part == "tokens":
            st.tokens = int(data[key])
        else:
            st.rows = [data[key]]
    return stats
