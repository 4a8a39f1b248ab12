"""An INT8 KV cache: GroupQueryAttention's own quantized cache, with per-channel scales calibrated on RS prompts.

A decode step at depth T reads the whole cache: 24 layers x 2 x T x 128 values for the 0.5B decoder, 19 MB in
float32 at 760 positions, evicted from the caches by the weights streaming past between layers. onnxruntime's
GroupQueryAttention (CPU kernels since 1.2x, see rsedge.runtime.ort_support) keeps the cache as int8 with a
scale per channel (kv head x head dim) and dequantizes inside its dot products, so a step reads a quarter of
the bytes and the cache takes a quarter of the memory (a 32k context: 805 -> 201 MB for the 0.5B decoder, computed).

Scales: the largest |K| (after rotary, as the cache holds it) and |V| per channel over the calibration set's
prompts and answers, run through the exported decoder itself with a float cache, times HEADROOM, divided by 127
(symmetric; values beyond saturate). Per expert: each expert's MLPs shape the hidden states its attention sees.

    graph (float cache)  --run calibration embeddings-->  present K/V [L, 2, kv, T, hd]
        --max |.| over T and items--> absmax [L, 2, kv*hd] --x HEADROOM / 127--> scales
    GroupQueryAttention(..., k_scale, v_scale; k/v_quant_type PER_CHANNEL, kv_cache_bit_width 8)
    past_key_values.* / present.*: float -> int8
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rsedge.errors import OptionError
from rsedge.runtime.backends import DecoderSpec
from rsedge.runtime.backends.ort_cpu import OrtCpuDecoder
from rsedge.runtime.sessions import SessionConfig

KV_DTYPES = ("float", "int8")
INT8_MAX = 127.0
# Scales cover this much more than the calibration maxima: a static scale clips what it never saw, and a prompt
# unlike the calibration set's (the export check's random-token prompt) reaches further. Built-in model, INT4:
# 1.0 clipped that prompt to logits cosine 0.9973, 1.5 kept 0.9997 (float cache: 0.99999), 3.0 lost resolution
# (0.9988).
HEADROOM = 1.5
# A channel calibration never saw move (a constant zero) still gets a usable step.
MIN_ABSMAX = 1e-4
K_SCALE, V_SCALE = 12, 13  # GroupQueryAttention's k_scale / v_scale input slots
PAST_PREFIX = "past_key_values."


def collect_absmax(path: Path, spec: DecoderSpec, embeddings: Iterable[np.ndarray]) -> np.ndarray:
    """[layers, 2 (K, V), kv_heads * head_dim]: the largest |value| per cache channel when ``path`` (a decoder
    with a float shared cache) runs each [1, S, H] embedding sequence as one prompt."""
    if not spec.shared_kv:
        raise OptionError("an INT8 KV cache needs a fused GroupQueryAttention decoder (--attention gqa-shared)")
    dec = OrtCpuDecoder(path, spec, SessionConfig(huge_pages=False))
    if dec.kv_dtype != np.float32 and dec.kv_dtype != np.float16:
        raise OptionError(f"{path.name}: its KV cache is already {dec.kv_dtype}")
    absmax = np.zeros((spec.layers, 2, spec.kv_heads * spec.head_dim), dtype=np.float32)
    seen = 0
    for embeds in embeddings:
        n = int(embeds.shape[1])
        state = dec.new_state(n)
        dec.step(np.asarray(embeds, dtype=dec.dtype), state)
        # The shared buffer: per layer, K then V, each [1, kv, capacity, hd] (see KVMemory).
        kv = state.cache.memory.view(dec.kv_dtype).reshape(spec.layers, 2, spec.kv_heads, n, spec.head_dim)
        peak = np.abs(kv.astype(np.float32)).max(axis=3).reshape(spec.layers, 2, -1)
        np.maximum(absmax, peak, out=absmax)
        seen += 1
    if seen == 0:
        raise OptionError("INT8 KV cache calibration got no prompts")
    if not np.isfinite(absmax).all():
        raise OptionError(f"{path.name}: the float decoder gave non-finite K/V on the calibration prompts")
    return absmax


def scales_from_absmax(absmax: np.ndarray) -> np.ndarray:
    return (np.maximum(absmax, MIN_ABSMAX) * HEADROOM / INT8_MAX).astype(np.float32)


def _layer_of(node: onnx.NodeProto) -> int:
    past = node.input[3]
    if not past.startswith(PAST_PREFIX):
        raise OptionError(f"{node.name}: its past key {past!r} is not a decoder cache input")
    return int(past[len(PAST_PREFIX) :].split(".")[0])


def quantize_cache(path: Path, scales: np.ndarray) -> None:
    """Rewrite the decoder graph at ``path`` (in place; its external weights untouched) to keep an INT8 cache
    with ``scales`` [layers, 2, kv*hd]."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    done: set[int] = set()
    for node in graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        layer = _layer_of(node)
        names = [f"model.layers.{layer}.self_attn.kv_cache.{s}_scale" for s in ("k", "v")]
        for name, values in zip(names, scales[layer], strict=True):
            graph.initializer.append(numpy_helper.from_array(values.astype(np.float32), name))
        inputs = list(node.input) + [""] * max(0, V_SCALE + 1 - len(node.input))
        inputs[K_SCALE], inputs[V_SCALE] = names
        del node.input[:]
        node.input.extend(inputs)
        node.attribute.extend(
            [
                helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                helper.make_attribute("kv_cache_bit_width", 8),
            ]
        )
        done.add(layer)
    if done != set(range(scales.shape[0])):
        raise OptionError(f"{path.name}: expected GroupQueryAttention in {scales.shape[0]} layers, found {len(done)}")
    for value in [*graph.input, *graph.output]:
        if value.name.startswith(PAST_PREFIX) or value.name.startswith("present."):
            value.type.tensor_type.elem_type = TensorProto.INT8
    onnx.save(model, str(path))


