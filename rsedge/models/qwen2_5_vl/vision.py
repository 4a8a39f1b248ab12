"""Qwen2.5-VL's vision tower + PatchMerger as one ONNX graph, built from the checkpoint's tensors.

``vision.onnx``: ``pixel_values`` [N, C*T*P*P] (the processor's rows, model dtype) and the grid feeds of
:func:`rsedge.runtime.families.qwen2_5_vl_image.vision_feeds` -> ``image_embeds`` [N/4, out_hidden_size]:
``model.visual(pixel_values, grid_thw).pooler_output`` of transformers, in the image's own token order.

The graph has no data-dependent control flow: the window permutation, the rotary tables and which patches
attend to which (the padded window table, each patch's frame) are inputs computed in numpy from ``grid_thw``,
so one graph takes every image size (dynamic N). Windowed blocks attend window by window (W x L x L scores per
head); full-attention blocks attend over all N patches of a frame (N x N, the frame mask), a few heads at a
time (``heads_per_pass``) so that their scores, the largest tensors of a large image, stay bounded.
Weights go to ``vision.bin`` (external data, stored once) through the project's :class:`GraphBuilder`;
:func:`quantize_vision_graph` makes its static INT8 form.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx
from PIL import Image

from rsedge.calibration.calibset import CalibrationSet, prepare_image
from rsedge.errors import CheckpointError, OptionError
from rsedge.export.onnx_builder import GraphBuilder, get_weight, save_graph
from rsedge.export.records import graph_io
from rsedge.export.weight_store import WeightStore
from rsedge.quantize.vision_int8 import WindowedReader, check_method, static_int8
from rsedge.runtime.families.qwen2_5_vl_image import (
    FRAME_SEGMENTS,
    IMAGE_EMBEDS,
    MASKED,
    PIXEL_VALUES,
    REVERSE_INDEX,
    ROTARY_COS,
    ROTARY_SIN,
    WINDOW_INDEX,
    WINDOW_MASK,
    WINDOW_ROWS,
    WINDOW_SLOTS,
    VisionPreprocess,
    image_feeds,
)

VISION_BIN = "vision.bin"
PREFIX = "model.visual"  # transformers 5 names; older checkpoints say "visual.", a bare tower none
RMS_EPS = 1e-6  # Qwen2_5_VLVisionBlock and the PatchMerger hard-code it
N, TOKENS, WINDOWS, WINDOW_LEN = "num_patches", "num_tokens", "num_windows", "window_len"
ACTIVATIONS = ("silu",)
# Full-attention blocks compute 2 heads at a time. Measured (one full block, width 1280, 16 heads, N = 4,096
# patches = an 896 px square, onnxruntime CPU, 2 threads): all heads at once +3,100 MB over the session's
# start, 14.4 s; 4 heads +568 MB, 12.3 s; 2 heads +331 MB, 13.2 s; 1 head +253 MB, 15.6 s (a shared 2-core VM).
HEADS_PER_PASS = 2
RECORD_KEYS = (
    "depth",
    "hidden_size",
    "intermediate_size",
    "num_heads",
    "in_channels",
    "patch_size",
    "temporal_patch_size",
    "spatial_merge_size",
    "window_size",
    "fullatt_block_indexes",
    "out_hidden_size",
    "hidden_act",
)

# Qwen2_5_VLVisionConfig's defaults for the fields that fix the layout, not the size (a config.json may omit them).
HF_DEFAULTS = {
    "in_channels": 3,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "window_size": 112,
    "hidden_act": "silu",
    "fullatt_block_indexes": [7, 15, 23, 31],
}
Tensors = Mapping[str, Any]  # name -> torch.Tensor | np.ndarray


def vision_config_record(cfg: Any) -> dict[str, Any]:
    """The manifest's vision record (what ``vision_feeds`` and :func:`build_vision_graph` read), JSON-able.

    ``cfg`` is a transformers ``Qwen2_5_VLVisionConfig`` or the ``vision_config`` dict of a config.json
    (older ones say ``in_chans`` and carry no ``rope_parameters``: theta 10000, as upstream's default). A
    structural field the dict leaves out takes transformers' default; the sizes must be given.
    """
    d = dict(cfg) if isinstance(cfg, Mapping) else cfg.to_dict()
    for alias, key in (
        ("in_chans", "in_channels"),
        ("num_attention_heads", "num_heads"),
        ("num_hidden_layers", "depth"),
    ):
        if key not in d and alias in d:
            d[key] = d[alias]
    d = {**HF_DEFAULTS, **d}
    missing = [k for k in RECORD_KEYS if k not in d]
    if missing:
        raise CheckpointError(f"vision_config lacks {', '.join(missing)}")
    rec: dict[str, Any] = {k: d[k] for k in RECORD_KEYS}
    try:
        for k in RECORD_KEYS:
            if k not in ("hidden_act", "fullatt_block_indexes"):
                rec[k] = int(rec[k])
        rec["fullatt_block_indexes"] = sorted(int(i) for i in rec["fullatt_block_indexes"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"vision_config has a malformed size: {e}") from None
    rope = d.get("rope_parameters") or {}
    if rope.get("rope_type", "axial") not in ("axial", "default"):
        raise CheckpointError(f"vision rope_type {rope['rope_type']!r} is not the axial 2D rotary Qwen2.5-VL uses")
    rec["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    rec["rms_norm_eps"] = RMS_EPS
    if rec["hidden_act"] not in ACTIVATIONS:
        raise OptionError(f"vision hidden_act {rec['hidden_act']!r} is not supported ({', '.join(ACTIVATIONS)})")
    if rec["hidden_size"] % rec["num_heads"] or (rec["hidden_size"] // rec["num_heads"]) % 4:
        raise CheckpointError("vision hidden_size / num_heads must be a multiple of 4 (2D rotary over the head)")
    if rec["window_size"] < rec["patch_size"] * rec["spatial_merge_size"]:
        raise CheckpointError(f"vision window_size {rec['window_size']} is smaller than one merge block")
    return rec


def vision_tensors(state_dict: Tensors) -> dict[str, Any]:
    """The tower's tensors under ``model.visual.*`` names, from any of the three layouts (not yet converted).

    A state dict of the whole model keeps only the tower's; the language model's are not this graph's.
    """
    keys = list(state_dict)
    for prefix in (f"{PREFIX}.", "visual."):
        if any(k.startswith(prefix) for k in keys):
            items = {k[len(prefix) :]: state_dict[k] for k in keys if k.startswith(prefix)}
            break
    else:
        items = dict(state_dict)  # a bare ``model.visual.state_dict()``
    return {f"{PREFIX}.{k}": v for k, v in items.items()}


def _numpy(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):  # a torch tensor (bfloat16 checkpoints included): numpy has no bfloat16
        return t.detach().float().cpu().numpy()
    return np.asarray(t, dtype=np.float32)


#   pixel_values [N, C*T*P*P] --patch_embed MatMul--> [N, D] --Gather(window_index) per merge unit--> window order
#   blocks.i: RMSNorm, attention (rotary; windows, or the whole frame at fullatt_block_indexes), RMSNorm, SwiGLU
#   merger: RMSNorm ln_q --Reshape [N/4, 4D]--Linear--GELU--Linear--> [N/4, out] --Gather(reverse_index)-->
#   image_embeds in the image's token order
def vision_graph(
    state_dict: Tensors,
    vision: Mapping[str, Any],
    store: WeightStore,
    dtype: str = "float32",
    file: str = VISION_BIN,
    heads_per_pass: int | None = HEADS_PER_PASS,
) -> onnx.ModelProto:
    """The tower and merger as an ONNX model whose weights go to ``file`` in ``store`` (the exporters' form:
    one store shared with the decoder's graphs). The tower's tensors are checked against :func:`tower_shapes`
    first: a missing, misshapen or unexpected one is a one-line :class:`CheckpointError`.

    ``heads_per_pass``: full-attention blocks compute that many heads at a time (None: all at once), which
    bounds their [heads, N, N] scores, the graph's largest tensors for a large image, to [heads_per_pass, N, N].
    """
    if heads_per_pass is not None and heads_per_pass < 1:
        raise OptionError(f"heads_per_pass must be at least 1, got {heads_per_pass}")
    v = dict(vision)
    weights = vision_tensors(state_dict)
    check_tensors(weights, v)  # before any byte is written
    weights32 = _Float32(weights)
    D, heads, depth = int(v["hidden_size"]), int(v["num_heads"]), int(v["depth"])
    b = GraphBuilder("qwen2_5_vl_vision", store, dtype, file)
    merge = int(v["spatial_merge_size"])
    unit = merge * merge
    patch_dim = int(v["in_channels"]) * int(v["temporal_patch_size"]) * int(v["patch_size"]) ** 2
    hd = D // heads

    x = b.input(PIXEL_VALUES, b.elem_type, [N, patch_dim])
    index = b.input(WINDOW_INDEX, onnx.TensorProto.INT64, [TOKENS])
    reverse = b.input(REVERSE_INDEX, onnx.TensorProto.INT64, [TOKENS])
    cos = b.input(ROTARY_COS, onnx.TensorProto.FLOAT, [N, hd])
    sin = b.input(ROTARY_SIN, onnx.TensorProto.FLOAT, [N, hd])
    window_rows = b.input(WINDOW_ROWS, onnx.TensorProto.INT64, [WINDOWS, WINDOW_LEN])
    window_mask = b.input(WINDOW_MASK, onnx.TensorProto.FLOAT, [WINDOWS, WINDOW_LEN])
    window_slots = b.input(WINDOW_SLOTS, onnx.TensorProto.INT64, [N])
    frame_seg = b.input(FRAME_SEGMENTS, onnx.TensorProto.INT64, [N])

    with b.scope("visual"):
        with b.scope("patch_embed"):
            x = _patch_embed(b, x, weights32, v, patch_dim)
            x = _permute_units(b, x, index, unit, D, "window_order")
        with b.scope("attention_masks"):
            full_attention = _Attention(_segment_mask(b, frame_seg, "full"), heads_per_pass=heads_per_pass)
            key_mask = b.op("Unsqueeze", [window_mask, b.ints([1, 2], "head_query_axes")], out="window_keys")
            windowed_attention = _Attention(key_mask, window_rows, window_slots)
        with b.scope("rotary"):
            rotary = (
                b.op("Unsqueeze", [cos, b.ints([1], "head_axis")], out="cos"),
                b.op("Unsqueeze", [sin, b.ints([1], "head_axis")], out="sin"),
            )
        full = set(v["fullatt_block_indexes"])
        for i in range(depth):
            with b.scope(f"blocks.{i}"):
                x = _block(b, x, weights32, v, i, rotary, full_attention if i in full else windowed_attention)
        with b.scope("merger"):
            x = _merger(b, x, weights32, v)
            x = b.op("Gather", [x, reverse], name="image_order/Gather", out="image_order", axis=0)
    out_hidden = int(v["out_hidden_size"])
    b.output(x, IMAGE_EMBEDS, b.elem_type, [TOKENS, out_hidden])

    windowed = [i for i in range(depth) if i not in full]
    doc = (
        f"Qwen2.5-VL vision tower ({depth} blocks; full attention at {sorted(full)}, windows of "
        f"{v['window_size']} px at {windowed}) + 2x2 PatchMerger, {b.dtype.name}. inputs: pixel_values[N,{patch_dim}] "
        f"and the grid feeds (window order, rotary tables, padded windows, frames); output: image_embeds[N/{unit},"
        f"{out_hidden}] in image order."
    )
    meta = {
        "rsedge.graph": "vision",
        "rsedge.dtype": b.dtype.name,
        "rsedge.vision_config": json.dumps(dict(v), sort_keys=True),
        "rsedge.weight_files": json.dumps([file]),
        "rsedge.full_attention_heads_per_pass": str(heads_per_pass or heads),
    }
    return b.make_model(doc, meta)


class CalibrationFeeds(WindowedReader):
    """onnxruntime calibration reader: one image's full feeds per call (each image its own token count N).

    Images are read and preprocessed as the runtime does (:func:`image_feeds`); one per
    ``collect_data`` call (``set_range``) keeps the histogram calibrators' memory to one image's tensors.
    """

    def __init__(
        self, images: Sequence[Path | Image.Image], pre: VisionPreprocess, vision: Mapping[str, Any], dtype: type
    ) -> None:
        self._images, self._pre, self._vision, self._dtype = list(images), pre, vision, dtype
        super().__init__(len(self._images))

    def feeds(self, index: int) -> dict[str, np.ndarray]:
        image = self._images[index]
        if not isinstance(image, Image.Image):
            image = prepare_image(Path(image))
        return image_feeds(image, self._pre, self._vision, self._dtype)[0]


def float_matmuls(model: onnx.ModelProto) -> list[str]:
    """The MatMuls static INT8 leaves in float, by node name:

    - the patch embedding (the stem), whose inputs are normalised pixels: on the test tower calibrated with
      4 images, keeping it in float raised the worst cosine to FP32 from 0.989 to 0.992 (the largest gain of
      any one exclusion tried: scores, merger, stem);
    - each block's probabilities x V: Q/DQ around a Softmax's output costs accuracy, and onnxruntime's CPU
      provider would fuse it into a slow QLinearSoftmax.
    """
    stem = "/visual/patch_embed/proj/MatMul"
    return [
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul" and (n.name == stem or ("/attn/" in n.name and n.name.endswith("/context/MatMul")))
    ]


def quantize_vision_graph(
    src: Path,
    dst: Path,
    images: CalibrationSet | Sequence[Path | Image.Image],
    pre: VisionPreprocess,
    vision: Mapping[str, Any],
    method: str = "percentile",
) -> Path:
    """Write ``dst`` (+ ``dst.data``): the FP32 vision graph ``src`` with static INT8 Q/DQ on its MatMuls,
    calibrated on ``images`` (a calibration set's images, or paths / PIL images), with the settings of the
    SigLIP tower's INT8 export (:mod:`rsedge.quantize.vision_int8`): per-channel symmetric INT8 weights,
    symmetric INT8 activations, float biases; normalisations, rotary, masks, softmax and
    :func:`float_matmuls` stay in float."""
    check_method(method)
    if isinstance(images, CalibrationSet):
        images = list(dict.fromkeys(p for item in images.items for p in images.image_paths(item)))
    if not images:
        raise OptionError("INT8 calibration of the vision graph needs at least one image")
    src, dst = Path(src).resolve(), Path(dst).resolve()
    graph = onnx.load(str(src), load_external_data=False)
    if graph.graph.input[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise OptionError("static INT8 calibrates the float32 vision graph; export it as float32 first")
    reader = CalibrationFeeds(images, pre, vision, np.float32)
    return static_int8(src, dst, reader, method, ["MatMul"], float_matmuls(graph))


def build_vision_graph(
    state_dict: Tensors,
    vision_cfg: Mapping[str, Any],
    out_dir: Path,
    name: str = "vision",
    dtype: str = "float32",
    *,
    store: WeightStore | None = None,
    file: str | None = None,
    heads_per_pass: int | None = HEADS_PER_PASS,
) -> dict[str, Any]:
    """Write ``out_dir/<name>.onnx`` (weights in ``<name>.bin``, or ``file`` of a shared ``store``) and return
    its manifest graph record: ``{"file": ..., "inputs": [...], "outputs": [...]}`` as the exporters write."""
    out_dir = Path(out_dir)
    store = store if store is not None else WeightStore(out_dir)
    model = vision_graph(state_dict, vision_cfg, store, dtype, file or f"{name}.bin", heads_per_pass)
    save_graph(model, out_dir / f"{name}.onnx")
    return {"file": f"{name}.onnx", **graph_io(model)}


def tower_shapes(vision: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of the tower (``model.visual.*``) and its shape: the declared weight map."""
    D, inter, depth = int(vision["hidden_size"]), int(vision["intermediate_size"]), int(vision["depth"])
    C, T, P = (int(vision[k]) for k in ("in_channels", "temporal_patch_size", "patch_size"))
    wide = D * int(vision["spatial_merge_size"]) ** 2
    shapes: dict[str, tuple[int, ...]] = {"patch_embed.proj.weight": (D, C, T, P, P)}
    for i in range(depth):
        blk = f"blocks.{i}"
        shapes |= {f"{blk}.norm1.weight": (D,), f"{blk}.norm2.weight": (D,)}
        shapes |= {f"{blk}.attn.qkv.weight": (3 * D, D), f"{blk}.attn.qkv.bias": (3 * D,)}
        shapes |= {f"{blk}.attn.proj.weight": (D, D), f"{blk}.attn.proj.bias": (D,)}
        for p in ("gate", "up"):
            shapes |= {f"{blk}.mlp.{p}_proj.weight": (inter, D), f"{blk}.mlp.{p}_proj.bias": (inter,)}
        shapes |= {f"{blk}.mlp.down_proj.weight": (D, inter), f"{blk}.mlp.down_proj.bias": (D,)}
    shapes["merger.ln_q.weight"] = (D,)
    shapes |= {"merger.mlp.0.weight": (wide, wide), "merger.mlp.0.bias": (wide,)}
    out = int(vision["out_hidden_size"])
    shapes |= {"merger.mlp.2.weight": (out, wide), "merger.mlp.2.bias": (out,)}
    return {f"{PREFIX}.{k}": v for k, v in shapes.items()}


def check_tensors(weights: Mapping[str, Any], vision: Mapping[str, Any]) -> None:
    """A missing, misshapen or unexpected tower tensor is one CheckpointError line naming it."""
    want = tower_shapes(vision)
    for name, shape in want.items():
        if name not in weights:
            raise CheckpointError(f"checkpoint lacks the tensor {name!r}")
        got = tuple(int(d) for d in weights[name].shape)
        if got != shape:
            raise CheckpointError(f"tensor {name!r} has shape {list(got)}, expected {list(shape)}")
    unexpected = sorted(set(weights) - set(want))
    if unexpected:
        raise CheckpointError(f"checkpoint has the vision tensor {unexpected[0]!r}, which the tower does not have")


class _Float32(Mapping[str, np.ndarray]):
    """The weights as float32 numpy, converted when read: one tensor at a time, not a second copy of the tower."""

    def __init__(self, weights: Mapping[str, Any]) -> None:
        self._w = weights

    def __getitem__(self, key: str) -> np.ndarray:
        return _numpy(self._w[key])

    def __contains__(self, key: object) -> bool:
        return key in self._w

    def __iter__(self) -> Iterator[str]:
        return iter(self._w)

    def __len__(self) -> int:
        return len(self._w)


#   pixel_values [N, C*T*P*P] --MatMul W [C*T*P*P, D]--> [N, D]
#   (Conv3d with kernel = stride = (T, P, P) over one patch is a dot product with its flattened kernel)
def _patch_embed(b: GraphBuilder, x: str, w: Mapping[str, np.ndarray], v: Mapping[str, Any], patch_dim: int) -> str:
    D, C, T, P = (int(v[k]) for k in ("hidden_size", "in_channels", "temporal_patch_size", "patch_size"))
    name = f"{PREFIX}.patch_embed.proj.weight"
    kernel = lambda: get_weight(w, name, (D, C, T, P, P)).reshape(D, patch_dim).T  # noqa: E731
    with b.scope("proj"):
        return b.linear(x, f"{name}_t", kernel, out="patches")


#   x [N, D] --Reshape [N/unit, unit, D]--Gather(index, axis 0)--Reshape [N, D]
def _permute_units(b: GraphBuilder, x: str, index: str, unit: int, D: int, scope: str) -> str:
    with b.scope(scope):
        x = b.op("Reshape", [x, b.ints([-1, unit, D], "units_shape")], out="units")
        x = b.op("Gather", [x, index], out="permuted", axis=0)
        return b.op("Reshape", [x, b.ints([-1, D], "rows_shape")], out="rows")


#   segments [N] --Unsqueeze--> [N,1], [1,N] --Equal--> same segment [N,N] --Where(0, MASKED)--> mask f32
def _segment_mask(b: GraphBuilder, segments: str, scope: str) -> str:
    with b.scope(scope):
        rows = b.op("Unsqueeze", [segments, b.ints([1], "axis1")], out="rows")
        cols = b.op("Unsqueeze", [segments, b.ints([0], "axis0")], out="cols")
        same = b.op("Equal", [rows, cols], out="same_segment")
        zero, masked = b.scalar(0.0, "zero_f32", np.float32), b.scalar(MASKED, "masked_f32", np.float32)
        return b.op("Where", [same, zero, masked], out="mask")


#   x --RMSNorm norm1--attention--> + x --RMSNorm norm2--SwiGLU MLP--> + --> out
def _block(
    b: GraphBuilder,
    x: str,
    w: Mapping[str, np.ndarray],
    v: Mapping[str, Any],
    i: int,
    rotary: tuple[str, str],
    attention: _Attention,
) -> str:
    pre = f"{PREFIX}.blocks.{i}"
    D = int(v["hidden_size"])
    with b.scope("norm1"):
        h = _rms_norm(b, x, f"{pre}.norm1.weight", w, D)
    with b.scope("attn"):
        h = _attention(b, h, w, v, pre, rotary, attention)
    x = b.op("Add", [x, h], name="residual_attn/Add", out="residual_attn")
    with b.scope("norm2"):
        h = _rms_norm(b, x, f"{pre}.norm2.weight", w, D)
    with b.scope("mlp"):
        h = _mlp(b, h, w, pre, D, int(v["intermediate_size"]))
    return b.op("Add", [x, h], name="residual_mlp/Add", out="hidden")


#   x --Cast f32--> Pow 2 --ReduceMean(-1)--Add eps--Sqrt--> rms;  x_f32 / rms --Cast model--> * weight
#   (Qwen2_5_VLRMSNorm; onnxruntime fuses the chain into SimplifiedLayerNormalization)
def _rms_norm(b: GraphBuilder, x: str, wname: str, w: Mapping[str, np.ndarray], dim: int) -> str:
    weight = b.weight(wname, get_weight(w, wname, (dim,)))
    xf = b.to_float(x)
    sq = b.op("Pow", [xf, b.scalar(2.0, "two_f32", np.float32)], out="squared")
    var = b.reduce_mean(sq, [-1], out="variance")
    var = b.op("Add", [var, b.scalar(RMS_EPS, "rms_norm_eps", np.float32)], out="variance_eps")
    rms = b.op("Sqrt", [var], out="rms")
    normed = b.to_model(b.op("Div", [xf, rms], out="normalized"))
    return b.op("Mul", [normed, weight], name="Mul_weight", out="output")


class _Attention(NamedTuple):
    """Who attends to whom in a block: an additive float32 mask, and for windowed blocks the padded window
    table (``rows`` [W, L]) and each patch's slot in it (``slots`` [N]); full blocks have neither."""

    mask: str  # [N, N] (full) or [W, 1, 1, L] (windowed: padding keys)
    rows: str | None = None
    slots: str | None = None
    heads_per_pass: int | None = None  # full attention: heads computed together (None: all)


#   x --MatMul W_qkv [D,3D] + b--Split--> q, k, v [N, heads, hd]
#   q, k --Cast f32-- * cos + rotate_half(.) * sin --Cast model-->   (rotate_half: [x1|x2] -> [-x2|x1])
#   full:     q [heads,N,hd] * hd^-0.5 @ k^T [heads,hd,N] --Cast f32-- + mask [N,N] (frames)
#   windowed: Gather(rows) -> [W,L,heads,hd]; q [W,heads,L,hd] @ k^T --Cast f32-- + mask [W,1,1,L] (padding)
#   --Softmax--Cast model--> @ v --Transpose--Reshape [rows,D] (windowed: --Gather(slots)--> [N,D]) --proj--> out
#   A windowed block's scores are W x heads x L x L (L = 64 patches for 112 px windows), not heads x N x N.
def _attention(
    b: GraphBuilder,
    x: str,
    w: Mapping[str, np.ndarray],
    v: Mapping[str, Any],
    pre: str,
    rotary: tuple[str, str],
    attention: _Attention,
) -> str:
    D, heads = int(v["hidden_size"]), int(v["num_heads"])
    hd = D // heads
    pre = f"{pre}.attn"
    qkv_w = get_weight(w, f"{pre}.qkv.weight", (3 * D, D))
    qkv_b = get_weight(w, f"{pre}.qkv.bias", (3 * D,))
    with b.scope("qkv"):
        qkv = b.linear(x, f"{pre}.qkv.weight_t", lambda: qkv_w.T, out="qkv", bias=(f"{pre}.qkv.bias", qkv_b))
    q, k, val = b.op(
        "Split", [qkv, b.ints([D, D, D], "qkv_split")], out=["q_flat", "k_flat", "v_flat"], n_out=3, axis=-1
    )
    shape = b.ints([0, heads, hd], "heads_shape")
    q = b.op("Reshape", [q, shape], name="q/Reshape", out="q_nhd")
    k = b.op("Reshape", [k, shape], name="k/Reshape", out="k_nhd")
    val = b.op("Reshape", [val, shape], name="v/Reshape", out="v_nhd")
    q = _rotate(b, q, rotary, hd, "q")
    k = _rotate(b, k, rotary, hd, "k")
    if attention.rows is None:  # [N, heads, hd] -> [heads, N, hd]; keys [heads, hd, N]
        heads_first, keys_last = [1, 0, 2], [1, 2, 0]
    else:  # [N, heads, hd] -> [W, L, heads, hd] -> [W, heads, L, hd]; keys [W, heads, hd, L]
        heads_first, keys_last = [0, 2, 1, 3], [0, 2, 3, 1]
        q, k, val = (
            b.op("Gather", [t, attention.rows], name=f"{n}/Gather_windows", out=f"{n}_windows", axis=0)
            for n, t in (("q", q), ("k", k), ("v", val))
        )
    q = b.op("Transpose", [q], name="q/Transpose", out="q_heads", perm=heads_first)
    q = b.op("Mul", [q, b.scalar(hd**-0.5, "attn_scale")], name="q/Mul_scale", out="q")
    kt = b.op("Transpose", [k], name="k/Transpose", out="key_t", perm=keys_last)
    val = b.op("Transpose", [val], name="v/Transpose", out="v", perm=heads_first)
    group = attention.heads_per_pass
    if attention.rows is None and group and group < heads:
        # Full attention a few heads at a time: the scores of one pass ([group, N, N]) are freed before the
        # next pass starts, so the peak is group/heads of all heads' scores (heads is static: a plain Split).
        sizes = b.ints([min(group, heads - g) for g in range(0, heads, group)], "head_groups")
        n = len(range(0, heads, group))
        qs = b.op("Split", [q, sizes], name="q/Split_heads", out=[f"q_{i}" for i in range(n)], n_out=n, axis=0)
        ks = b.op("Split", [kt, sizes], name="k/Split_heads", out=[f"key_t_{i}" for i in range(n)], n_out=n, axis=0)
        vs = b.op("Split", [val, sizes], name="v/Split_heads", out=[f"v_{i}" for i in range(n)], n_out=n, axis=0)
        parts = []
        for i in range(n):
            with b.scope(f"heads.{i}"):
                parts.append(_softmax_attention(b, qs[i], ks[i], vs[i], attention.mask))
        ctx = b.op("Concat", parts, name="context/Concat_heads", out="context_heads", axis=0)
    else:
        ctx = _softmax_attention(b, q, kt, val, attention.mask)
    ctx = b.op("Transpose", [ctx], name="context/Transpose", out="context_rows", perm=heads_first)  # self-inverse
    ctx = b.op("Reshape", [ctx, b.ints([-1, D], "merge_heads_shape")], name="context/Reshape", out="context")
    if attention.slots is not None:  # padded window rows back to the N patches
        ctx = b.op("Gather", [ctx, attention.slots], name="context/Gather_patches", out="context_patches", axis=0)
    proj_w = get_weight(w, f"{pre}.proj.weight", (D, D))
    proj_b = get_weight(w, f"{pre}.proj.bias", (D,))
    with b.scope("proj"):
        return b.linear(ctx, f"{pre}.proj.weight_t", lambda: proj_w.T, out="output", bias=(f"{pre}.proj.bias", proj_b))


#   q @ k^T --Cast f32-- + mask --Softmax--Cast model--> @ v
def _softmax_attention(b: GraphBuilder, q: str, kt: str, val: str, mask: str) -> str:
    scores = b.op("MatMul", [q, kt], name="scores/MatMul", out="scores")
    scores = b.op("Add", [b.to_float(scores), mask], name="scores/Add_mask", out="scores_masked")
    probs = b.to_model(b.op("Softmax", [scores], out="probs", axis=-1))
    return b.op("MatMul", [probs, val], name="context/MatMul", out="context_heads")


def _rotate(b: GraphBuilder, x: str, rotary: tuple[str, str], hd: int, name: str) -> str:
    cos, sin = rotary
    with b.scope(f"{name}_rotary"):
        xf = b.to_float(x)
        x1, x2 = b.op("Split", [xf, b.ints([hd // 2, hd // 2], "half_split")], out=["x1", "x2"], n_out=2, axis=-1)
        rotated = b.op("Concat", [b.op("Neg", [x2], out="neg_x2"), x1], out="rotated", axis=-1)
        a = b.op("Mul", [xf, cos], name="Mul_cos", out="x_cos")
        c = b.op("Mul", [rotated, sin], name="Mul_sin", out="rotated_sin")
        return b.to_model(b.op("Add", [a, c], out="output"))


#   x --MatMul [W_gate | W_up] + [b_gate | b_up]--Split--> gate, up;  silu(gate) * up --down_proj + b--> out
def _mlp(b: GraphBuilder, x: str, w: Mapping[str, np.ndarray], pre: str, D: int, inter: int) -> str:
    pre = f"{pre}.mlp"
    gate_w, up_w = (get_weight(w, f"{pre}.{p}_proj.weight", (inter, D)) for p in ("gate", "up"))
    gate_b, up_b = (get_weight(w, f"{pre}.{p}_proj.bias", (inter,)) for p in ("gate", "up"))
    down_w, down_b = get_weight(w, f"{pre}.down_proj.weight", (D, inter)), get_weight(w, f"{pre}.down_proj.bias", (D,))
    with b.scope("gate_up_proj"):
        gu = b.linear(
            x,
            f"{pre}.gate_up_proj.weight_t",
            lambda: np.concatenate([gate_w.T, up_w.T], axis=1),
            out="gate_up",
            bias=(f"{pre}.gate_up_proj.bias", lambda: np.concatenate([gate_b, up_b])),
        )
    gate, up = b.op("Split", [gu, b.ints([inter, inter], "gate_up_split")], out=["gate", "up"], n_out=2, axis=-1)
    sig = b.op("Sigmoid", [gate], name="act/Sigmoid", out="gate_sigmoid")
    act = b.op("Mul", [gate, sig], name="act/Mul", out="gate_act")
    h = b.op("Mul", [act, up], name="Mul_up", out="gated")
    with b.scope("down_proj"):
        return b.linear(
            h, f"{pre}.down_proj.weight_t", lambda: down_w.T, out="output", bias=(f"{pre}.down_proj.bias", down_b)
        )


#   x [N, D] --RMSNorm ln_q--Reshape [N/unit, unit*D]--Linear--GELU(erf)--Linear--> [N/unit, out_hidden]
def _merger(b: GraphBuilder, x: str, w: Mapping[str, np.ndarray], v: Mapping[str, Any]) -> str:
    D, out_hidden = int(v["hidden_size"]), int(v["out_hidden_size"])
    wide = D * int(v["spatial_merge_size"]) ** 2
    pre = f"{PREFIX}.merger"
    with b.scope("ln_q"):
        x = _rms_norm(b, x, f"{pre}.ln_q.weight", w, D)
    x = b.op("Reshape", [x, b.ints([-1, wide], "merged_shape")], out="merged")
    for j, (n_in, n_out) in ((0, (wide, wide)), (2, (wide, out_hidden))):
        wt = get_weight(w, f"{pre}.mlp.{j}.weight", (n_out, n_in))
        bias = get_weight(w, f"{pre}.mlp.{j}.bias", (n_out,))
        with b.scope(f"mlp.{j}"):
            x = b.linear(
                x, f"{pre}.mlp.{j}.weight_t", lambda wt=wt: wt.T, out="output", bias=(f"{pre}.mlp.{j}.bias", bias)
            )
        if j == 0:
            with b.scope("mlp.1"):  # nn.GELU(): 0.5 x (1 + erf(x / sqrt 2)); onnxruntime fuses it into Gelu
                e = b.op("Div", [x, b.scalar(float(np.sqrt(2.0)), "sqrt2")], out="x_div_sqrt2")
                e = b.op("Erf", [e], out="erf")
                e = b.op("Add", [e, b.scalar(1.0, "one")], out="one_plus_erf")
                e = b.op("Mul", [x, e], name="Mul_x", out="x_one_plus_erf")
                x = b.op("Mul", [e, b.scalar(0.5, "half")], name="Mul_half", out="output")
    return x
