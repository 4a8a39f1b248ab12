"""Weights stored once, as ONNX external data shared by several graphs of one bundle.

Every tensor is appended to a named ``.bin`` file inside one folder (the bundle folder, or the temporary
folder the caller later moves into place). A tensor of 4 KiB or more starts on a 4096-byte boundary so
onnxruntime can mmap it; smaller ones are aligned to 64 bytes. Asking again for the same (file, name) returns
the entry already written, which is how the decoder graphs of all experts share attention, norms and lm_head.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper

PAGE_ALIGN = 4096
SMALL_ALIGN = 64
PAGE_ALIGN_MIN_BYTES = 4096

ArrayOrFactory = np.ndarray | Callable[[], np.ndarray]


class WeightRecord(NamedTuple):
    """Where one raw array lies: ``np.memmap(folder / file, dtype, "r", offset, shape)`` reads it back."""

    file: str
    offset: int
    shape: tuple[int, ...]
    dtype: str  # numpy name, or "int4" for packed nibbles (two per byte)
    nbytes: int


class WeightStore:
    """Appends tensors to ``.bin`` files in ``folder`` and hands out external-data TensorProtos for them."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._records: dict[tuple[str, str], WeightRecord] = {}
        self._sizes: dict[str, int] = {}
        self.cache: dict[tuple, object] = {}  # derived tensors (quantized codes) shared by several graphs

    def file_name(self, file: str) -> str:
        """The file a tensor asked for in ``file`` is written to, and the name a graph beside it takes: the name itself
        here; a second decoder form's store (rsedge.export.forms.FormStore) adds the form's suffix."""
        return file

    def __contains__(self, key: tuple[str, str]) -> bool:
        """``(file, name) in store``."""
        return key in self._records

    def tensor(self, name: str, array: ArrayOrFactory, file: str = "decoder_shared.bin") -> onnx.TensorProto:
        """An initializer named ``name`` whose data lies in ``file``, written there on first use.

        ``array`` may be a zero-argument callable, called only when (file, name) is not stored yet, so that
        a derived tensor (a transposed or concatenated weight) is computed once per bundle.
        """
        key = (file, name)
        rec = self._records.get(key)
        if rec is None:
            arr = np.ascontiguousarray(array() if callable(array) else array)
            rec = self._append(file, arr.tobytes(), tuple(int(d) for d in arr.shape), arr.dtype.name)
            self._records[key] = rec
        elif not callable(array) and (tuple(array.shape) != rec.shape or array.dtype.name != rec.dtype):
            raise ValueError(
                f"{name!r} is already stored in {file} as {rec.dtype}{list(rec.shape)}, "
                f"not {array.dtype.name}{list(array.shape)}"
            )
        return self._proto(name, rec)

    def int4_tensor(
        self, name: str, packed: Callable[[], bytes], shape: tuple[int, ...], file: str
    ) -> onnx.TensorProto:
        """An INT4 initializer from packed nibbles (numpy has no int4 dtype)."""
        key = (file, name)
        if key not in self._records:
            self._records[key] = self._append(file, packed(), tuple(shape), "int4")
        return self._proto(name, self._records[key])

    def record(self, name: str, file: str | None = None) -> WeightRecord:
        """The (file, offset, shape, dtype) of a stored tensor; name ``file`` when the name is in several."""
        if file is not None:
            try:
                return self._records[(file, name)]
            except KeyError:
                raise KeyError(f"{name!r} is not stored in {file}") from None
        found = [r for (f, n), r in self._records.items() if n == name]
        if not found:
            raise KeyError(f"{name!r} is not stored")
        if len(found) > 1:
            raise KeyError(f"{name!r} is stored in several files ({', '.join(r.file for r in found)}); name one")
        return found[0]

    def records(self) -> dict[tuple[str, str], WeightRecord]:
        """Every stored tensor by (file, name)."""
        return dict(self._records)

    def file_sizes(self) -> dict[str, int]:
        """Bytes written to each file so far."""
        return dict(self._sizes)

    def _append(self, file: str, raw: bytes, shape: tuple[int, ...], dtype: str) -> WeightRecord:
        if Path(file).name != file or not file:
            raise ValueError(f"weight file name {file!r} must be a plain file name inside the store folder")
        path = self.folder / file
        if file not in self._sizes:
            if path.exists():  # a stale file from an earlier run would shift every offset
                raise FileExistsError(f"{path} already exists; a WeightStore writes into fresh files only")
            self._sizes[file] = 0
        size = self._sizes[file]
        align = PAGE_ALIGN if len(raw) >= PAGE_ALIGN_MIN_BYTES else SMALL_ALIGN
        offset = -(-size // align) * align
        with open(path, "ab") as f:
            if offset > size:
                f.write(b"\0" * (offset - size))
            f.write(raw)
        self._sizes[file] = offset + len(raw)
        return WeightRecord(file, offset, shape, dtype, len(raw))

    @staticmethod
    def _proto(name: str, rec: WeightRecord) -> onnx.TensorProto:
        t = onnx.TensorProto()
        t.name = name
        t.dims.extend(rec.shape)
        t.data_type = TensorProto.INT4 if rec.dtype == "int4" else helper.np_dtype_to_tensor_dtype(np.dtype(rec.dtype))
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", rec.file), ("offset", rec.offset), ("length", rec.nbytes)):
            entry = t.external_data.add()
            entry.key = key
            entry.value = str(value)
        return t
