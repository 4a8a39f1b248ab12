"""Decoder backends: the one interface `Pipeline` steps a decoder through, one class per engine.

A backend owns a decoder graph (or engine) and makes per-request state; everything a request writes
(KV cache, logits, IO bindings) lives in that state, so one backend serves concurrent requests.

Backends are found by `SessionConfig.device` through `BACKENDS` (module:class, imported on first use: the
CPU runtime never imports a CUDA binding or TensorRT). Adding one is a module and a row here.
"""

from __future__ import annotations

import importlib

from rsedge.errors import OptionError
from rsedge.runtime.backends.base import DecoderBackend, DecoderSpec, DecodeState

BACKENDS: dict[str, str] = {
    "cpu": "rsedge.runtime.backends.ort_cpu:OrtCpuDecoder",
    "cuda": "rsedge.runtime.backends.ort_cuda:OrtCudaDecoder",
    "tensorrt": "rsedge.runtime.backends.ort_tensorrt:OrtTensorrtDecoder",
    "tensorrt-engine": "rsedge.runtime.backends.trt_engine:TrtEngineDecoder",
}


def backend_class(name: str) -> type[DecoderBackend]:
    """The backend class registered under ``name``."""
    if name not in BACKENDS:
        raise OptionError(f"unknown decoder backend {name!r}; choose from {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["BACKENDS", "DecodeState", "DecoderBackend", "DecoderSpec", "backend_class"]
