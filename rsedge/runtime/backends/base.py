"""The decoder backend interface: a per-request state of a capacity, then steps of embeddings -> logits."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rsedge.errors import OptionError


@dataclass(frozen=True)
class DecoderSpec:
    """What a backend must know of the decoder graph beyond the graph itself (from the manifest)."""

    layers: int
    kv_heads: int
    head_dim: int
    # True for the fused GroupQueryAttention graphs that read and append one preallocated KV buffer per
    # layer ([1, kv, capacity, hd]); False for portable graphs (past [.., P, ..] in, present [.., P+S, ..] out).
    shared_kv: bool = False


@dataclass
class DecodeState:
    """One request's decoding state. Never shared between requests; a backend keeps none of its own.

    ``cache`` holds the backend's KV memory, ``logits`` the host buffer the last step's logits land in,
    ``bindings`` whatever the backend binds once per request (IO bindings, engine addresses).
    ``extra_inputs`` (set by the request's family, e.g. Qwen2-VL's rotary positions): ``(start, count)`` -> the
    graph's other inputs for the new tokens at cache slots ``start .. start+count-1``; None: the graph has none.
    """

    capacity: int
    cache: Any
    logits: np.ndarray
    length: int = 0
    bindings: dict[str, Any] = field(default_factory=dict)
    extra_inputs: Callable[[int, int], dict[str, np.ndarray]] | None = None

    def reserve(self, new_tokens: int) -> None:
        """Refuse a step that would overrun the cache (before anything runs)."""
        if self.length + new_tokens > self.capacity:
            raise OptionError(f"KV cache full: {self.length}+{new_tokens} tokens exceed capacity {self.capacity}")


class DecoderBackend(ABC):
    """One expert's decoder on one engine and device."""

    #: where the KV cache lives ("cpu" or "cuda"): the host never touches it per token when this is "cuda"
    memory_device: str = "cpu"
    dtype: np.dtype  # the graph's activation dtype (inputs_embeds)
    vocab: int

    @abstractmethod
    def new_state(self, capacity: int) -> DecodeState:
        """A fresh request state whose cache holds ``capacity`` positions."""

    @abstractmethod
    def step(self, embeds: np.ndarray, state: DecodeState) -> np.ndarray:
        """Run S new tokens ([1, S, H]) after ``state.length`` past ones; the last position's logits [V].

        The returned array is the state's own buffer: valid until the next step of that state.
        """
