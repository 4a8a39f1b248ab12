"""UniRS's vision side as three ONNX graphs, built from numpy weights with the project's graph builder.

- ``tower``: ``pixel_values`` [N,3,S,S] -> ``vision_features`` [N,T,C], the hidden state
  ``mm_vision_select_layer`` (-2): the layers after it, computed and thrown away upstream, are not built.
  SigLIP's embeddings and encoder layers are the RSUniVLM vision graph's (same transformers module).
- ``change``: ``pair_features`` [2,T,C] -> ``change_features`` [1,T,C], the change-extraction module with its
  position tables folded into one constant and each BatchNorm folded into the convolution before it.
- ``projector``: ``vision_features`` [N,T,C] -> ``image_tokens`` [N,T',H], ``mlp_downsample``'s ``single``
  branch: zero-pad, 2x2 space-to-depth in the original's column-major order, LayerNorm, Linear, GELU, Linear.

A single image or a video frame runs tower -> projector; a pair runs tower (both images) -> change ->
projector. Weights are given per checkpoint folder, under the checkpoint's own names.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

from rsedge.errors import CheckpointError
from rsedge.export.onnx_builder import GraphBuilder, get_weight
from rsedge.export.vision_graph import PROJECTOR, TOWER, _embeddings, _encoder_layer, _layer_norm, _linear, _projector
from rsedge.export.weight_store import WeightStore
from rsedge.models.dimensions import VisionConfig
from rsedge.models.unirs.config import CHANGE_ATTENTION_DIM, LAYOUT_VILA, UniRSConfig

Weights = Mapping[str, Mapping[str, np.ndarray]]  # folder -> checkpoint name -> array
TOWER_ONNX, CHANGE_ONNX, PROJECTOR_ONNX = "tower.onnx", "change.onnx", "projector.onnx"
VISION_BIN = "vision.bin"
PIXEL_VALUES, VISION_FEATURES = "pixel_values", "vision_features"
PAIR_FEATURES, CHANGE_FEATURES, IMAGE_TOKENS = "pair_features", "change_features", "image_tokens"
TORCH_LN_EPS = 1e-5  # nn.LayerNorm's default, which every projector / change-module norm keeps
BN_EPS = 1e-5
COS_EPS = 1e-8  # nn.CosineSimilarity's default


def tower_layers(cfg: UniRSConfig) -> int:
    """Encoder layers that reach the selected hidden state (hidden_states[k] follows k layers)."""
    L, sel = cfg.vision.num_hidden_layers, cfg.mm_vision_select_layer
    return L + 1 + sel if sel < 0 else sel


def build_tower_graph(
    cfg: UniRSConfig, weights: Weights, store: WeightStore, dtype: str = "float32", file: str = VISION_BIN
) -> onnx.ModelProto:
    vc = cfg.vision
    # The RSUniVLM builders read SigLIP weights under LLaVA-OneVision's names: the same tensors, renamed.
    w = {f"{TOWER}.{k.removeprefix('vision_model.')}": v for k, v in weights["vision_tower"].items()}
    b = GraphBuilder("unirs_tower", store, dtype, file)
    x = b.input(PIXEL_VALUES, b.elem_type, ["num_images", vc.num_channels, vc.image_size, vc.image_size])
    n = tower_layers(cfg)
    with b.scope("vision_tower"):
        with b.scope("embeddings"):
            x = _embeddings(b, x, w, vc)
        for i in range(n):
            with b.scope(f"encoder/layers.{i}"):
                x = _encoder_layer(b, x, w, vc, i)
    b.output(x, VISION_FEATURES, b.elem_type, ["num_images", vc.num_patches, vc.hidden_size])
    doc = f"UniRS SigLIP tower: {n} of {vc.num_hidden_layers} layers (hidden_states[{cfg.mm_vision_select_layer}])"
    return b.make_model(doc, {"rsedge.graph": "tower", "rsedge.dtype": b.dtype.name})


def _single_key(cfg: UniRSConfig, local: str) -> str:
    return f"layers.{local}" if cfg.projector_layout == LAYOUT_VILA else f"layers.single.{local}"


#   features [N,g*g,C] --Reshape [N,g,g,C]--Pad to even--> [N,G,G,C] (G = g+1 when g is odd)
#   --Reshape [N,G,G/2,2C] (column pairs)--Transpose [0,2,1,3]--Reshape [N,G/2,G/2,4C] (row pairs)
#   --Reshape [N,(G/2)^2,4C]: token = column-pair x G/2 + row-pair (base_projector.py flat_square)
#   --LayerNorm(4C)--Linear 4C->H--GELU(erf)--Linear H->H--> image_tokens
def build_projector_graph(
    cfg: UniRSConfig, weights: Weights, store: WeightStore, dtype: str = "float32", file: str = VISION_BIN
) -> onnx.ModelProto:
    C, H, g, half = cfg.mm_hidden_size, cfg.text.hidden_size, cfg.vision.patches_per_side, cfg.downsampled_grid
    G = 2 * half
    p = weights["mm_projector"]
    w = {
        "single.1.weight": p[_single_key(cfg, "1.weight")],
        "single.1.bias": p[_single_key(cfg, "1.bias")],
        f"{PROJECTOR}.0.weight": p[_single_key(cfg, "2.weight")],
        f"{PROJECTOR}.0.bias": p[_single_key(cfg, "2.bias")],
        f"{PROJECTOR}.2.weight": p[_single_key(cfg, "4.weight")],
        f"{PROJECTOR}.2.bias": p[_single_key(cfg, "4.bias")],
    }
    b = GraphBuilder("unirs_projector", store, dtype, file)
    x = b.input(VISION_FEATURES, b.elem_type, ["num_images", g * g, C])
    with b.scope("downsample"):
        x = b.op("Reshape", [x, b.ints([0, g, g, C], "grid_shape")], out="grid")
        if g != G:
            x = b.op("Pad", [x, b.ints([0, 0, 0, 0, 0, G - g, G - g, 0], "pads")], out="padded")
        x = b.op("Reshape", [x, b.ints([0, G, half, 2 * C], "column_pairs_shape")], out="column_pairs")
        x = b.op("Transpose", [x], out="column_major", perm=[0, 2, 1, 3])
        x = b.op("Reshape", [x, b.ints([0, half * half, 4 * C], "tokens_shape")], out="tokens")
    x = _layer_norm(b, x, "single.1", w, _norm_config(4 * C), "single/layer_norm")
    with b.scope("single"):
        x = _projector(b, x, w, 4 * C, H)
    b.output(x, IMAGE_TOKENS, b.elem_type, ["num_images", half * half, H])
    doc = f"UniRS mlp_downsample single branch: {g}x{g} -> {half}x{half} tokens (column-major), {4 * C} -> {H}"
    return b.make_model(doc, {"rsedge.graph": "projector", "rsedge.dtype": b.dtype.name})


def change_position_table(cfg: UniRSConfig, w: Mapping[str, np.ndarray]) -> np.ndarray:
    """[g*g, C]: token (row i, col j) gets [h_embedding[j], w_embedding[i]] (model_encoder.py lines 134-142)."""
    g, half = cfg.change_grid, cfg.mm_hidden_size // 2
    h = get_weight(w, "layers.change.h_embedding.weight", (g, half))
    wt = get_weight(w, "layers.change.w_embedding.weight", (g, half))
    rows, cols = np.divmod(np.arange(g * g), g)
    return np.concatenate([h[cols], wt[rows]], axis=1)


def fold_batch_norm(w: Mapping[str, np.ndarray], conv: str, bn: str, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Conv then eval-mode BatchNorm as one Conv: W' = W s, b' = (b - mean) s + beta, s = gamma / sqrt(var + eps)."""
    weight = np.asarray(w[f"{conv}.weight"], np.float64)
    bias = get_weight(w, f"{conv}.bias", (channels,)).astype(np.float64)
    gamma, beta = (get_weight(w, f"{bn}.{k}", (channels,)).astype(np.float64) for k in ("weight", "bias"))
    mean, var = (get_weight(w, f"{bn}.{k}", (channels,)).astype(np.float64) for k in ("running_mean", "running_var"))
    s = gamma / np.sqrt(var + BN_EPS)
    return (weight * s[:, None, None, None]).astype(np.float32), ((bias - mean) * s + beta).astype(np.float32)


