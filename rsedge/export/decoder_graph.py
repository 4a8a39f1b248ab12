"""The Qwen2 G-MoE decoder as one dense ONNX graph per expert, built from numpy weights.

``decoder_expert{e}.onnx`` runs on ``inputs_embeds`` with an explicit KV cache. Attention, norms and
lm_head live in ``decoder_shared.bin``, read by every expert's graph; expert e's MLPs live in
``decoder_expert{e}.bin``.
There is no If node, so every quantizer and TensorRT take the graph, and a runtime loads only the experts a
mission uses.

I/O (B batch, S new tokens, P past tokens, kv key/value heads, hd head_dim, V vocab):

    inputs_embeds                 [B, S, H]       model dtype
    position_ids                  [B, S]          int64 (the cache slots the new tokens take)
    rope_position_ids             [3, B, S]       int64 (mrope specs only: temporal/height/width rotary positions)
    past_key_values.{i}.key|value [B, kv, P, hd]  model dtype (P may be 0: prefill)
    -> logits                     [B, V]          float32, last position only
    -> present.{i}.key|value      [B, kv, P+S, hd] model dtype (= Concat(past, new) on axis 2)

RMSNorm, RoPE and the softmax run in float32 in a float16 graph, as Qwen2 does (RMSNorm, softmax) or better.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from rsedge.errors import OptionError
from rsedge.export.decoder_spec import DecoderSpec, qwen2_experts
from rsedge.export.onnx_builder import OPSET, GraphBuilder, QuantPlanLike, get_weight
from rsedge.export.weight_store import WeightRecord, WeightStore
from rsedge.models.dimensions import TextConfig
from rsedge.models.rsunivlm.config import RSUniVLMConfig

DECODER_SHARED_BIN = "decoder_shared.bin"
# "gqa-shared": the same fused attention with past and present in ONE preallocated buffer per layer
# ([B, kv, capacity, hd]); the kernel writes only the new tokens instead of copying the whole cache.
ATTENTION_IMPLS = ("standard", "gqa", "gqa-shared", "scatter-shared")
# Forms whose past and present are one preallocated [B, kv, capacity, hd] buffer per layer and kind, bound as
# both: "scatter-shared" writes the new rows with ScatterElements (onnxruntime runs it in place when input and
# output are one buffer) and attends over the whole buffer with plain MatMuls and a mask of the positions.
SHARED_KV = ("gqa-shared", "scatter-shared")
CAPACITY = "kv_capacity"
# Rows of GroupQueryAttention's cos/sin tables: the longest prompt + answer such a bundle takes (a pair of
# anyres images stays well inside). The manifest records it and the runtime refuses longer requests.
ROPE_CACHE_POSITIONS = 8192
EMBED_TOKENS = "model.embed_tokens.weight"
LM_HEAD_T = "lm_head.weight.t"  # the quantized head's [H, V] weight, whether or not the checkpoint ties it
INPUTS_EMBEDS = "inputs_embeds"
POSITION_IDS = "position_ids"
ROPE_POSITION_IDS = "rope_position_ids"  # mrope: the rotary positions, which differ from the cache slots
LOGITS = "logits"

# Symbolic dimension names of the graph I/O.
BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"


def max_positions(cfg: RSUniVLMConfig | TextConfig | DecoderSpec) -> int:
    """The longest prompt + answer a bundle serves, either attention form: the manifest's ``max_positions``.

    Fused graphs: the rows of their rotary tables. Portable graphs: a decoder call computes its attention
    scores whole, 4 bytes per (query, key, head), and onnxruntime holds Softmax's input and output at once,
    so a prompt prefilled in one call of S tokens holds ~8 x heads x S^2 bytes of scores (Qwen2-0.5B, 14
    heads: 7.5 GB at 8192, 120 GB at the 32768 of ``max_position_embeddings``). The same bound keeps that
    within a workstation's memory; a runtime that prefills in chunks of C tokens needs 8 x heads x C x T.
    """
    return min(ROPE_CACHE_POSITIONS, _text(cfg).max_position_embeddings)


def expert_bin(expert: int) -> str:
    return f"decoder_expert{expert}.bin"


def expert_onnx(expert: int) -> str:
    return f"decoder_expert{expert}.onnx"


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"


def decoder_input_names(num_layers: int, mrope: bool = False) -> list[str]:
    rope = [ROPE_POSITION_IDS] if mrope else []
    return [INPUTS_EMBEDS, POSITION_IDS, *rope, *(n for i in range(num_layers) for n in past_names(i))]


def decoder_output_names(num_layers: int) -> list[str]:
    return [LOGITS, *(n for i in range(num_layers) for n in present_names(i))]


def _text(cfg: RSUniVLMConfig | TextConfig | DecoderSpec) -> TextConfig:
    return cfg.text if isinstance(cfg, RSUniVLMConfig | DecoderSpec) else cfg


def as_spec(cfg: RSUniVLMConfig | TextConfig | DecoderSpec) -> DecoderSpec:
    """A spec as given, else RSUniVLM's (Qwen2 with experts): what a config or text config means here."""
    return cfg if isinstance(cfg, DecoderSpec) else qwen2_experts(_text(cfg))


def store_embedding_table(
    cfg: RSUniVLMConfig | TextConfig, weights: Mapping[str, np.ndarray], store: WeightStore, dtype: str
) -> WeightRecord:
    """Store ``model.embed_tokens.weight`` [V,H] in ``decoder_shared.bin`` and say where it lies.

    It is the same entry a tied decoder reads as lm_head, so a tied model stores the table once.
    """
    text = _text(cfg)
    b = GraphBuilder("embed", store, dtype, DECODER_SHARED_BIN)
    emb = get_weight(weights, EMBED_TOKENS, (text.vocab_size, text.hidden_size))
    b.weight(EMBED_TOKENS, emb)
    return store.record(EMBED_TOKENS, DECODER_SHARED_BIN)


