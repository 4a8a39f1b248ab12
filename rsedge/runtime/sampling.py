"""Next-token choice: greedy, or seeded temperature / nucleus (top-p) sampling."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rsedge.errors import OptionError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 10.0:
            raise OptionError(f"temperature must be in [0, 10], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise OptionError(f"top-p must be in (0, 1], got {self.top_p}")
        # numpy's generators take non-negative integer seeds only
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise OptionError(f"seed must be a non-negative integer, got {self.seed}")


class Sampler:
    def __init__(self, cfg: Sampling) -> None:
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.cfg.temperature == 0.0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.cfg.temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        if self.cfg.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            keep = np.cumsum(p[order]) - p[order] < self.cfg.top_p  # smallest set whose mass reaches top_p
            mask = np.zeros_like(p, dtype=bool)
            mask[order[keep]] = True
            p = np.where(mask, p, 0.0)
            p /= p.sum()
        return int(self.rng.choice(p.shape[0], p=p))
