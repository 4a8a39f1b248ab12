"""onnxruntime sessions for a bundle's graphs: providers, threads, and the per-expert decoder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from rsedge.errors import OptionError

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


@dataclass(frozen=True)
class SessionConfig:
    device: str = "cpu"
    threads: int | None = None  # None: onnxruntime picks (one per physical core)

    def __post_init__(self) -> None:
        if self.device not in PROVIDERS:
            raise OptionError(f"unknown device {self.device!r}; choose from {', '.join(PROVIDERS)}")
        if self.threads is not None and not 1 <= self.threads <= (os.cpu_count() or 1) * 4:
            raise OptionError(f"threads must be between 1 and {(os.cpu_count() or 1) * 4}, got {self.threads}")


def make_session(path: Path, cfg: SessionConfig) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if cfg.threads:
        opts.intra_op_num_threads = cfg.threads
    opts.log_severity_level = 3
    available = set(ort.get_available_providers())
    providers = [p for p in PROVIDERS[cfg.device] if p in available]
    if PROVIDERS[cfg.device][0] not in available:
        raise OptionError(
            f"device {cfg.device!r} needs {PROVIDERS[cfg.device][0]}, which this onnxruntime lacks "
            f"(available: {', '.join(sorted(available))}); install onnxruntime-gpu or use --device cpu"
        )
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


class KVCache:
    """Preallocated key/value buffers for one request.

    ``shared=False`` (portable graphs): two buffers per layer and kind, used ping-pong: a step reads the past
    from one and onnxruntime writes the present (past + new) straight into the other through IO binding.
    ``shared=True`` (fused GroupQueryAttention graphs): one [1, kv, capacity, hd] buffer per layer and kind,
    bound as both past and present; the kernel writes only the new tokens into it. Either way there is no
    allocation and no host copy per token.
    """

    def __init__(
        self, layers: int, kv_heads: int, head_dim: int, capacity: int, dtype: np.dtype, shared: bool = False
    ) -> None:
        self.layers, self.kv_heads, self.head_dim, self.capacity = layers, kv_heads, head_dim, capacity
        self.shared = shared
        if shared:
            self.buffers = np.zeros((layers, 2, 1, kv_heads, capacity, head_dim), dtype=dtype)
        else:
            self.buffers = np.empty((2, layers, 2, kv_heads * capacity * head_dim), dtype=dtype)
        self.length = 0
        self._src = 0
        # Shared buffers never move, so a session binds them once per request (keyed by session).
        self.bindings: dict[int, ort.IOBinding] = {}

    def view(self, side: int, layer: int, kind: int, length: int) -> np.ndarray:
        flat = self.buffers[side, layer, kind, : self.kv_heads * length * self.head_dim]
        return flat.reshape(1, self.kv_heads, length, self.head_dim)

    def past(self, layer: int, kind: int) -> np.ndarray:
        if self.shared:
            return self.buffers[layer, kind]
        return self.view(self._src, layer, kind, self.length)

    def present(self, layer: int, kind: int, new_tokens: int) -> np.ndarray:
        if self.length + new_tokens > self.capacity:
            raise OptionError(f"KV cache full: {self.length}+{new_tokens} tokens exceed capacity {self.capacity}")
        if self.shared:
            return self.buffers[layer, kind]
        return self.view(1 - self._src, layer, kind, self.length + new_tokens)

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens
        if not self.shared:
            self._src = 1 - self._src


class DecoderSession:
    """One expert's decoder graph, stepped with IO binding over a KVCache."""

    def __init__(self, path: Path, cfg: SessionConfig, layers: int, shared_kv: bool = False) -> None:
        self.session = make_session(path, cfg)
        self.layers = layers
        self.shared_kv = shared_kv
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.dtype = np.dtype(ORT_DTYPES[inputs["inputs_embeds"].type])
        self.vocab = int(self.session.get_outputs()[0].shape[-1])
        self._logits = np.empty((1, self.vocab), dtype=np.float32)

    def new_cache(self, kv_heads: int, head_dim: int, capacity: int) -> KVCache:
        return KVCache(self.layers, kv_heads, head_dim, capacity, self.dtype, shared=self.shared_kv)

    def step(self, embeds: np.ndarray, cache: KVCache) -> np.ndarray:
        """Run S new tokens ([1,S,H]) after ``cache.length`` past ones; returns last-position logits [V]."""
        new = embeds.shape[1]
        io = cache.bindings.get(id(self)) if cache.shared else None
        if io is None:
            io = self._bind_cache(cache, new)
            if cache.shared:
                cache.bindings[id(self)] = io
        elif cache.length + new > cache.capacity:
            raise OptionError(f"KV cache full: {cache.length}+{new} tokens exceed capacity {cache.capacity}")
        io.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, dtype=self.dtype))
        io.bind_cpu_input("position_ids", np.arange(cache.length, cache.length + new, dtype=np.int64)[None])
        self.session.run_with_iobinding(io)
        cache.advance(new)
        return self._logits[0]

    def _bind_cache(self, cache: KVCache, new: int) -> ort.IOBinding:
        """A binding with every KV buffer and the logits bound (inputs_embeds/position_ids come per step)."""
        io = self.session.io_binding()
        for i in range(self.layers):
            for kind, suffix in ((0, "key"), (1, "value")):
                past = cache.past(i, kind)
                io.bind_input(f"past_key_values.{i}.{suffix}", "cpu", 0, past.dtype, past.shape, past.ctypes.data)
                pres = cache.present(i, kind, new)
                io.bind_output(f"present.{i}.{suffix}", "cpu", 0, pres.dtype, pres.shape, pres.ctypes.data)
        io.bind_output("logits", "cpu", 0, np.float32, self._logits.shape, self._logits.ctypes.data)
        return io
