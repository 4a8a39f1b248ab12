"""AWQ: activation-aware per-input-channel scales chosen on calibration activations.

For a linear y = x W with W [K, N], channels of x that carry large activations matter more, so W's rows
are scaled up by s before quantization and x is divided by s at run time (an explicit Mul in the graph):
x/s @ Q(diag(s) W). The exponent alpha in s = mean|x|^alpha is searched per linear to minimise the
output error on recorded calibration rows; alpha = 0 is plain RTN, so AWQ never does worse on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rsedge.quantize.activations import LinearStats
from rsedge.quantize.blockwise import WeightQuantConfig, quantize_blockwise

ALPHAS = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))
MAX_SEARCH_COLUMNS = 16384  # the error of very wide weights (lm_head) is estimated on a column sample


@dataclass(frozen=True)
class AwqResult:
    scales: np.ndarray | None  # [K] float32; None when alpha 0 (plain RTN) won
    alpha: float
    rtn_mse: float
    awq_mse: float


def search_scales(w_kn: np.ndarray, stats: LinearStats, q: WeightQuantConfig, seed: int = 0) -> AwqResult:
    x = stats.sample().astype(np.float32)
    if x.shape[0] == 0:
        return AwqResult(None, 0.0, float("nan"), float("nan"))
    w = w_kn.astype(np.float32)
    if w.shape[1] > MAX_SEARCH_COLUMNS:
        cols = np.random.default_rng(seed).choice(w.shape[1], MAX_SEARCH_COLUMNS, replace=False)
        w = w[:, np.sort(cols)]
    ref = x @ w
    mean = np.maximum(stats.mean_abs.astype(np.float32), 1e-8)
    # Search with the blocks the graph will use: the TensorRT INT8 form is per output channel (one block of K).
    block = w.shape[0] if (q.form == "qdq" and q.bits == 8) else q.block_size
    errors: dict[float, tuple[float, np.ndarray | None]] = {}
    for alpha in ALPHAS:
        if alpha == 0.0:
            s = None
            w_eff = quantize_blockwise(w, q.bits, block, q.symmetric).dequantize()
        else:
            s = mean**alpha
            s = s / np.sqrt(s.max() * s.min())  # keep the scaled weight's range centred
            w_eff = quantize_blockwise(w * s[:, None], q.bits, block, q.symmetric).dequantize() / s[:, None]
        errors[alpha] = (float(np.mean((x @ w_eff - ref) ** 2)), s)
    best = min(errors, key=lambda a: errors[a][0])
    return AwqResult(
        None if errors[best][1] is None else errors[best][1].astype(np.float32),
        float(best),
        errors[0.0][0],
        errors[best][0],
    )