def quantize_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric INT8 of an embedding table: the runtime dequantizes only the rows it looks up."""
    scales = np.abs(table).max(axis=1) / 127.0
    scales[scales == 0] = 1.0
    q = np.clip(np.rint(table / scales[:, None]), -127, 127).astype(np.int8)
    return q, scales.astype(np.float32)


def store_embedding_arrays(
    cfg: RSUniVLMConfig | TextConfig | DecoderSpec,
    weights: Mapping[str, np.ndarray],
    store: WeightStore,
    dtype: str | type,
    int8_rows: bool,
) -> dict[str, dict]:
    """The manifest's ``arrays`` entries of the embedding table, stored in ``decoder_shared.bin``: per-row INT8
    codes and scales (a quantized bundle's ``int8-rows``), or the table in the model dtype."""
    if not int8_rows:
        return {"embed_tokens": store_embedding_table(cfg, weights, store, dtype)._asdict()}
    q, scales = quantize_rows(weights[EMBED_TOKENS])
    store.cache[("embed_rows",)] = (q, scales)  # validation reads the codes the runtime will
    store.tensor(f"{EMBED_TOKENS}.int8", q, file=DECODER_SHARED_BIN)
    store.tensor(f"{EMBED_TOKENS}.scales", scales, file=DECODER_SHARED_BIN)
    return {
        "embed_tokens": store.record(f"{EMBED_TOKENS}.int8", DECODER_SHARED_BIN)._asdict(),
        "embed_scales": store.record(f"{EMBED_TOKENS}.scales", DECODER_SHARED_BIN)._asdict(),
    }


def decoder_record(
    cfg: RSUniVLMConfig | TextConfig | DecoderSpec, experts: dict[str, Any], attention: str
) -> dict[str, Any]:
    """The manifest's ``graphs.decoder`` entry for ``experts`` (key -> file and io record) built in ``attention``."""
    return {
        "experts": experts,
        "attention": attention,
        "max_positions": max_positions(cfg),  # portable graphs too: their prefill's scores grow with its square
        "kv_layout": "[batch, kv_heads, seq, head_dim]",
        # "shared": past and present are one [B, kv, capacity, hd] buffer per layer and kind, bound as both;
        # "past-present": present = past + the new rows, a second buffer (the runtime ping-pongs two)
        "kv_cache": "shared" if attention in SHARED_KV else "past-present",
        "logits": "last position only",
    }


def build_decoder_graph(
    cfg: RSUniVLMConfig | TextConfig | DecoderSpec,
    weights: Mapping[str, np.ndarray],
    expert: int,
    store: WeightStore,
    dtype: str = "float32",
    quant: QuantPlanLike | None = None,
    opset: int = OPSET,
    attention: str = "standard",
) -> onnx.ModelProto:
    """The decoder with every layer's MLP set to expert ``expert``; weights go to ``store``.

    ``cfg``: a :class:`DecoderSpec` (which family of decoder: biases, MLP names, experts), or an RSUniVLM
    config / text config, which mean RSUniVLM's Qwen2 with experts.

    ``quant`` gives each weight's quantization (None: everything stays in the model dtype). ``attention`` is
    "standard" (portable ONNX ops, TensorRT), "gqa" / "gqa-shared" (onnxruntime's fused GroupQueryAttention with
    rotary, past and present apart or one shared buffer: the onnxruntime-only forms) or "scatter-shared" (one
    shared buffer written with ScatterElements, plain MatMul attention over it, onnxruntime's RotaryEmbedding).
    """
    if attention not in ATTENTION_IMPLS:
        raise OptionError(f"attention must be one of {', '.join(ATTENTION_IMPLS)}, got {attention!r}")
    spec = as_spec(cfg)
    text = spec.text
    if not 0 <= expert < text.num_experts:
        raise OptionError(f"expert {expert} is out of range 0..{text.num_experts - 1}")
    if text.num_attention_heads % text.num_key_value_heads:
        raise OptionError("num_attention_heads must be a multiple of num_key_value_heads")
    b = GraphBuilder(f"rsunivlm_decoder_expert{expert}", store, dtype, DECODER_SHARED_BIN, quant, opset)
    H, kv, hd, L = text.hidden_size, text.num_key_value_heads, text.head_dim, text.num_hidden_layers

    x = b.input(INPUTS_EMBEDS, b.elem_type, [BATCH, SEQ, H])
    pos = b.input(POSITION_IDS, TensorProto.INT64, [BATCH, SEQ])
    mrope = spec.rope == "mrope"
    # mrope: rotary positions apart from the slots (an image's tokens share positions); every form rotates q and
    # k itself from them (onnxruntime's fused rotary kernels index one position per token)
    rope_pos = b.input(ROPE_POSITION_IDS, TensorProto.INT64, [3, BATCH, SEQ]) if mrope else None
    shared = attention in SHARED_KV
    past_len = CAPACITY if shared else PAST
    pasts = [tuple(b.input(n, b.elem_type, [BATCH, kv, past_len, hd]) for n in past_names(i)) for i in range(L)]

    with b.scope("model"):
        if attention == "scatter-shared":
            if mrope:
                with b.scope("rotary_emb"):
                    rope = _mrope_tables(b, rope_pos, spec, q_scale=1.0)
            else:
                rope = _rope_caches(b, text)
            with b.scope("attn_mask"):
                mask = _position_mask(b, pos, pasts[0][0], kv, text.num_attention_heads // kv)
            ctx = {"rope": rope, "mask": mask, "positions": pos}
        elif attention != "standard":
            with b.scope("attn_lengths"):
                ctx = _gqa_inputs(b, x, pos if shared else pasts[0][0], text, shared, rotary_caches=not mrope)
            if mrope:
                with b.scope("rotary_emb"):
                    ctx["rope"] = _mrope_tables(b, rope_pos, spec, q_scale=1.0, heads_axis=2)
        else:
            with b.scope("rotary_emb"):
                rope = _mrope_tables(b, rope_pos, spec) if mrope else _rotary_tables(b, pos, text)
            with b.scope("attn_mask"):
                mask = _causal_mask(b, x, pasts[0][0], kv, text.num_attention_heads // kv)
            ctx = {"rope": rope, "mask": mask}
        presents = []
        pending: str | None = None  # fused graphs: the MLP output whose residual Add joins the next norm
        for i in range(L):
            with b.scope(f"layers.{i}"):
                x, pending, present = _decoder_layer(b, x, pending, pasts[i], ctx, weights, spec, i, expert, attention)
            presents.append(present)
        if pending is not None:
            x = b.op("Add", [x, pending], name="residual_mlp/Add", out="hidden")
        logits = _lm_head(b, x, weights, text)

    b.output(logits, LOGITS, TensorProto.FLOAT, [BATCH, text.vocab_size])
    for i, (k, v) in enumerate(presents):
        for value, name in zip((k, v), present_names(i), strict=True):
            b.output(value, name, b.elem_type, [BATCH, kv, CAPACITY if shared else TOTAL, hd])

    doc = (
        f"{spec.name} decoder, expert {expert} of {text.num_experts}, {b.dtype.name}, opset {opset}. "
        f"inputs: inputs_embeds[B,S,{H}], position_ids[B,S] int64, past_key_values.{{0..{L - 1}}}.key|value"
        f"[B,{kv},P,{hd}]; outputs: logits[B,{text.vocab_size}] float32 (last position), "
        f"present.{{i}}.key|value[B,{kv},P+S,{hd}]."
    )
    meta = {
        "rsedge.graph": "decoder",
        "rsedge.expert": str(expert),
        "rsedge.attention": attention,
        "rsedge.dtype": b.dtype.name,
        "rsedge.text_config": json.dumps(asdict(text), sort_keys=True),
        "rsedge.weight_files": json.dumps([store.file_name(DECODER_SHARED_BIN), store.file_name(expert_bin(expert))]),
    }
    if mrope:
        doc += f" mrope: rope_position_ids[3,B,S] int64, sections {list(spec.mrope_section)}."
        meta["rsedge.mrope_section"] = json.dumps(list(spec.mrope_section))
    return b.make_model(doc, meta)


#   position_ids [B,S] --Cast f32--Unsqueeze(-1)--Mul(inv_freq [hd/2])--> freqs [B,S,hd/2]
#   Concat(freqs, freqs) --> emb [B,S,hd] --Cos / Sin--Unsqueeze(1)--> cos, sin [B,1,S,hd]
#   cos_q = cos * hd^-0.5, sin_q = sin * hd^-0.5   (the attention scale, folded into q's rotation)
def _rotary_tables(b: GraphBuilder, pos: str, text: TextConfig) -> dict[str, str]:
    hd = text.head_dim
    inv_freq = 1.0 / (text.rope_theta ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd))
    p = b.op("Cast", [pos], out="position_f", to=TensorProto.FLOAT)
    p = b.op("Unsqueeze", [p, b.ints([-1], "axes_last")], out="position_f_col")
    freqs = b.op("Mul", [p, b.const(inv_freq.astype(np.float32), np.float32, "rope_inv_freq")], out="freqs")
    emb = b.op("Concat", [freqs, freqs], out="emb", axis=-1)
    axis1 = b.ints([1], "axes_1")
    cos = b.op("Unsqueeze", [b.op("Cos", [emb], out="cos_bsd"), axis1], out="cos")
    sin = b.op("Unsqueeze", [b.op("Sin", [emb], out="sin_bsd"), axis1], out="sin")
    scale = b.scalar(hd**-0.5, "attn_scale", np.float32)
    cos_q = b.op("Mul", [cos, scale], name="Mul_cos_scale", out="cos_q")
    sin_q = b.op("Mul", [sin, scale], name="Mul_sin_scale", out="sin_q")
    return {"cos": cos, "sin": sin, "cos_q": cos_q, "sin_q": sin_q}


def mrope_inv_freq(spec: DecoderSpec) -> np.ndarray:
    """[3, hd/2] float32: inv_freq where frequency j follows axis c (temporal, height, width) of
    ``mrope_section``, 0 elsewhere, so positions [.., 3] @ table = each frequency's own axis's angle."""
    hd = spec.text.head_dim
    inv_freq = 1.0 / (spec.text.rope_theta ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd))
    table = np.zeros((3, hd // 2), dtype=np.float32)
    start = 0
    for axis, width in enumerate(spec.mrope_section):
        table[axis, start : start + width] = inv_freq[start : start + width]
        start += width
    return table


#   rope_position_ids [3,B,S] --Cast f32--Transpose--> [B,S,3] --MatMul(section-masked inv_freq [3, hd/2])-->
#   freqs [B,S,hd/2] (each product plus two exact zeros: transformers' position * inv_freq, to the bit)
#   Concat(freqs, freqs) --> emb [B,S,hd] --Cos / Sin--Unsqueeze(heads_axis)--> cos, sin [B,1,S,hd] or [B,S,1,hd]
#   cos_q, sin_q = cos, sin * q_scale (the attention scale where q's weights do not carry it)
def _mrope_tables(
    b: GraphBuilder, rope_pos: str, spec: DecoderSpec, q_scale: float | None = None, heads_axis: int = 1
) -> dict[str, str]:
    hd = spec.text.head_dim
    p = b.op("Cast", [rope_pos], out="rope_position_f", to=TensorProto.FLOAT)
    p = b.op("Transpose", [p], out="rope_position_bs3", perm=[1, 2, 0])
    freqs = b.op("MatMul", [p, b.const(mrope_inv_freq(spec), np.float32, "mrope_inv_freq")], out="freqs")
    emb = b.op("Concat", [freqs, freqs], out="emb", axis=-1)
    axis = b.ints([heads_axis], "axes_heads")
    cos = b.op("Unsqueeze", [b.op("Cos", [emb], out="cos_bsd"), axis], out="cos")
    sin = b.op("Unsqueeze", [b.op("Sin", [emb], out="sin_bsd"), axis], out="sin")
    scale = float(hd**-0.5) if q_scale is None else q_scale
    if scale == 1.0:
        return {"cos": cos, "sin": sin, "cos_q": cos, "sin_q": sin}
    scale_c = b.scalar(scale, "attn_scale", np.float32)
    cos_q = b.op("Mul", [cos, scale_c], name="Mul_cos_scale", out="cos_q")
    sin_q = b.op("Mul", [sin, scale_c], name="Mul_sin_scale", out="sin_q")
    return {"cos": cos, "sin": sin, "cos_q": cos_q, "sin_q": sin_q}


#   S = shape(inputs_embeds)[1], P = shape(past_key_values.0.key)[2], T = P + S
#   q_pos = Range(P, T) [S], k_pos = Range(0, T) [T]
#   Less(q_pos[:,None], k_pos[None,:]) --Where(min_f32, 0)--> mask [S, T] f32, built once, read by every layer
#   by_head = [0, kv, group, -1, T], by_group = [0, kv, -1, T]: Reshape targets that view a query group's scores
#   [B, kv, group*S, T] as [B, kv, group, S, T] and back (rows of a group are head-major: row r is head r // S,
#   query r % S), so the one [S, T] mask broadcasts over batch, kv heads and group. Nothing of heads x S x T is
#   built for the mask (a Tile to [group*S, T] was 7x it). The layers Add it: onnxruntime runs that Add in place
#   on the scores and the Reshapes as views (a Where on the scores cost one more scores-sized buffer, measured).
def _causal_mask(b: GraphBuilder, embeds: str, past_key0: str, kv: int, group: int) -> dict[str, str]:
    s = b.op("Shape", [embeds], out="seq_len", start=1, end=2)
    p = b.op("Shape", [past_key0], out="past_len", start=2, end=3)
    t = b.op("Add", [p, s], out="total_len")
    zero_d = b.ints([0], "axes_0")
    p0 = b.op("Squeeze", [p, zero_d], out="past_len_scalar")
    t0 = b.op("Squeeze", [t, zero_d], out="total_len_scalar")
    one, zero = b.const(1, np.int64, "one_i64"), b.const(0, np.int64, "zero_i64")
    q_pos = b.op("Range", [p0, t0, one], name="Range_q", out="q_pos")
    k_pos = b.op("Range", [zero, t0, one], name="Range_k", out="k_pos")
    q_col = b.op("Unsqueeze", [q_pos, b.ints([1], "axes_1")], out="q_pos_col")
    k_row = b.op("Unsqueeze", [k_pos, zero_d], out="k_pos_row")
    future = b.op("Less", [q_col, k_row], out="future")
    neg = b.scalar(float(np.finfo(np.float32).min), "mask_min", np.float32)
    mask = b.op("Where", [future, neg, b.scalar(0.0, "zero_f32", np.float32)], out="mask")
    by_head = b.op("Concat", [b.ints([0, kv, group, -1], "by_head_prefix"), t], out="scores_by_head_shape", axis=0)
    by_group = b.op("Concat", [b.ints([0, kv, -1], "by_group_prefix"), t], out="scores_by_group_shape", axis=0)
    return {"mask": mask, "by_head": by_head, "by_group": by_group}


#   position_ids [B,S] -> q_pos [S] (row 0), k_pos = Range(0, C) over the buffer's capacity C
#   Less(q_pos[:,None], k_pos[None,:]) --Where(min_f32, 0)--> mask [S, C]: a query sees the positions up to its
#   own, so the rows not yet written (and any stale ones) beyond it are masked; by_head/by_group as below.
#   scatter_rows [B,1,S,1] = position_ids: where each new K/V row goes (Expand to [B,kv,S,hd] per layer)
def _position_mask(b: GraphBuilder, pos: str, past_key0: str, kv: int, group: int) -> dict[str, str]:
    c = b.op("Shape", [past_key0], out="capacity", start=2, end=3)
    zero_d = b.ints([0], "axes_0")
    c0 = b.op("Squeeze", [c, zero_d], out="capacity_scalar")
    q_pos = b.op("Gather", [pos, b.const(0, np.int64, "row_0")], out="q_pos", axis=0)
    k_pos = b.op("Range", [b.const(0, np.int64, "zero_i64"), c0, b.const(1, np.int64, "one_i64")], out="k_pos")
    q_col = b.op("Unsqueeze", [q_pos, b.ints([1], "axes_1")], out="q_pos_col")
    k_row = b.op("Unsqueeze", [k_pos, zero_d], out="k_pos_row")
    future = b.op("Less", [q_col, k_row], out="future")
    neg = b.scalar(float(np.finfo(np.float32).min), "mask_min", np.float32)
    mask = b.op("Where", [future, neg, b.scalar(0.0, "zero_f32", np.float32)], out="mask")
    by_head = b.op("Concat", [b.ints([0, kv, group, -1], "by_head_prefix"), c], out="scores_by_head_shape", axis=0)
    by_group = b.op("Concat", [b.ints([0, kv, -1], "by_group_prefix"), c], out="scores_by_group_shape", axis=0)
    rows = b.op("Unsqueeze", [pos, b.ints([1, 3], "axes_1_3")], out="scatter_rows")
    return {"mask": mask, "by_head": by_head, "by_group": by_group, "scatter_rows": rows}


#   x --RMSNorm--> --Attention--> + x --RMSNorm--> --MLP[expert]--> + --> out
#                    |  past_k/v in, present_k/v out
#   Fused-attention graphs (onnxruntime only) also fuse each residual Add into the RMSNorm after it
#   (SkipSimplifiedLayerNormalization) and return the MLP output as ``pending`` for the next layer's norm.
def _decoder_layer(
    b: GraphBuilder,
    x: str,
    pending: str | None,
    past: tuple[str, str],
    ctx: dict[str, object],
    weights: Mapping[str, np.ndarray],
    spec: DecoderSpec,
    i: int,
    expert: int,
    attention: str,
) -> tuple[str, str | None, tuple[str, str]]:
    text = spec.text
    pre = f"model.layers.{i}"
    fused = attention != "standard"
    with b.scope("input_layernorm"):
        if pending is None:
            h = _rms_norm(b, x, f"{pre}.input_layernorm.weight", weights, text)
        else:
            h, x = _skip_rms_norm(b, x, pending, f"{pre}.input_layernorm.weight", weights, text)
    with b.scope("attn"):
        if attention == "scatter-shared":
            h, present = _attention(b, h, past, ctx["rope"], ctx["mask"], weights, spec, i, ctx["positions"])
        elif fused:
            h, present = _attention_gqa(b, h, past, ctx, weights, spec, i)
        else:
            h, present = _attention(b, h, past, ctx["rope"], ctx["mask"], weights, spec, i)
    with b.scope("post_attention_layernorm"):
        if fused:
            normed, x = _skip_rms_norm(b, x, h, f"{pre}.post_attention_layernorm.weight", weights, text)
        else:
            x = b.op("Add", [x, h], name="residual_attn/Add", out="residual_attn")
            normed = _rms_norm(b, x, f"{pre}.post_attention_layernorm.weight", weights, text)
    with b.scope("mlp"):
        h = _mlp(b, normed, weights, spec, i, expert)
    if fused:
        return x, h, present
    return b.op("Add", [x, h], name="residual_mlp/Add", out="hidden"), None, present


#   (x + skip) --RMSNorm * weight--> normed;  also returns x + skip, the residual stream
def _skip_rms_norm(
    b: GraphBuilder, x: str, skip: str, wname: str, weights: Mapping[str, np.ndarray], text: TextConfig
) -> tuple[str, str]:
    w = b.weight(wname, get_weight(weights, wname, (text.hidden_size,)))
    normed, _, _, summed = b.op(
        "SkipSimplifiedLayerNormalization",
        [x, skip, w],
        out=["output", "", "", "residual"],
        n_out=4,
        domain="com.microsoft",
        epsilon=float(text.rms_norm_eps),
    )
    return normed, summed


#   x --Cast f32--> Pow 2 --ReduceMean(-1)--Add eps--Sqrt--> rms;  x_f32 / rms --Cast model--> * weight
#   (Qwen2RMSNorm; ORT fuses the chain into SimplifiedLayerNormalization)
def _rms_norm(b: GraphBuilder, x: str, wname: str, weights: Mapping[str, np.ndarray], text: TextConfig) -> str:
    w = b.weight(wname, get_weight(weights, wname, (text.hidden_size,)))
    xf = b.to_float(x)
    sq = b.op("Pow", [xf, b.scalar(2.0, "two_f32", np.float32)], out="squared")
    var = b.reduce_mean(sq, [-1], out="variance")
    var = b.op("Add", [var, b.scalar(text.rms_norm_eps, "rms_norm_eps", np.float32)], out="variance_eps")
    rms = b.op("Sqrt", [var], out="rms")
    normed = b.to_model(b.op("Div", [xf, rms], out="normalized"))
    return b.op("Mul", [normed, w], name="Mul_weight", out="output")


#   x --MatMul W_qkv [H,(nh+2kv)hd] + b--> Split --> q, k, v --Reshape/Transpose--> [B,heads,S,hd]
#   q, k --RoPE (f32; q also scaled)--> ; present_k/v = Concat(past_k/v, k/v, axis 2)  [B,kv,T,hd]
#   q --Reshape [B,kv,g*S,hd]--MatMul(present_k^T)--> scores [B,kv,g*S,T] (a group's g query heads stacked on
#   one K/V head, never repeated; one GEMM per KV head, which a decode step needs) --Cast f32--Reshape
#   [B,kv,g,S,T]--+mask [S,T]--Softmax--Reshape [B,kv,g*S,T]--Cast model--MatMul(present_v)--> [B,kv,g*S,hd]
#   --Reshape [B,nh,S,hd]--Transpose--Reshape [B,S,nh*hd]--MatMul W_o--> out
#   The scores are 4 bytes per (query, key, head): S x T per head is inherent to a prefill of S tokens in one
#   call. onnxruntime holds two such tensors at once (Softmax's input and output), ~8 x nh x S x T bytes;
#   a caller bounds it by prefilling in chunks of S (the graph takes any past length P).
def _attention(
    b: GraphBuilder,
    x: str,
    past: tuple[str, str],
    rope: dict[str, str],
    mask: dict[str, str],
    weights: Mapping[str, np.ndarray],
    spec: DecoderSpec,
    i: int,
    positions: str | None = None,
) -> tuple[str, tuple[str, str]]:
    """Portable attention; with ``positions`` (the scatter-shared form) the new K/V rows are written into the
    capacity-long past buffers at those positions instead of concatenated after the past."""
    text = spec.text
    nh, kv, hd = text.num_attention_heads, text.num_key_value_heads, text.head_dim
    pre = f"model.layers.{i}.self_attn"
    # scatter-shared: the attention scale lives in q's weights and onnxruntime's RotaryEmbedding rotates q and
    # k in one kernel each (the portable graphs rotate with ~8 standard ops per tensor, which TensorRT fuses)
    qkv = _qkv_projection(b, x, weights, spec, pre, q_scale=float(hd**-0.5) if positions is not None else 1.0)
    splits = b.ints([nh * hd, kv * hd, kv * hd], "qkv_split")
    q, k, v = b.op("Split", [qkv, splits], out=["q_flat", "k_flat", "v_flat"], n_out=3, axis=-1)
    own_rotary = positions is None or spec.rope == "mrope"  # mrope: its tables, not RotaryEmbedding's caches
    if not own_rotary:
        q, k = (
            b.op("RotaryEmbedding", [t, positions, rope["cos"], rope["sin"]], name=f"{t_name}/RotaryEmbedding",
                 out=f"{t_name}_rotated", domain="com.microsoft", num_heads=heads, interleaved=0)
            for t, t_name, heads in ((q, "q", nh), (k, "k", kv))
        )  # fmt: skip
    perm = [0, 2, 1, 3]
    q = b.op("Reshape", [q, b.ints([0, 0, nh, hd], "q_heads_shape")], name="q/Reshape", out="q_bshd")
    q = b.op("Transpose", [q], name="q/Transpose", out="q", perm=perm)
    k = b.op("Reshape", [k, b.ints([0, 0, kv, hd], "kv_heads_shape")], name="k/Reshape", out="k_bshd")
    k = b.op("Transpose", [k], name="k/Transpose", out="k", perm=perm)
    v = b.op("Reshape", [v, b.ints([0, 0, kv, hd], "kv_heads_shape")], name="v/Reshape", out="v_bshd")
    v = b.op("Transpose", [v], name="v/Transpose", out="v", perm=perm)

    if own_rotary:
        with b.scope("q_rotary"):
            q = _apply_rotary(b, q, rope["cos_q"], rope["sin_q"], hd)
        with b.scope("k_rotary"):
            k = _apply_rotary(b, k, rope["cos"], rope["sin"], hd)

    if positions is None:
        present_k = b.op("Concat", [past[0], k], name="present_key/Concat", out="present_key", axis=2)
        present_v = b.op("Concat", [past[1], v], name="present_value/Concat", out="present_value", axis=2)
    else:
        rows = b.op("Expand", [mask["scatter_rows"], b.op("Shape", [k], out="kv_new_shape")], out="kv_rows")
        present_k = b.op("ScatterElements", [past[0], rows, k], name="present_key/Scatter", out="present_key", axis=2)
        present_v = b.op(
            "ScatterElements", [past[1], rows, v], name="present_value/Scatter", out="present_value", axis=2
        )

    qg = b.op("Reshape", [q, b.ints([0, kv, -1, hd], "q_grouped_shape")], name="q_grouped/Reshape", out="q_grouped")
    kt = b.op("Transpose", [present_k], name="key_t/Transpose", out="key_t", perm=[0, 1, 3, 2])
    scores = b.op("MatMul", [qg, kt], name="scores/MatMul", out="scores")
    scores = b.op("Reshape", [b.to_float(scores), mask["by_head"]], name="scores/Reshape", out="scores_by_head")
    scores = b.op("Add", [scores, mask["mask"]], name="scores_masked/Add", out="scores_masked")
    probs = b.op("Reshape", [b.op("Softmax", [scores], out="probs", axis=-1), mask["by_group"]], out="probs_grouped")
    ctx = b.op("MatMul", [b.to_model(probs), present_v], name="context/MatMul", out="context_grouped")
    ctx = b.op("Reshape", [ctx, b.ints([0, nh, -1, hd], "heads_shape")], name="context/Reshape", out="context_heads")
    ctx = b.op("Transpose", [ctx], name="context/Transpose", out="context_bshd", perm=perm)
    ctx = b.op(
        "Reshape",
        [ctx, b.ints([0, 0, nh * hd], "merge_heads_shape")],
        name="context/Reshape_1",
        out="context",
    )

    return _o_projection(b, ctx, weights, text, pre), (present_k, present_v)


#   x [B,h,S,hd] --Cast f32--> x*cos + rotate_half(x)*sin --Cast model-->
#   rotate_half(x) = Concat(-x[..., hd/2:], x[..., :hd/2])
#   total = P + S (int32 scalar), seqlens_k = total - 1 per batch row: GroupQueryAttention's view of the cache;
#   cos/sin [positions, hd/2] tables for its built-in rotary (rotate-half, Qwen2's convention)
def _gqa_inputs(
    b: GraphBuilder, x: str, past_src: str, text: TextConfig, shared: bool, rotary_caches: bool = True
) -> dict[str, object]:
    s = b.op("Shape", [x], out="seq_len", start=1, end=2)
    if shared:  # the buffer's length is its capacity: the past length is the first new token's position
        first = b.op(
            "Slice",
            [past_src, b.ints([0, 0], "zeros_2"), b.ints([1, 1], "ones_2"), b.ints([0, 1], "axes_01")],
            out="first_position",
        )
        p = b.op("Reshape", [first, b.ints([1], "shape_1")], out="past_len")
    else:
        p = b.op("Shape", [past_src], out="past_len", start=2, end=3)
    total = b.op("Cast", [b.op("Add", [p, s], out="total_len")], out="total_len_i32", to=TensorProto.INT32)
    total_scalar = b.op("Squeeze", [total, b.ints([0], "axes_0")], out="total_len_scalar")
    seqlens = b.op("Sub", [total, b.const([1], np.int32, "one_i32")], out="seqlens_k_1")
    batch = b.op("Shape", [x], out="batch", start=0, end=1)
    seqlens = b.op("Expand", [seqlens, batch], out="seqlens_k")
    return {"seqlens_k": seqlens, "total": total_scalar, **(_rope_caches(b, text) if rotary_caches else {})}


#   cos/sin [positions, hd/2] tables (rotate-half, Qwen2's convention) for onnxruntime's rotary kernels
def _rope_caches(b: GraphBuilder, text: TextConfig) -> dict[str, str]:
    hd = text.head_dim
    rows = min(ROPE_CACHE_POSITIONS, text.max_position_embeddings)
    inv_freq = 1.0 / (text.rope_theta ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float64) / hd))
    freqs = np.outer(np.arange(rows, dtype=np.float64), inv_freq)
    cos = b.weight("model.rotary_emb.cos_cache", lambda: np.cos(freqs).astype(np.float32))
    sin = b.weight("model.rotary_emb.sin_cache", lambda: np.sin(freqs).astype(np.float32))
    return {"cos": cos, "sin": sin}


#   x --MatMul W_qkv [H,(nh+2kv)hd] (q, k, v weights side by side) + bias--> packed qkv
#   (MatMulNBits takes the bias as an input: one node). ``q_scale`` multiplies q's weights and bias.
def _qkv_projection(
    b: GraphBuilder, x: str, weights: Mapping[str, np.ndarray], spec: DecoderSpec, pre: str, q_scale: float = 1.0
) -> str:
    text = spec.text
    H, nh, kv, hd = text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.head_dim
    factors = (("q", nh, q_scale), ("k", kv, 1.0), ("v", kv, 1.0))

    def qkv_weight() -> np.ndarray:
        ws = [get_weight(weights, f"{pre}.{p}_proj.weight", (n * hd, H)) * f for p, n, f in factors]
        return np.concatenate([w.T for w in ws], axis=1).astype(np.float32)

    def qkv_bias() -> np.ndarray:
        bs = [get_weight(weights, f"{pre}.{p}_proj.bias", (n * hd,)) * f for p, n, f in factors]
        return np.concatenate(bs).astype(np.float32)

    name = f"{pre}.qkv_proj.weight_t"
    if q_scale != 1.0:  # validation gives the reference these weights: it must know q's factor
        b.store.cache[("q_scale", name)] = q_scale
    with b.scope("qkv_proj"):
        bias = (f"{pre}.qkv_proj.bias", qkv_bias) if spec.qkv_bias else None
        return b.linear(x, name, qkv_weight, out="qkv", bias=bias)


#   x --MatMul W_qkv + b--> packed qkv [B,S,(nh+2kv)hd] --GroupQueryAttention(past_k/v, seqlens, rotary)-->
#   [B,S,nh*hd] --MatMul W_o--> out;  present_k/v [B,kv,P+S,hd]
def _attention_gqa(
    b: GraphBuilder,
    x: str,
    past: tuple[str, str],
    ctx: dict[str, object],
    weights: Mapping[str, np.ndarray],
    spec: DecoderSpec,
    i: int,
) -> tuple[str, tuple[str, str]]:
    text = spec.text
    nh, kv, hd = text.num_attention_heads, text.num_key_value_heads, text.head_dim
    pre = f"model.layers.{i}.self_attn"
    # The attention scale lives in q's weights and the kernel runs with scale 1: onnxruntime's CPU kernel
    # takes MLAS's unpacked one-row GEMM for a decode step's Q.K^T only when alpha is 1 (otherwise it
    # repacks every head's K each step). For head_dim 64 the factor is 1/8, a power of two: exact.
    qkv = _qkv_projection(b, x, weights, spec, pre, q_scale=float(hd**-0.5))
    if "rope" in ctx:  # mrope: q and k rotated here from the rotary positions, the kernel's rotary off
        inputs = [*_rotate_packed_qk(b, qkv, ctx["rope"], nh, kv, hd), past[0], past[1], ctx["seqlens_k"], ctx["total"]]
    else:
        inputs = [qkv, "", "", past[0], past[1], ctx["seqlens_k"], ctx["total"], ctx["cos"], ctx["sin"]]
    out, k, v = b.op(
        "GroupQueryAttention",
        inputs,
        out=["attn_output", "present_key", "present_value"],
        n_out=3,
        domain="com.microsoft",
        num_heads=nh,
        kv_num_heads=kv,
        do_rotary=0 if "rope" in ctx else 1,
        rotary_interleaved=0,
        scale=1.0,
    )
    return _o_projection(b, out, weights, text, pre), (k, v)


#   qkv [B,S,(nh+2kv)hd] --Split--> q, k, v;  q, k --Reshape [B,S,heads,hd]--RoPE (cos/sin [B,S,1,hd], f32)--
#   Reshape [B,S,heads*hd]--> (GroupQueryAttention's separate query, key, value inputs)
def _rotate_packed_qk(
    b: GraphBuilder, qkv: str, rope: dict[str, str], nh: int, kv: int, hd: int
) -> tuple[str, str, str]:
    splits = b.ints([nh * hd, kv * hd, kv * hd], "qkv_split")
    q, k, v = b.op("Split", [qkv, splits], out=["q_flat", "k_flat", "v_flat"], n_out=3, axis=-1)
    rotated = []
    for t, t_name, heads in ((q, "q", nh), (k, "k", kv)):
        with b.scope(f"{t_name}_rotary"):
            t = b.op("Reshape", [t, b.ints([0, 0, heads, hd], f"{t_name}_heads_shape")], out=f"{t_name}_bshd")
            t = _apply_rotary(b, t, rope["cos"], rope["sin"], hd)
            rotated.append(b.op("Reshape", [t, b.ints([0, 0, heads * hd], f"{t_name}_flat_shape")], out=t_name))
    return rotated[0], rotated[1], v


#   attention output [B,S,nh*hd] --MatMul W_o [nh*hd, H]--> out
def _o_projection(b: GraphBuilder, x: str, weights: Mapping[str, np.ndarray], text: TextConfig, pre: str) -> str:
    H, nh, hd = text.hidden_size, text.num_attention_heads, text.head_dim
    with b.scope("o_proj"):
        wo = lambda: get_weight(weights, f"{pre}.o_proj.weight", (H, nh * hd)).T  # noqa: E731
        return b.linear(x, f"{pre}.o_proj.weight_t", wo, out="output")


def _apply_rotary(b: GraphBuilder, x: str, cos: str, sin: str, hd: int) -> str:
    xf = b.to_float(x)
    half = b.ints([hd // 2, hd // 2], "rope_halves")
    x1, x2 = b.op("Split", [xf, half], out=["x1", "x2"], n_out=2, axis=-1)
    rot = b.op("Concat", [b.op("Neg", [x2], out="x2_neg"), x1], out="rotated", axis=-1)
    a = b.op("Mul", [xf, cos], name="Mul_cos", out="x_cos")
    c = b.op("Mul", [rot, sin], name="Mul_sin", out="rotated_sin")
    return b.to_model(b.op("Add", [a, c], out="embedded"))


#   x --MatMul W_gate_up [H,2I]--Split--> gate, up;  gate * Sigmoid(gate) * up --MatMul W_down [I,H]--> out
#   (expert e's weights, in decoder_expert{e}.bin)
def _mlp(b: GraphBuilder, x: str, weights: Mapping[str, np.ndarray], spec: DecoderSpec, i: int, e: int) -> str:
    H, inter = spec.text.hidden_size, spec.text.intermediate_size
    pre = spec.mlp_prefix(i, e)
    file = expert_bin(e)

    def gate_up() -> np.ndarray:
        g = get_weight(weights, f"{pre}.gate_proj.weight", (inter, H))
        u = get_weight(weights, f"{pre}.up_proj.weight", (inter, H))
        return np.concatenate([g.T, u.T], axis=1)

    with b.scope("gate_up_proj"):
        gu = b.linear(x, f"{pre}.gate_up_proj.weight_t", gate_up, file=file, out="gate_up")
    gate, up = b.op("Split", [gu, b.ints([inter, inter], "gate_up_split")], out=["gate", "up"], n_out=2, axis=-1)
    sig = b.op("Sigmoid", [gate], name="act/Sigmoid", out="gate_sigmoid")
    act = b.op("Mul", [gate, sig], name="act/Mul", out="gate_act")
    h = b.op("Mul", [act, up], name="Mul_up", out="gated")
    with b.scope("down_proj"):
        wd = lambda: get_weight(weights, f"{pre}.down_proj.weight", (H, inter)).T  # noqa: E731
        return b.linear(h, f"{pre}.down_proj.weight_t", wd, file=file, out="output")


#   hidden [B,S,H] --Slice last position--Squeeze--> [B,H] --RMSNorm--Gemm(W [V,H], transB=1)-->
#   --Cast f32--> logits [B,V]
def _lm_head(b: GraphBuilder, x: str, weights: Mapping[str, np.ndarray], text: TextConfig) -> str:
    V, H = text.vocab_size, text.hidden_size
    axis1 = b.ints([1], "axes_1")
    last = b.op(
        "Slice",
        [x, b.ints([-1], "slice_last_start"), b.ints([np.iinfo(np.int64).max], "slice_end"), axis1],
        name="last_token/Slice",
        out="last_token_b1h",
    )
    last = b.op("Squeeze", [last, axis1], name="last_token/Squeeze", out="last_token")
    with b.scope("norm"):
        h = _rms_norm(b, last, "model.norm.weight", weights, text)
    wname = EMBED_TOKENS if text.tie_word_embeddings else "lm_head.weight"
    with b.scope("lm_head"):
        if b.quant is not None and b.quant.weight_quant(LM_HEAD_T) is not None:
            # Quantized lm_head: its own codes, named LM_HEAD_T tied or not, so its calibration statistics, AWQ
            # scales and the validation reference find it under one name; the table itself is not touched.
            logits = b.linear(h, LM_HEAD_T, lambda: get_weight(weights, wname, (V, H)).T, out="logits_model")
        else:
            w = b.weight(wname, get_weight(weights, wname, (V, H)))
            logits = b.op("Gemm", [h, w], out="logits_model", transB=1)
    return b.to_float(logits, name="lm_head/Cast_logits")
