"""onnxruntime's CUDA provider with the KV cache resident on the GPU.

The cache is one device allocation (an OrtValue) per request, bound by address; per token only the new
embedding row goes up and one logits row comes down. The graph should be FP16 (or INT4/INT8 with FP16
compute): onnxruntime's CUDA GroupQueryAttention takes no FP32.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rsedge.runtime.backends.ort_decoder import OrtDecoder


class OrtCudaDecoder(OrtDecoder):
    memory_device = "cuda"

    def _allocate(self, nbytes: int, zero: bool) -> tuple[Any, int]:
        import onnxruntime as ort

        # Allocated in the cache's own dtype (OrtValue has no raw-bytes type); nbytes is a multiple of it.
        n = max(nbytes // self.kv_dtype.itemsize, 1)
        if zero:  # one host->device copy per request, never per token
            value = ort.OrtValue.ortvalue_from_numpy(np.zeros(n, dtype=self.kv_dtype), "cuda", self.cfg.device_id)
        else:
            value = ort.OrtValue.ortvalue_from_shape_and_type([n], self.kv_dtype, "cuda", self.cfg.device_id)
        return value, int(value.data_ptr())
