"""A decoder graph stepped through onnxruntime with IO binding over one KV allocation per request.

Subclasses say where that allocation lives (host memory, or device memory as an OrtValue) and which
providers run the graph; the binding logic is shared, so what the CPU tests prove holds for the GPU path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rsedge.runtime.backends.base import DecoderBackend, DecoderSpec, DecodeState
from rsedge.runtime.sessions import ORT_DTYPES, SessionConfig, make_session

INPUTS_EMBEDS, POSITION_IDS, LOGITS = "inputs_embeds", "position_ids", "logits"
PAST_KEY = "past_key_values."


class KVMemory:
    """Every layer's key and value buffers inside one allocation, addressed by byte offset.

    Shared form (fused GroupQueryAttention): one [1, kv, capacity, hd] region per layer and kind, bound as
    both past and present; the kernel appends the new tokens in place.
    Portable form: two sides of such regions used ping-pong: a step reads the past ([1, kv, P, hd], the
    start of a region) from one side and writes the present ([1, kv, P+S, hd]) into the other.
    """

    def __init__(self, spec: DecoderSpec, capacity: int, dtype: np.dtype, memory: Any, base: int) -> None:
        self.spec, self.capacity, self.dtype = spec, capacity, np.dtype(dtype)
        self.memory, self.base = memory, base  # memory keeps the allocation alive; base is its address
        self.side = 0

    @staticmethod
    def nbytes(spec: DecoderSpec, capacity: int, dtype: np.dtype) -> int:
        sides = 1 if spec.shared_kv else 2
        return sides * spec.layers * 2 * spec.kv_heads * capacity * spec.head_dim * np.dtype(dtype).itemsize

    def _region(self, side: int, layer: int, kind: int) -> int:
        block = self.spec.kv_heads * self.capacity * self.spec.head_dim * self.dtype.itemsize
        return self.base + ((side * self.spec.layers + layer) * 2 + kind) * block

    def shape(self, length: int) -> tuple[int, int, int, int]:
        return (1, self.spec.kv_heads, length, self.spec.head_dim)

    def past(self, layer: int, kind: int, length: int) -> tuple[int, tuple[int, ...]]:
        """Address and shape the graph reads layer ``layer``'s past keys (kind 0) or values (kind 1) from."""
        if self.spec.shared_kv:
            return self._region(0, layer, kind), self.shape(self.capacity)
        return self._region(self.side, layer, kind), self.shape(length)

    def present(self, layer: int, kind: int, length: int) -> tuple[int, tuple[int, ...]]:
        """Address and shape the graph writes the present (past + new, ``length`` positions) to."""
        if self.spec.shared_kv:
            return self._region(0, layer, kind), self.shape(self.capacity)
        return self._region(1 - self.side, layer, kind), self.shape(length)

    def advance(self) -> None:
        if not self.spec.shared_kv:
            self.side = 1 - self.side


