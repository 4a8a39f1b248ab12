"""rsedge's own onnxruntime kernels, where a profile showed onnxruntime's was what held a step back.

``gqa_decode.c``: GroupQueryAttention over the shared KV buffer, decode steps and prompts. onnxruntime's CPU
kernel runs an M=1 SGEMM per query head, repacking each KV head's cache once per query head of its group; this one
reads each KV head's rows once for all its query heads, in chunks over onnxruntime's threads: at a 760-token depth
on Qwen2-0.5B's shape one layer's call fell from 159 to 48 us (INT8 cache: 355 to 67 us), ~3 ms of a decode step
(scripts/bench_attention_kernel.py; the README has the figures and the machine).

The runtime uses it for every CPU decoder graph with GroupQueryAttention over packed QKV and a float32 or INT8
(``--kv-cache int8``) cache, the INT8 prefill twin included, when it can be built here (:mod:`rsedge.kernels.build`:
a C compiler and onnxruntime's C API header), onnxruntime is >= 1.17 and the onnx package is installed; otherwise
onnxruntime's kernel runs, and ``rsedge kernels`` / ``rsedge bench`` say why. ``RSEDGE_KERNELS=0`` turns it off
for a process.
"""

from __future__ import annotations

import os
from pathlib import Path

from rsedge.kernels.build import KernelUnavailable, library

__all__ = ["KernelUnavailable", "decode_attention", "enabled"]


def enabled() -> bool:
    """Whether this process may use rsedge's kernels (``RSEDGE_KERNELS=0`` says no)."""
    return os.environ.get("RSEDGE_KERNELS", "1") != "0"


def decode_attention(graph: Path) -> tuple[bytes, Path]:
    """(the decoder graph ``graph`` with its attention on the kernel, the kernel's library), or KernelUnavailable."""
    if not enabled():
        raise KernelUnavailable("RSEDGE_KERNELS=0")
    import onnxruntime as ort

    from rsedge.kernels.attention_graph import decode_graph
    from rsedge.runtime.ort_support import parse_version

    if (parse_version(ort.__version__) or (0,)) < (1, 17):
        raise KernelUnavailable(f"onnxruntime {ort.__version__} is older than 1.17 (the kernel's C API)")
    lib = library("gqa_decode")
    return decode_graph(graph.read_bytes()), lib
