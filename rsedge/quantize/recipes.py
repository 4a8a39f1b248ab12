"""Versioned quantization recipes: which weights go to which precision, recorded in the manifest.

A recipe is data, not code paths: the export reads it to pick each weight's quantization, and the
manifest stores it whole, so a bundle says exactly how it was made.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from rsedge.errors import OptionError
from rsedge.quantize.blockwise import WeightQuantConfig


@dataclass(frozen=True)
class Recipe:
    name: str
    version: int
    decoder: WeightQuantConfig | None  # every decoder linear (attention, experts)
    lm_head: WeightQuantConfig | None
    embeddings: str  # "model" (graph dtype) or "int8-rows" (per-row symmetric, dequantized by the runtime)
    vision: str  # "model": the vision graph stays in the graph dtype
    exclude: tuple[str, ...] = field(default_factory=tuple)  # regexes of weight names kept unquantized

    def weight_quant(self, name: str) -> WeightQuantConfig | None:
        """The quantization of one decoder weight (names as the graph builder gives them)."""
        if any(re.search(p, name) for p in self.exclude):
            return None
        if name.startswith(("lm_head.", "model.embed_tokens.")):
            return self.lm_head
        return self.decoder

    @property
    def opset(self) -> int:
        """Blocked DequantizeLinear (the TensorRT form) needs opset 21; MatMulNBits graphs stay at 17."""
        forms = {q.form for q in (self.decoder, self.lm_head) if q is not None}
        return 21 if "qdq" in forms else 17

    def to_json(self) -> dict:
        return asdict(self)


def make_recipe(precision: str, block_size: int = 128, form: str = "ort", accuracy_level: int = 4) -> Recipe | None:
    """The built-in recipe of a precision; None for fp32/fp16 (nothing quantized)."""
    if precision in ("fp32", "fp16"):
        return None
    if precision == "int8":
        w8 = WeightQuantConfig(bits=8, block_size=block_size, form=form, accuracy_level=accuracy_level)
        return Recipe("int8-w8", 1, decoder=w8, lm_head=w8, embeddings="int8-rows", vision="model")
    if precision == "int4":
        w4 = WeightQuantConfig(bits=4, block_size=block_size, form=form, accuracy_level=accuracy_level)
        # lm_head is 27% of a Qwen2-0.5B decoder's weights: INT4 too (as onnxruntime-genai does), unless
        # a parity report shows it is the sensitive part; then set lm_head to INT8 here.
        return Recipe("int4-w4-rtn", 1, decoder=w4, lm_head=w4, embeddings="int8-rows", vision="model")
    raise OptionError(f"unknown precision {precision!r}; choose fp32, fp16, int8 or int4")
