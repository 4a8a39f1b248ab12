"""A decoder engine built by ``rsedge build-engines``, run through TensorRT's name-based API (8.5 and 10.x).

Engines are built from the portable ("standard" attention) graphs: past_key_values.{i}.key/value [1, kv, P, hd]
in, present.{i}.key/value [1, kv, P+S, hd] out. Each request gets one device allocation (in its DecodeState)
holding the KV cache in :class:`KVMemory`'s ping-pong layout, the same one the onnxruntime backends bind, followed
by the staging rows of the step's inputs and the logits row. Every step sets each tensor's address in that
allocation (past from one side, present into the other), copies up only the new tokens' embeddings and positions,
runs the engine, and copies down one logits row. Nothing is allocated per token, and the cache never leaves the
device.

The engine and its execution context are shared by every request of this expert; a lock makes a step (set the
addresses, enqueue, synchronize) atomic, so concurrent requests take turns on the context and never see each
other's bindings. A step TensorRT's optimization profile does not cover is refused before anything runs.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from rsedge.errors import BundleError, OptionError
from rsedge.runtime.backends.base import DecoderBackend, DecoderSpec, DecodeState
from rsedge.runtime.backends.ort_decoder import INPUTS_EMBEDS, LOGITS, POSITION_IDS, KVMemory
from rsedge.runtime.sessions import SessionConfig
from rsedge.runtime.trt_session import TrtEngine, TrtRunError

ALIGN = 256  # each input/output region of a request's allocation starts on a 256-byte boundary, as cudaMalloc's do
REBUILD = "rebuild the engines with rsedge build-engines and a larger --max-prompt / --max-total"


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def kv_names(layers: int) -> list[tuple[int, int, str, str]]:
    """(layer, kind, past input, present output) of every KV tensor; kind 0 is keys, 1 values."""
    return [
        (i, kind, f"past_key_values.{i}.{suffix}", f"present.{i}.{suffix}")
        for i in range(layers)
        for kind, suffix in ((0, "key"), (1, "value"))
    ]


class TrtEngineDecoder(DecoderBackend):
    memory_device = "cuda"

    def __init__(
        self, path: Path, spec: DecoderSpec, cfg: SessionConfig, cache_key: str = "", engine: TrtEngine | None = None
    ) -> None:
        """``path``: the decoder's engine file (checked by ``rsedge.runtime.engines.EngineSet``); ``cache_key`` is
        the onnxruntime backends' and unused here; ``engine``: an already loaded one."""
        if spec.shared_kv:
            raise OptionError(
                "TensorRT engines are built from the portable (standard attention) graphs; this bundle's "
                "shared-KV-buffer decoders run only on onnxruntime"
            )
        self.spec, self.cfg = spec, cfg
        self.trt = engine if engine is not None else TrtEngine(path, device_id=cfg.device_id)
        self.name = self.trt.path.name
        self._kv = kv_names(spec.layers)
        want = {INPUTS_EMBEDS, POSITION_IDS, *(p for *_, p, _ in self._kv)}
        outs = {LOGITS, *(o for *_, o in self._kv)}
        have_in, have_out = set(self.trt.input_names), set(self.trt.output_names)
        if have_in != want or have_out != outs:
            raise BundleError(
                f"{self.name}: not a portable decoder engine of this bundle ({spec.layers} layers): inputs "
                f"{sorted(have_in)}, outputs {sorted(have_out)}"
            )
        dt = self.trt.dtypes
        past0 = self._kv[0][2]
        self.dtype = dt[INPUTS_EMBEDS]
        self.kv_dtype, self.pos_dtype, self.logits_dtype = dt[past0], dt[POSITION_IDS], dt[LOGITS]
        self.hidden = self.trt.shape(INPUTS_EMBEDS)[-1]
        self.vocab = self.trt.shape(LOGITS)[-1]
        kv_shape = self.trt.shape(past0)
        if kv_shape[1] != spec.kv_heads or kv_shape[3] != spec.head_dim:
            raise BundleError(
                f"{self.name}: KV tensors are {list(kv_shape)}, the bundle says {spec.kv_heads} heads of "
                f"{spec.head_dim}"
            )
        lo, _, hi = self.trt.profile(INPUTS_EMBEDS)
        self.new_range = (lo[1], hi[1])
        lo, _, hi = self.trt.profile(past0)
        self.past_range = (lo[2], hi[2])
        self._lock = threading.Lock()

    @property
    def max_positions(self) -> int:
        """The most positions a request can hold: the profile's longest past plus one new token."""
        return self.past_range[1] + 1

    def _ranges(self) -> str:
        (s0, s1), (p0, p1) = self.new_range, self.past_range
        return f"{s0}..{s1} new tokens after {p0}..{p1} past ones"

    def new_state(self, capacity: int) -> DecodeState:
        if not 1 <= capacity <= self.max_positions:
            raise OptionError(
                f"{self.name}: a request of {capacity} positions is outside the engine's optimization profile "
                f"({self._ranges()}, at most {self.max_positions} positions); {REBUILD}"
            )
        kv_bytes = KVMemory.nbytes(self.spec, capacity, self.kv_dtype)
        rows = min(capacity, self.new_range[1])  # the longest step this request can take
        embeds_at = _align(kv_bytes)
        positions_at = _align(embeds_at + rows * self.hidden * self.dtype.itemsize)
        logits_at = _align(positions_at + rows * self.pos_dtype.itemsize)
        total = logits_at + self.vocab * self.logits_dtype.itemsize
        # One allocation per request: the cache (whose contents only ever come from earlier steps of this
        # request), then the inputs' staging rows and the logits row.
        memory, base = self.trt.cuda.alloc(total)
        cache = KVMemory(self.spec, capacity, self.kv_dtype, memory, base)
        logits = np.empty((1, self.vocab), dtype=np.float32)
        host = logits if self.logits_dtype == np.float32 else np.empty((1, self.vocab), dtype=self.logits_dtype)
        bindings: dict[str, Any] = {
            "embeds": base + embeds_at,
            "positions": base + positions_at,
            "logits": base + logits_at,
            "logits_host": host,
            "rows": rows,
        }
        return DecodeState(capacity=capacity, cache=cache, logits=logits, bindings=bindings)

    def _check_step(self, new: int, past: int) -> None:
        (s0, s1), (p0, p1) = self.new_range, self.past_range
        if not (s0 <= new <= s1 and p0 <= past <= p1):
            raise TrtRunError(
                f"{self.name}: a step of {new} new tokens after {past} past ones is outside the engine's "
                f"optimization profile ({self._ranges()}); {REBUILD}"
            )

    def step(self, embeds: np.ndarray, state: DecodeState) -> np.ndarray:
        if embeds.ndim != 3 or embeds.shape[0] != 1 or embeds.shape[2] != self.hidden:
            raise OptionError(f"{self.name}: embeddings must be [1, S, {self.hidden}], got {list(embeds.shape)}")
        new, past = int(embeds.shape[1]), state.length
        if state.extra_inputs is not None:  # e.g. Qwen2-VL's rotary positions: no staging built for them yet
            raise OptionError(f"{self.name}: the engine backend takes no decoder inputs beyond embeddings and slots")
        state.reserve(new)
        self._check_step(new, past)
        b = state.bindings
        if new > b["rows"]:  # reserve() and the profile check make this impossible; never write past the rows
            raise TrtRunError(f"{self.name}: {new} new tokens exceed the request's {b['rows']} staging rows")
        host = np.ascontiguousarray(embeds, dtype=self.dtype)
        positions = np.arange(past, past + new, dtype=self.pos_dtype)[None]
        cache: KVMemory = state.cache
        trt = self.trt
        with self._lock:  # the context's shapes and addresses are this step's until it is synchronized
            trt.set_input(INPUTS_EMBEDS, host.shape, b["embeds"])
            trt.set_input(POSITION_IDS, positions.shape, b["positions"])
            for layer, kind, past_name, _ in self._kv:
                ptr, shape = cache.past(layer, kind, past)
                trt.set_input(past_name, shape, ptr)
            # Outputs after every input shape is set: only then does the context know their shapes.
            for layer, kind, _, present_name in self._kv:
                ptr, shape = cache.present(layer, kind, past + new)
                trt.set_output(present_name, ptr, expect=shape)
            trt.set_output(LOGITS, b["logits"], expect=(1, self.vocab))
            trt.cuda.htod(b["embeds"], host)
            trt.cuda.htod(b["positions"], positions)
            trt.execute()
            trt.cuda.dtoh(b["logits_host"], b["logits"])
            trt.cuda.sync()
        if b["logits_host"] is not state.logits:
            state.logits[...] = b["logits_host"]
        # A failed step changes nothing: it read one side of the cache and wrote only the other.
        state.length += new
        cache.advance()
        return state.logits[0]
