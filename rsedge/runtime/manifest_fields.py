"""Type checks of the manifest fields the runtime reads, so a missing or garbage field is one BundleError line.

Without them a hand-edited or hostile manifest surfaces as a KeyError or TypeError deep inside the pipeline.
Paths and sizes are checked by :mod:`rsedge.runtime.bundle`; this module checks shapes of values only.
"""

from __future__ import annotations

from typing import Any

from rsedge.errors import BundleError

_MISSING = object()
# Qwen2-VL's dynamic resolution (VisionPreprocess.to_manifest's kind): sizes come from smart_resize, not a field
DYNAMIC_RESOLUTION = "qwen2_vl_dynamic"


def _describe(kind: str) -> str:
    return {"int": "an integer", "pos": "a positive integer", "str": "a string", "dict": "an object", "list": "a list"}[
        kind
    ]


def _fits(value: Any, kind: str) -> bool:
    if kind in ("int", "pos"):
        ok = isinstance(value, int) and not isinstance(value, bool)
        return ok and (kind == "int" or value > 0)
    return isinstance(value, {"str": str, "dict": dict, "list": list}[kind])


class Fields:
    """Typed look-ups into one manifest; every failure names the dotted field and the manifest."""

    def __init__(self, where: str, manifest: dict[str, Any]) -> None:
        self.where = where
        self.manifest = manifest

    def fail(self, field: str, problem: str) -> BundleError:
        return BundleError(f"{self.where}: manifest field {field} {problem}")

    def get(self, field: str, kind: str, optional: bool = False) -> Any:
        node: Any = self.manifest
        for part in field.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
            if node is _MISSING:
                if optional:
                    return None
                raise self.fail(field, "is missing")
        if optional and node is None:
            return None
        if not _fits(node, kind):
            raise self.fail(field, f"must be {_describe(kind)}, not {type(node).__name__}")
        return node

    def check_runtime_fields(self) -> None:
        """Every field Pipeline reads besides file names and arrays (those the bundle checks itself)."""
        self.get("precision", "str")
        for name in ("num_hidden_layers", "num_key_value_heads", "hidden_size", "num_attention_heads"):
            self.get(f"model.text.{name}", "pos")
        experts = self.get("graphs.decoder.experts", "dict")
        if sorted(experts) != [str(i) for i in range(len(experts))] or not experts:
            raise self.fail("graphs.decoder.experts", "must be keyed 0..N-1")
        for key in experts:
            self.get(f"graphs.decoder.experts.{key}.file", "str")
        self.get("graphs.vision.file", "str")
        self.get("graphs.decoder.attention", "str", optional=True)
        self.get("graphs.decoder.max_positions", "pos", optional=True)
        for name, value in self.get("router.table", "dict").items():
            if not _fits(value, "int") or not 0 <= value < len(experts):
                raise self.fail(f"router.table.{name}", f"must be an expert index below {len(experts)}")
        if not 0 <= self.get("router.default", "int") < len(experts):
            raise self.fail("router.default", f"must be an expert index below {len(experts)}")
        kind = self.get("preprocess.kind", "str")
        if kind == DYNAMIC_RESOLUTION:  # no fixed size; VisionPreprocess.from_manifest checks its fields
            pass
        elif self.get("preprocess.image_size", "pos") and kind == "anyres_max":
            self.get("preprocess.max_patches", "pos")
            for i, pair in enumerate(self.get("preprocess.pinpoints", "list")):
                if not (isinstance(pair, list) and len(pair) == 2 and all(_fits(v, "pos") for v in pair)):
                    raise self.fail(f"preprocess.pinpoints[{i}]", "must be a [height, width] pair")
        elif kind != "square":
            raise self.fail("preprocess.kind", f"must be square, anyres_max or {DYNAMIC_RESOLUTION}, not {kind!r}")
        self.get("tokenizer.file", "str")
        stops = self.get("tokenizer.stop_token_ids", "list")
        if not all(_fits(t, "int") and t >= 0 for t in stops):
            raise self.fail("tokenizer.stop_token_ids", "must be a list of token ids")
        self.get("prompt", "dict")
        arrays = self.get("arrays", "dict")
        # Arrays a family alone reads (RSUniVLM's image_newline) are its to check: Bundle.array names a missing one.
        if "embed_tokens" not in arrays:
            raise self.fail("arrays.embed_tokens", "is missing")
