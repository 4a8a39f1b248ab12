"""onnxruntime on the CPU: the KV cache in host memory, bound in place (no per-token copy)."""

from __future__ import annotations

from typing import Any

import numpy as np

from rsedge.runtime.backends.ort_decoder import OrtDecoder


class OrtCpuDecoder(OrtDecoder):
    memory_device = "cpu"

    def _allocate(self, nbytes: int, zero: bool) -> tuple[Any, int]:
        buf = np.zeros(nbytes, dtype=np.uint8) if zero else np.empty(nbytes, dtype=np.uint8)
        return buf, buf.ctypes.data