#   pair_features [2,T,C] --Split--> f1, f2; x_k = f_k + position table
#   cc_n_layers x: sa_k = T_self(sa_k) + sa_k; j = T_joint(Concat(sa1, sa2)); sa_k = j[k-th half] + x_k
#   a, b = sa_k as [1,C,g,g]; sim = a.b / (max|a|,eps)(max|b|,eps) over C (float32)
#   Concat(a, b) + sim --Conv1 1x1--> x --[Conv+BN] ReLU [Conv3x3+BN] ReLU [Conv+BN]--> + x --ReLU
#   --> [1,T,C] change_features
def build_change_graph(
    cfg: UniRSConfig, weights: Weights, store: WeightStore, dtype: str = "float32", file: str = VISION_BIN
) -> onnx.ModelProto:
    if not cfg.has_change:
        raise CheckpointError("this checkpoint has no change module (a VILA-1.5 projector): it has no change graph")
    C, g, half = cfg.mm_hidden_size, cfg.change_grid, cfg.mm_hidden_size // 2
    T = g * g
    w = weights["mm_projector"]
    b = GraphBuilder("unirs_change", store, dtype, file)
    pair = b.input(PAIR_FEATURES, b.elem_type, [2, T, C])
    f1, f2 = b.op("Split", [pair, b.ints([1, 1], "pair_split")], out=["features1", "features2"], n_out=2, axis=0)
    pos = b.weight("layers.change.position_table", lambda: change_position_table(cfg, w))
    x1 = b.op("Add", [f1, pos], name="position1/Add", out="x1")
    x2 = b.op("Add", [f2, pos], name="position2/Add", out="x2")
    sa1, sa2 = x1, x2
    for i in range(cfg.cc_n_layers):
        with b.scope(f"selftrans.{i}"):
            pre = f"layers.change.selftrans.{i}"
            with b.scope("self1"):
                sa1 = b.op("Add", [_transformer(b, sa1, w, f"{pre}.0", C, cfg.cc_head), sa1], out="residual")
            with b.scope("self2"):
                sa2 = b.op("Add", [_transformer(b, sa2, w, f"{pre}.0", C, cfg.cc_head), sa2], out="residual")
            joint = b.op("Concat", [sa1, sa2], out="joint_in", axis=-1)
            with b.scope("joint"):
                joint = _transformer(b, joint, w, f"{pre}.1", 2 * C, cfg.cc_head)
            j1, j2 = b.op("Split", [joint, b.ints([C, C], "halves")], out=["joint1", "joint2"], n_out=2, axis=-1)
            sa1 = b.op("Add", [j1, x1], name="skip1/Add", out="sa1")
            sa2 = b.op("Add", [j2, x2], name="skip2/Add", out="sa2")
    maps = []
    for k, sa in ((1, sa1), (2, sa2)):
        m = b.op("Reshape", [sa, b.ints([1, g, g, C], "map_shape")], name=f"map{k}/Reshape", out=f"map{k}_hwc")
        maps.append(b.op("Transpose", [m], name=f"map{k}/Transpose", out=f"map{k}", perm=[0, 3, 1, 2]))
    with b.scope("cosine"):
        a, c = b.to_float(maps[0]), b.to_float(maps[1])
        axis = b.ints([1], "channel_axis")
        dot = b.op("ReduceSum", [b.op("Mul", [a, c], out="ab"), axis], out="dot", keepdims=1)
        norms = []
        for k, t in ((1, a), (2, c)):
            sq = b.op("ReduceSum", [b.op("Mul", [t, t], out=f"sq{k}"), axis], out=f"sumsq{k}", keepdims=1)
            norm = b.op("Sqrt", [sq], out=f"norm{k}")
            norms.append(b.op("Max", [norm, b.scalar(COS_EPS, "eps", np.float32)], out=f"norm{k}_clamped"))
        sim = b.to_model(b.op("Div", [dot, b.op("Mul", norms, out="norms")], out="similarity"))
    x = b.op("Concat", maps, out="maps", axis=1)
    x = b.op("Add", [x, sim], name="similarity/Add", out="fused")
    conv1_w = get_weight(w, "layers.change.Conv1.weight", (C, 2 * C, 1, 1))
    x = b.op(
        "Conv",
        [
            x,
            b.weight("layers.change.Conv1.weight", conv1_w),
            b.weight("layers.change.Conv1.bias", w["layers.change.Conv1.bias"]),
        ],
        name="Conv1",
        out="conv1",
        kernel_shape=[1, 1],
    )
    with b.scope("LN"):
        y = x
        for conv, bn, n_out, k, relu in ((0, 1, half, 1, True), (3, 4, half, 3, True), (6, 7, C, 1, False)):
            wf, bf = fold_batch_norm(w, f"layers.change.LN.left.{conv}", f"layers.change.LN.left.{bn}", n_out)
            name = f"layers.change.LN.left.{conv}+{bn}"
            pads = [k // 2] * 4
            y = b.op(
                "Conv",
                [y, b.weight(f"{name}.weight", wf), b.weight(f"{name}.bias", bf)],
                name=f"left.{conv}/Conv_bn_folded",
                out=f"left{conv}",
                kernel_shape=[k, k],
                pads=pads,
            )
            if relu:
                y = b.op("Relu", [y], name=f"left.{conv}/Relu", out=f"left{conv}_relu")
        y = b.op("Relu", [b.op("Add", [y, x], out="residual")], out="output")
    y = b.op("Reshape", [y, b.ints([1, C, T], "flat_shape")], out="flat")
    y = b.op("Transpose", [y], out="tokens", perm=[0, 2, 1])
    b.output(y, CHANGE_FEATURES, b.elem_type, [1, T, C])
    doc = f"UniRS change-extraction module: cc_n_layers {cfg.cc_n_layers}, {g}x{g}x{C}, BatchNorm folded"
    return b.make_model(doc, {"rsedge.graph": "change", "rsedge.dtype": b.dtype.name})


#   post-norm Transformer (model_encoder.py, norm_first False):
#   x --MultiHeadAtt (q=to_q x, k=v=to_k x)--> + x --LayerNorm1--> h --Linear ReLU Linear--> + h --LayerNorm2
def _transformer(b: GraphBuilder, x: str, w: Mapping[str, np.ndarray], pre: str, dim: int, heads: int) -> str:
    A = CHANGE_ATTENTION_DIM
    hd = A // heads

    def proj(p: str) -> str:
        weight = get_weight(w, f"{pre}.att.to_{p}.weight", (A, dim))
        return b.op("MatMul", [x, b.weight(f"{pre}.att.to_{p}.weight_t", lambda: weight.T)], name=f"to_{p}", out=p)

    q, k = proj("q"), proj("k")  # the values are to_k's output too: to_v is never used
    split = b.ints([0, 0, heads, hd], "heads_shape")
    q = b.op(
        "Transpose",
        [b.op("Reshape", [q, split], name="q/Reshape", out="q_nthd")],
        name="q/T",
        out="qh",
        perm=[0, 2, 1, 3],
    )
    kt = b.op(
        "Transpose",
        [b.op("Reshape", [k, split], name="k/Reshape", out="k_nthd")],
        name="k/T",
        out="kt",
        perm=[0, 2, 3, 1],
    )
    v = b.op(
        "Transpose",
        [b.op("Reshape", [k, split], name="v/Reshape", out="v_nthd")],
        name="v/T",
        out="vh",
        perm=[0, 2, 1, 3],
    )
    scores = b.op("Mul", [b.op("MatMul", [q, kt], out="dots"), b.scalar(hd**-0.5, "scale")], out="scores")
    probs = b.to_model(b.op("Softmax", [b.to_float(scores)], out="probs", axis=-1))
    ctx = b.op("Transpose", [b.op("MatMul", [probs, v], out="context_heads")], out="context_nthd", perm=[0, 2, 1, 3])
    ctx = b.op("Reshape", [ctx, b.ints([0, 0, A], "merge_shape")], out="context")
    if not (heads == 1 and dim == A):  # MultiHeadAtt.project_out
        ctx = _linear(b, ctx, f"{pre}.att.to_out.0", w, A, dim, "to_out")
    h = b.op("Add", [ctx, x], name="attn_residual/Add", out="attn_residual")
    ln = _norm_config(dim)
    h = _layer_norm(b, h, f"{pre}.norm1", w, ln, "norm1")
    with b.scope("feedforward"):
        ff = _linear(b, h, f"{pre}.feedforward.net.0", w, dim, _ff_width(w, pre), "net.0")
        ff = b.op("Relu", [ff], out="relu")
        ff = _linear(b, ff, f"{pre}.feedforward.net.3", w, _ff_width(w, pre), dim, "net.3")
    h = b.op("Add", [ff, h], name="ff_residual/Add", out="ff_residual")
    return _layer_norm(b, h, f"{pre}.norm2", w, ln, "norm2")


def _ff_width(w: Mapping[str, np.ndarray], pre: str) -> int:
    return int(np.shape(w[f"{pre}.feedforward.net.0.bias"])[0])


def _norm_config(dim: int) -> VisionConfig:
    """What the vision graph's _layer_norm reads (width and eps) for an nn.LayerNorm(dim) of the original."""
    return VisionConfig(
        hidden_size=dim,
        intermediate_size=0,
        num_hidden_layers=0,
        num_attention_heads=1,
        patch_size=1,
        image_size=1,
        layer_norm_eps=TORCH_LN_EPS,
    )