def cache_spec(path: Path) -> DecoderSpec:
    """Layers, KV heads and head dim of a fused-attention decoder graph, read from its cache inputs."""
    graph = onnx.load(str(path), load_external_data=False).graph
    pasts = [v for v in graph.input if v.name.startswith(PAST_PREFIX) and v.name.endswith(".key")]
    if not pasts:
        raise OptionError(f"{path.name}: no past_key_values inputs (not a decoder graph)")
    dims = [d.dim_value for d in pasts[0].type.tensor_type.shape.dim]
    return DecoderSpec(len(pasts), dims[1], dims[3], shared_kv=True)


def quantize_decoder_caches(
    root: Path, decoder: dict[str, Any], calibration: Iterable[tuple[np.ndarray, int]]
) -> dict[str, object]:
    """Calibrate and rewrite every expert's decoder (and its prefill twin, which shares its cache) under ``root``
    to an INT8 cache; returns the manifest's record. An expert no calibration prompt was routed to takes the
    largest values seen by the others."""
    experts = {int(e): entry for e, entry in decoder["experts"].items()}
    per_expert: dict[int, list[np.ndarray]] = {e: [] for e in experts}
    for embeds, expert in calibration:
        per_expert.setdefault(int(expert), []).append(np.asarray(embeds, dtype=np.float32))
    absmax: dict[int, np.ndarray] = {}
    for e, items in per_expert.items():
        if items and e in experts:
            path = root / experts[e]["file"]
            absmax[e] = collect_absmax(path, cache_spec(path), items)
    if not absmax:
        raise OptionError("INT8 KV cache calibration got no prompts")
    union = np.max(np.stack(list(absmax.values())), axis=0)
    prompts = {e: len(per_expert.get(e, [])) for e in experts}
    for e, entry in experts.items():
        scales = scales_from_absmax(absmax.setdefault(e, union))
        for key in ("file", "prefill_file"):
            if key in entry:
                quantize_cache(root / entry[key], scales)
    return calibration_record(absmax, prompts)


QUANT_ATTRIBUTES = ("k_quant_type", "v_quant_type", "kv_cache_bit_width")


def float_cache(model: onnx.ModelProto) -> bool:
    """Turn a decoder proto's INT8 cache back into a float one (in place): the graph as it was before
    :func:`quantize_cache`, so a check of its weights alone stays exact. Returns whether anything changed."""
    graph = model.graph
    changed = False
    for node in graph.node:
        if node.op_type != "GroupQueryAttention" or not any(a.name in QUANT_ATTRIBUTES for a in node.attribute):
            continue
        keep = [a for a in node.attribute if a.name not in QUANT_ATTRIBUTES]
        del node.attribute[:]
        node.attribute.extend(keep)
        inputs = list(node.input)[:K_SCALE]
        while inputs and not inputs[-1]:
            inputs.pop()
        del node.input[:]
        node.input.extend(inputs)
        changed = True
    if changed:
        act = next(v.type.tensor_type.elem_type for v in graph.input if v.name == "inputs_embeds")
        for value in [*graph.input, *graph.output]:
            if value.name.startswith(PAST_PREFIX) or value.name.startswith("present."):
                value.type.tensor_type.elem_type = act
    return changed


def calibration_record(absmax: dict[int, np.ndarray], prompts: dict[int, int]) -> dict[str, object]:
    """The manifest's account of the cache: dtype, scale kind, and what calibrated each expert."""
    return {
        "dtype": "int8",
        "scales": "per-channel symmetric: max |K| (after rotary), |V| over the calibration prompts x headroom / 127",
        "headroom": HEADROOM,
        "per_expert": {
            str(e): {"prompts": prompts[e], "max_abs_k": float(a[:, 0].max()), "max_abs_v": float(a[:, 1].max())}
            for e, a in sorted(absmax.items())
        },
    }
