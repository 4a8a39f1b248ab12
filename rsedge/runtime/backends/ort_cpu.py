"""onnxruntime on the CPU: the KV cache in host memory, bound in place (no per-token copy)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rsedge.runtime.backends.ort_decoder import OrtDecoder
from rsedge.runtime.sessions import SessionConfig, make_session


class OrtCpuDecoder(OrtDecoder):
    memory_device = "cpu"

    def _allocate(self, nbytes: int, zero: bool) -> tuple[Any, int]:
        buf = np.zeros(nbytes, dtype=np.uint8) if zero else np.empty(nbytes, dtype=np.uint8)
        return buf, buf.ctypes.data

    def _make_session(self, path: Path, cfg: SessionConfig, cache_key: str, prefill: Path | None) -> Any:
        """The decode graph's attention on rsedge's kernel (rsedge.kernels) where that can be built and the graph
        is one it takes (GroupQueryAttention, packed QKV, a float32 or INT8 cache), else on onnxruntime's
        (``attention_note`` says why)."""
        if not cfg.kernels:
            self.attention_note = "kernels off (SessionConfig)"
            return make_session(path, cfg, cache_key=cache_key)
        session, self.attention_note = self._kernel_session(path, cfg, cache_key)
        if session is None:
            return make_session(path, cfg, cache_key=cache_key)
        self.attention = "rsedge"
        return session

    def _make_prefill_session(self, prefill: Path, cfg: SessionConfig) -> Any:
        """The INT8 prefill twin's attention on the kernel too when the decode graph's is (the twin shares its
        cache): its prompt path is level with onnxruntime's float kernel after a long past and ~2x faster from an
        empty cache, and ~3-10x faster than onnxruntime's quantized-cache kernel (README, "A decode attention
        kernel")."""
        if self.attention == "rsedge":
            session, _ = self._kernel_session(prefill, cfg, "")
            if session is not None:
                self.prefill_attention = "rsedge"
                return session
        return make_session(prefill, cfg)

    @staticmethod
    def _kernel_session(path: Path, cfg: SessionConfig, cache_key: str) -> tuple[Any, str]:
        """(a session of ``path`` with its attention on rsedge's kernel, "") or (None, why not)."""
        from rsedge.kernels import KernelUnavailable, decode_attention

        try:
            model, lib = decode_attention(path)
            return make_session(path, cfg, cache_key=cache_key, model=model, custom_ops=lib), ""
        except KernelUnavailable as e:
            return None, str(e)
        except Exception as e:  # onnxruntime refused the library or the graph: its own kernel still runs the bundle
            return None, f"onnxruntime refused the kernel: {str(e).splitlines()[0] if str(e) else e!r}"
