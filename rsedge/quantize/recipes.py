"""Versioned quantization recipes: which weights go to which precision, recorded in the manifest.

A recipe is data, not code paths: the export reads it to pick each weight's quantization, and the
manifest stores it whole, so a bundle says exactly how it was made.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from rsedge.errors import OptionError
from rsedge.quantize.activations import LinearStats
from rsedge.quantize.awq import AwqResult, search_scales
from rsedge.quantize.blockwise import WeightQuantConfig

VISION_CHOICES = ("model", "int8")


@dataclass(frozen=True)
class Recipe:
    name: str
    version: int
    decoder: WeightQuantConfig | None  # every decoder linear (attention, experts)
    lm_head: WeightQuantConfig | None
    embeddings: str  # "model" (graph dtype) or "int8-rows" (per-row symmetric, dequantized by the runtime)
    vision: str  # "model": the graph dtype; "int8": static Q/DQ calibrated on RS images
    algorithm: str = "rtn"  # "rtn" or "awq" (needs a calibration set)
    vision_calibration: str = "percentile"  # minmax, percentile or entropy (for vision "int8")
    exclude: tuple[str, ...] = field(default_factory=tuple)  # regexes of weight names kept unquantized

    def weight_quant(self, name: str) -> WeightQuantConfig | None:
        """The quantization of one decoder weight (names as the graph builder gives them)."""
        head = name.startswith(("lm_head.", "model.embed_tokens."))  # a tied lm_head reads the embedding
        if any(re.search(p, name) or (head and re.search(p, "lm_head")) for p in self.exclude):
            return None
        return self.lm_head if head else self.decoder

    @property
    def needs_calibration(self) -> bool:
        return self.algorithm == "awq" or self.vision == "int8"

    @property
    def opset(self) -> int:
        """INT4 blocked DequantizeLinear (the TensorRT form) needs opset 21; everything else stays at 17."""
        blocked_dq = any(q is not None and q.form == "qdq" and q.bits == 4 for q in (self.decoder, self.lm_head))
        return 21 if blocked_dq else 17

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class QuantPlan:
    """A recipe plus what calibration decided for this model (AWQ input scales per weight)."""

    recipe: Recipe
    stats: dict[str, LinearStats] = field(default_factory=dict)  # calibration activations per weight
    awq: dict[str, AwqResult] = field(default_factory=dict)

    def weight_quant(self, name: str) -> WeightQuantConfig | None:
        return self.recipe.weight_quant(name)

    def input_scales(self, name: str, weight_kn: np.ndarray | Callable[[], np.ndarray]) -> np.ndarray | None:
        """AWQ scales of a weight's input channels, searched on first use (None: plain RTN)."""
        q = self.weight_quant(name)
        if self.recipe.algorithm != "awq" or q is None or name not in self.stats:
            return None
        if name not in self.awq:
            w = np.asarray(weight_kn() if callable(weight_kn) else weight_kn, dtype=np.float32)
            self.awq[name] = search_scales(w, self.stats[name], q)
        return self.awq[name].scales

    def summary(self) -> dict[str, Any]:
        """What calibration decided, for the manifest: alpha and error reduction per weight."""
        return {
            name: {"alpha": r.alpha, "rtn_mse": r.rtn_mse, "awq_mse": r.awq_mse} for name, r in sorted(self.awq.items())
        }


def make_recipe(
    precision: str,
    block_size: int = 128,
    form: str = "ort",
    accuracy_level: int = 4,
    algorithm: str = "rtn",
    vision: str | None = None,
    vision_calibration: str = "percentile",
    keep: tuple[str, ...] = (),
) -> Recipe | None:
    """The built-in recipe of a precision; None for fp32/fp16 (nothing quantized).

    ``keep``: regexes of decoder weight names (e.g. ``lm_head``, ``layers\\.0\\.``) left in the compute dtype,
    for the part a parity report shows to be sensitive.
    """
    if vision is not None and vision not in VISION_CHOICES:
        raise OptionError(f"vision precision must be one of {', '.join(VISION_CHOICES)}, got {vision!r}")
    for pattern in keep:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise OptionError(f"--keep {pattern!r} is not a regular expression: {exc}") from None
    if precision in ("fp32", "fp16"):
        if keep:
            raise OptionError(f"--keep applies to quantized exports; {precision} quantizes nothing")
        return None
    if precision in ("int8", "int4") and algorithm not in ("rtn", "awq"):
        raise OptionError(f"unknown quantization algorithm {algorithm!r}; choose rtn or awq")
    if precision == "int8":
        w8 = WeightQuantConfig(bits=8, block_size=block_size, form=form, accuracy_level=accuracy_level)
        return Recipe(
            "int8-w8" if algorithm == "rtn" else "int8-w8-awq",  # the RTN name predates AWQ at INT8
            1,
            decoder=w8,
            lm_head=w8,
            embeddings="int8-rows",
            vision=vision or "int8",
            algorithm=algorithm,
            vision_calibration=vision_calibration,
            exclude=tuple(keep),
        )
    if precision == "int4":
        w4 = WeightQuantConfig(bits=4, block_size=block_size, form=form, accuracy_level=accuracy_level)
        # lm_head is 27% of a Qwen2-0.5B decoder's weights: INT4 too (as onnxruntime-genai does), unless
        # a parity report shows it is the sensitive part; then set lm_head to INT8 here.
        return Recipe(
            f"int4-w4-{algorithm}",
            1,
            decoder=w4,
            lm_head=w4,
            embeddings="int8-rows",
            vision=vision or "model",
            algorithm=algorithm,
            vision_calibration=vision_calibration,
            exclude=tuple(keep),
        )
    raise OptionError(f"unknown precision {precision!r}; choose fp32, fp16, int8 or int4")
