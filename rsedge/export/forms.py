"""A second decoder form in one bundle: ``rsedge export --target cpu --also-target jp6.1`` writes the decoders of
the second target's graph form beside the first's, so one export serves a CPU ground station (onnxruntime,
MatMulNBits) and a Jetson (TensorRT, explicit Q/DQ).

What the two forms have in common is written once: the vision graph (the first target's choice), the tokenizer,
the embedding table the runtime reads, and every decoder tensor whose bytes the first form already stored (the
second form's graph reads it from the first form's file). The quantized linears are the same rounding of the same
weights, but not the same bytes, so each form stores its own (:data:`LAYOUTS`, the manifest's
``forms.<name>.weights``). The runtime picks a form by device (:mod:`rsedge.runtime.forms`).

    first form                 second form (suffix .<form>)
    decoder_expert{e}.onnx     decoder_expert{e}.qdq.onnx
    decoder_shared.bin         decoder_shared.qdq.bin       <- only tensors whose bytes differ from the first's
    decoder_expert{e}.bin      decoder_expert{e}.qdq.bin
    vision_int8.onnx, tokenizer/, the embedding table: one copy, both forms
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import onnx

from rsedge.export.decoder_graph import DECODER_SHARED_BIN
from rsedge.export.linear_map import LINEAR_MAP
from rsedge.export.weight_store import ArrayOrFactory, WeightRecord, WeightStore
from rsedge.runtime.onnx_refs import graph_external_locations

# What keeps the two forms' quantized weights apart (rsedge.quantize.blockwise): the same codes, other bytes.
LAYOUTS = {
    "ort": "MatMulNBits: unsigned codes (signed + 8 for INT4, + 128 for INT8) per output column, [N, blocks, "
    "block bytes], scales [N * blocks] in the compute dtype (q's carry the attention scale in the fused forms)",
    "qdq": "DequantizeLinear: signed codes along K, [K, N] (INT4 blocked, INT8 per output channel), scales "
    "[blocks, N] in the compute dtype",
}
# Derived tensors of the first form's export that the second form's validation reads as they are.
SHARED_CACHE = (("embed_rows",), LINEAR_MAP)


def form_file(rel: str, form: str) -> str:
    """``decoder_expert0.onnx`` -> ``decoder_expert0.qdq.onnx``: a second form's file beside the first's."""
    p = PurePosixPath(rel)
    return str(p.with_name(f"{p.stem}.{form}{p.suffix}"))


class FormStore(WeightStore):
    """A second decoder form's weights: appended to its own files (``decoder_shared.<form>.bin``, ...), except a
    tensor whose name, shape, dtype and bytes the first form's store already holds, which the graph reads from the
    first form's file (counted in :attr:`shared`)."""

    def __init__(self, first: WeightStore, form: str) -> None:
        super().__init__(first.folder)
        self.first, self.form = first, form
        self.cache = {k: v for k, v in first.cache.items() if k in SHARED_CACHE}
        self.shared: dict[str, int] = {}  # tensor name -> bytes read from the first form's files
        self._firsts: dict[str, list[WeightRecord]] = {}
        for (_, name), rec in first.records().items():
            self._firsts.setdefault(name, []).append(rec)

    def file_name(self, file: str) -> str:
        return form_file(file, self.form)

    def tensor(self, name: str, array: ArrayOrFactory, file: str = DECODER_SHARED_BIN) -> onnx.TensorProto:
        own = self.file_name(file)
        if (own, name) not in self:
            arr = np.ascontiguousarray(array() if callable(array) else array)
            if self._share(own, name, arr.tobytes(), tuple(int(d) for d in arr.shape), arr.dtype.name):
                return self._proto(name, self.record(name, own))
            array = arr
        return super().tensor(name, array, own)

    def int4_tensor(
        self, name: str, packed: Callable[[], bytes], shape: tuple[int, ...], file: str
    ) -> onnx.TensorProto:
        own = self.file_name(file)
        if (own, name) not in self:
            raw = packed()
            if self._share(own, name, raw, tuple(shape), "int4"):
                return self._proto(name, self.record(name, own))
            packed = lambda: raw  # noqa: E731
        return super().int4_tensor(name, packed, shape, own)

    def record(self, name: str, file: str | None = None) -> WeightRecord:
        """As WeightStore's; ``file`` may also be the first form's name of it or a first-form file it reads."""
        if file is None or (file, name) in self:
            return super().record(name, file)
        if (self.file_name(file), name) in self:
            return super().record(name, self.file_name(file))
        return self.first.record(name, file)

    def _share(self, own: str, name: str, raw: bytes, shape: tuple[int, ...], dtype: str) -> bool:
        for rec in self._firsts.get(name, []):
            if rec.shape == shape and rec.dtype == dtype and rec.nbytes == len(raw) and self._read(rec) == raw:
                self._records[(own, name)] = rec
                self.shared[name] = rec.nbytes
                return True
        return False

    def _read(self, rec: WeightRecord) -> bytes:
        with open(self.folder / rec.file, "rb") as f:
            f.seek(rec.offset)
            return f.read(rec.nbytes)


def decoder_files(decoder: dict[str, Any]) -> list[str]:
    """The ONNX files of a ``graphs.decoder`` record: every expert's decoder and INT8 prefill twin."""
    files = []
    for key in sorted(decoder["experts"], key=int):
        entry = decoder["experts"][key]
        files += [entry["file"], *([entry["prefill_file"]] if "prefill_file" in entry else [])]
    return files


def graph_listing(root: Path, decoder: dict[str, Any], files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A form's decoder graphs for the manifest: each file's sha256 (as ``files`` has it) and the weight files it
    reads."""
    return {
        rel: {"sha256": files[rel]["sha256"], "reads": sorted(graph_external_locations(root / rel))}
        for rel in decoder_files(decoder)
    }


def weights_record(store: FormStore, first_form: str, precision: str) -> dict[str, Any]:
    """The manifest's ``forms.<second>.weights``: the form's own weight files, what it reads from the first form's,
    and why the quantized linears are stored once per form."""
    why = (
        "the same INT4 codes (one rounding of the same weights) in two byte layouts"
        if precision == "int4"
        else "INT8 codes of two granularities (block-wise for MatMulNBits, per output channel for TensorRT)"
    )
    return {
        "files": store.file_sizes(),
        "shared_with_first_form": {"tensors": len(store.shared), "bytes": sum(store.shared.values())},
        "quantized_linears": f"stored once per form: {why}, which no graph can read in the other's",
        "layouts": {first_form: LAYOUTS[first_form], store.form: LAYOUTS[store.form]},
    }