class OrtDecoder(DecoderBackend):
    """Common onnxruntime decoder: subclasses give ``memory_device`` and ``_allocate``."""

    def __init__(
        self,
        path: Path,
        spec: DecoderSpec,
        cfg: SessionConfig,
        session: Any = None,
        cache_key: str = "",
        prefill: Path | None = None,
    ) -> None:
        """``session``: an existing InferenceSession of ``path``; ``cache_key`` names the graph's engine
        cache (the TensorRT provider), normally its sha256 from the manifest; ``prefill``: the decoder's INT8
        prefill twin (same I/O and KV layout), which then runs every step of more than one token."""
        self.spec, self.cfg = spec, cfg
        # Whose kernel runs the decode steps' attention ("onnxruntime" or "rsedge"), and why not rsedge's; the
        # prefill twin's, for a bundle that has one.
        self.attention, self.attention_note, self.prefill_attention = "onnxruntime", "", "onnxruntime"
        self.session = session if session is not None else self._make_session(path, cfg, cache_key, prefill)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.dtype = np.dtype(ORT_DTYPES[inputs[INPUTS_EMBEDS].type])
        # The cache's element type is the graph's: the activation dtype, or int8 for a bundle exported with
        # --kv-cache int8 (GroupQueryAttention quantizes new rows with the graph's per-channel scales).
        past = inputs.get(f"{PAST_KEY}0.key")
        self.kv_dtype = np.dtype(ORT_DTYPES[past.type]) if past is not None else self.dtype
        self.prefill_session = self._make_prefill_session(prefill, cfg) if prefill is not None else None
        self.vocab = int(self.session.get_outputs()[0].shape[-1])

    def _allocate(self, nbytes: int, zero: bool) -> tuple[Any, int]:
        """(an object keeping ``nbytes`` alive, its address) on ``memory_device``."""
        raise NotImplementedError

    def _make_session(self, path: Path, cfg: SessionConfig, cache_key: str, prefill: Path | None) -> Any:
        """The decode graph's session (subclasses may run it on other kernels)."""
        return make_session(path, cfg, cache_key=cache_key)

    def _make_prefill_session(self, prefill: Path, cfg: SessionConfig) -> Any:
        """The INT8 prefill twin's session (``self.kv_dtype`` is known by then)."""
        return make_session(prefill, cfg)

    def new_state(self, capacity: int) -> DecodeState:
        nbytes = KVMemory.nbytes(self.spec, capacity, self.kv_dtype)
        # The fused kernel reads the shared buffer only below each row's length, but zeroed memory keeps
        # a stray read finite; the portable form reads only what an earlier step wrote.
        memory, base = self._allocate(nbytes, zero=self.spec.shared_kv)
        cache = KVMemory(self.spec, capacity, self.kv_dtype, memory, base)
        return DecodeState(capacity=capacity, cache=cache, logits=np.empty((1, self.vocab), dtype=np.float32))

    def step(self, embeds: np.ndarray, state: DecodeState) -> np.ndarray:
        new = int(embeds.shape[1])
        state.reserve(new)
        session = self.prefill_session if new > 1 and self.prefill_session is not None else self.session
        key = f"io:{id(session)}"
        io = state.bindings.get(key)
        if io is None or not self.spec.shared_kv:
            io = self._bind(session, state, new)
            if self.spec.shared_kv:  # the shared buffers never move: bound once per request and graph
                state.bindings[key] = io
        # Only the new tokens' embeddings and positions go in from the host; onnxruntime moves them to
        # the device a GPU provider needs them on.
        io.bind_cpu_input(INPUTS_EMBEDS, np.ascontiguousarray(embeds, dtype=self.dtype))
        io.bind_cpu_input(POSITION_IDS, np.arange(state.length, state.length + new, dtype=np.int64)[None])
        if state.extra_inputs is not None:
            for name, value in state.extra_inputs(state.length, new).items():
                io.bind_cpu_input(name, np.ascontiguousarray(value))
        session.run_with_iobinding(io)
        state.length += new
        state.cache.advance()
        return state.logits[0]

    def _bind(self, session: Any, state: DecodeState, new: int) -> Any:
        """A binding of ``session``'s every KV buffer (on ``memory_device``) and the host logits row."""
        io = session.io_binding()
        cache: KVMemory = state.cache
        dev, dev_id = self.memory_device, self.cfg.device_id if self.memory_device != "cpu" else 0
        for i in range(self.spec.layers):
            for kind, suffix in ((0, "key"), (1, "value")):
                ptr, shape = cache.past(i, kind, state.length)
                io.bind_input(f"{PAST_KEY}{i}.{suffix}", dev, dev_id, self.kv_dtype, shape, ptr)
                ptr, shape = cache.present(i, kind, state.length + new)
                io.bind_output(f"present.{i}.{suffix}", dev, dev_id, self.kv_dtype, shape, ptr)
        logits = state.logits
        io.bind_output(LOGITS, "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        return io
