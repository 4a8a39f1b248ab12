"""onnxruntime's TensorRT provider: engines built from the bundle's ONNX on first use, then cached.

Memory and binding are the CUDA backend's (the TensorRT provider takes CUDA device buffers); what differs
is the provider list (`rsedge.runtime.sessions.PROVIDERS`) and the engine cache options, whose folder is
keyed by the graph file's sha256 so a changed bundle never loads a stale engine.
"""

from __future__ import annotations

from rsedge.runtime.backends.ort_cuda import OrtCudaDecoder


class OrtTensorrtDecoder(OrtCudaDecoder):
    pass
