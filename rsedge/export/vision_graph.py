"""SigLIP vision tower + mlp2x_gelu connector as one ONNX graph, built from numpy weights.

``vision.onnx``: ``pixel_values`` [N,3,S,S] (model dtype) -> ``image_features`` [N,T,H_text],
T = (S/patch)^2.
The features are taken from the last kept encoder layer BEFORE ``post_layernorm`` (LLaVA's SigLIP tower),
then projected. Weights in ``vision.bin``. The image_newline vector is not part of the graph.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict

import numpy as np
import onnx

from rsedge.errors import OptionError
from rsedge.export.onnx_builder import GraphBuilder, get_weight
from rsedge.export.weight_store import WeightStore
from rsedge.models.dimensions import VisionConfig
from rsedge.models.rsunivlm.config import RSUniVLMConfig

VISION_BIN = "vision.bin"
VISION_ONNX = "vision.onnx"
PIXEL_VALUES = "pixel_values"
IMAGE_FEATURES = "image_features"
TOWER = "model.vision_tower.vision_tower.vision_model"
PROJECTOR = "model.mm_projector"
NUM_IMAGES = "num_images"


def build_vision_graph(
    cfg: RSUniVLMConfig, weights: Mapping[str, np.ndarray], store: WeightStore, dtype: str = "float32"
) -> onnx.ModelProto:
    """The vision tower and connector; weights go to ``vision.bin`` in ``store``."""
    vc, H = cfg.vision, cfg.text.hidden_size
    if vc.hidden_act != "gelu_pytorch_tanh":
        raise OptionError(f"vision hidden_act {vc.hidden_act!r} is not supported (gelu_pytorch_tanh)")
    # 384 px / 14 px patches leaves 6 px the stride-14 Conv never reads, as in SigLIP: 27 x 27 = 729 patches.
    if vc.hidden_size % vc.num_attention_heads:
        raise OptionError("vision hidden_size must be a multiple of num_attention_heads")
    b = GraphBuilder("rsunivlm_vision", store, dtype, VISION_BIN)
    S, T, D = vc.image_size, vc.num_patches, vc.hidden_size
    x = b.input(PIXEL_VALUES, b.elem_type, [NUM_IMAGES, vc.num_channels, S, S])
    with b.scope("vision_tower"):
        with b.scope("embeddings"):
            x = _embeddings(b, x, weights, vc)
        for i in range(vc.num_hidden_layers):
            with b.scope(f"encoder/layers.{i}"):
                x = _encoder_layer(b, x, weights, vc, i)
    with b.scope("mm_projector"):
        x = _projector(b, x, weights, D, H)
    b.output(x, IMAGE_FEATURES, b.elem_type, [NUM_IMAGES, T, H])

    doc = (
        f"RSUniVLM SigLIP tower ({vc.num_hidden_layers} layers, features before post_layernorm) + mlp2x_gelu "
        f"connector, {b.dtype.name}, opset 17. input: pixel_values[N,{vc.num_channels},{S},{S}]; "
        f"output: image_features[N,{T},{H}]."
    )
    meta = {
        "rsedge.graph": "vision",
        "rsedge.dtype": b.dtype.name,
        "rsedge.vision_config": json.dumps(asdict(vc), sort_keys=True),
        "rsedge.text_hidden_size": str(H),
        "rsedge.projector_type": cfg.projector_type,
        "rsedge.weight_files": json.dumps([VISION_BIN]),
    }
    return b.make_model(doc, meta)


#   pixel_values [N,C,S,S] --Conv(patch, stride patch) + bias--> [N,D,g,g] --Reshape--> [N,D,T]
#   --Transpose--> [N,T,D] --+ position_embedding [T,D]--> embeddings
def _embeddings(b: GraphBuilder, x: str, weights: Mapping[str, np.ndarray], vc: VisionConfig) -> str:
    D, p, C, T = vc.hidden_size, vc.patch_size, vc.num_channels, vc.num_patches
    pre = f"{TOWER}.embeddings"
    w = b.weight(f"{pre}.patch_embedding.weight", get_weight(weights, f"{pre}.patch_embedding.weight", (D, C, p, p)))
    bias = b.weight(f"{pre}.patch_embedding.bias", get_weight(weights, f"{pre}.patch_embedding.bias", (D,)))
    x = b.op("Conv", [x, w, bias], name="patch_embedding/Conv", out="patches", kernel_shape=[p, p], strides=[p, p])
    x = b.op("Reshape", [x, b.ints([0, D, T], "patches_flat_shape")], out="patches_flat")
    x = b.op("Transpose", [x], out="patch_embeds", perm=[0, 2, 1])
    pname = f"{pre}.position_embedding.weight"
    pos = b.weight(pname, get_weight(weights, pname, (T, D)))
    return b.op("Add", [x, pos], name="position_embedding/Add", out="embeddings")


#   x --LayerNorm1--Attention--> + x --LayerNorm2--fc1--gelu(tanh)--fc2--> + --> out
def _encoder_layer(b: GraphBuilder, x: str, weights: Mapping[str, np.ndarray], vc: VisionConfig, i: int) -> str:
    pre = f"{TOWER}.encoder.layers.{i}"
    h = _layer_norm(b, x, f"{pre}.layer_norm1", weights, vc, "layer_norm1")
    with b.scope("self_attn"):
        h = _attention(b, h, weights, vc, f"{pre}.self_attn")
    x = b.op("Add", [x, h], name="residual_attn/Add", out="residual_attn")
    h = _layer_norm(b, x, f"{pre}.layer_norm2", weights, vc, "layer_norm2")
    with b.scope("mlp"):
        h = _linear(b, h, f"{pre}.mlp.fc1", weights, vc.hidden_size, vc.intermediate_size, "fc1")
        with b.scope("act"):
            h = _gelu_tanh(b, h)
        h = _linear(b, h, f"{pre}.mlp.fc2", weights, vc.intermediate_size, vc.hidden_size, "fc2")
    return b.op("Add", [x, h], name="residual_mlp/Add", out="hidden")


#   x --Cast f32--> d = x - ReduceMean(x);  d / Sqrt(ReduceMean(d^2) + eps) --Cast model--> * w + b
#   (spelled out: TensorRT 8.5 / JetPack 5.1 has no LayerNormalization op; onnxruntime and TensorRT 8.6+
#   fuse the pattern back into one normalization kernel)
def _layer_norm(
    b: GraphBuilder, x: str, pre: str, weights: Mapping[str, np.ndarray], vc: VisionConfig, scope: str
) -> str:
    D = vc.hidden_size
    w = b.weight(f"{pre}.weight", get_weight(weights, f"{pre}.weight", (D,)))
    bias = b.weight(f"{pre}.bias", get_weight(weights, f"{pre}.bias", (D,)))
    with b.scope(scope):
        xf = b.to_float(x)
        mean = b.reduce_mean(xf, [-1], out="mean")
        d = b.op("Sub", [xf, mean], out="centered")
        sq = b.op("Pow", [d, b.scalar(2.0, "two_f32", np.float32)], out="squared")  # Pow: what ORT's fusion matches
        var = b.reduce_mean(sq, [-1], out="variance")
        var = b.op("Add", [var, b.scalar(vc.layer_norm_eps, "layer_norm_eps", np.float32)], out="variance_eps")
        normed = b.to_model(b.op("Div", [d, b.op("Sqrt", [var], out="std")], out="normalized"))
        scaled = b.op("Mul", [normed, w], name="Mul_weight", out="scaled")
        return b.op("Add", [scaled, bias], name="Add_bias", out="output")


#   x --MatMul W^T [in,out]--Add bias--> out
def _linear(
    b: GraphBuilder, x: str, pre: str, weights: Mapping[str, np.ndarray], n_in: int, n_out: int, scope: str
) -> str:
    w = lambda: get_weight(weights, f"{pre}.weight", (n_out, n_in)).T  # noqa: E731
    bias = get_weight(weights, f"{pre}.bias", (n_out,))
    with b.scope(scope):
        y = b.op("MatMul", [x, b.weight(f"{pre}.weight_t", w)], out="nobias")
        return b.op("Add", [y, b.weight(f"{pre}.bias", bias)], out="output")


#   x --MatMul W_qkv [D,3D] + b--Split--> q, k, v --Reshape [N,T,nh,hd]--Transpose--> [N,nh,T,hd]
#   softmax((q * hd^-0.5) k^T) (f32) v --Transpose--Reshape [N,T,D]--out_proj--> out
def _attention(b: GraphBuilder, x: str, weights: Mapping[str, np.ndarray], vc: VisionConfig, pre: str) -> str:
    D, nh = vc.hidden_size, vc.num_attention_heads
    hd = D // nh

    def qkv_weight() -> np.ndarray:
        return np.concatenate([get_weight(weights, f"{pre}.{p}_proj.weight", (D, D)).T for p in "qkv"], axis=1)

    def qkv_bias() -> np.ndarray:
        return np.concatenate([get_weight(weights, f"{pre}.{p}_proj.bias", (D,)) for p in "qkv"])

    with b.scope("qkv_proj"):
        qkv = b.op("MatMul", [x, b.weight(f"{pre}.qkv_proj.weight_t", qkv_weight)], out="qkv_nobias")
        qkv = b.op("Add", [qkv, b.weight(f"{pre}.qkv_proj.bias", qkv_bias)], out="qkv")
    q, k, v = b.op("Split", [qkv, b.ints([D, D, D], "qkv_split")], out=["q_flat", "k_flat", "v_flat"], n_out=3, axis=-1)
    heads = b.ints([0, 0, nh, hd], "heads_shape")
    perm = [0, 2, 1, 3]
    q = b.op("Reshape", [q, heads], name="q/Reshape", out="q_nthd")
    q = b.op("Transpose", [q], name="q/Transpose", out="q_unscaled", perm=perm)
    q = b.op("Mul", [q, b.scalar(hd**-0.5, "attn_scale")], name="q/Mul_scale", out="q")
    k = b.op("Reshape", [k, heads], name="k/Reshape", out="k_nthd")
    kt = b.op("Transpose", [k], name="k/Transpose", out="key_t", perm=[0, 2, 3, 1])
    v = b.op("Reshape", [v, heads], name="v/Reshape", out="v_nthd")
    v = b.op("Transpose", [v], name="v/Transpose", out="v", perm=perm)
    scores = b.op("MatMul", [q, kt], name="scores/MatMul", out="scores")
    probs = b.to_model(b.op("Softmax", [b.to_float(scores)], out="probs", axis=-1))
    ctx = b.op("MatMul", [probs, v], name="context/MatMul", out="context_heads")
    ctx = b.op("Transpose", [ctx], name="context/Transpose", out="context_nthd", perm=perm)
    ctx = b.op("Reshape", [ctx, b.ints([0, 0, D], "merge_heads_shape")], name="context/Reshape", out="context")
    return _linear(b, ctx, f"{pre}.out_proj", weights, D, D, "out_proj")


#   gelu_pytorch_tanh: 0.5 x (1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2)))
#   This factored form never forms x^3, so float16 overflow only drives tanh to +-1, its right limit; it is
#   also the form ORT's FastGeluFusion matches (x*0.044715*x + 1, times x*sqrt(2/pi); tanh + 1, times x*0.5).
def _gelu_tanh(b: GraphBuilder, x: str) -> str:
    a = b.op("Mul", [x, b.scalar(0.044715, "gelu_c")], name="Mul_c", out="x_c")
    a = b.op("Mul", [a, x], name="Mul_x_c_x", out="x_sq_c")
    a = b.op("Add", [a, b.scalar(1.0, "one")], name="Add_one_poly", out="poly")
    s = b.op("Mul", [x, b.scalar(float(np.sqrt(2.0 / np.pi)), "sqrt_2_over_pi")], name="Mul_sqrt_2_pi", out="x_s")
    inner = b.op("Mul", [s, a], name="Mul_inner", out="inner")
    t = b.op("Tanh", [inner], out="tanh")
    t = b.op("Add", [t, b.scalar(1.0, "one")], name="Add_one", out="one_plus_tanh")
    half = b.op("Mul", [x, b.scalar(0.5, "half")], name="Mul_half", out="half_x")
    return b.op("Mul", [half, t], name="Mul_out", out="output")


#   x [N,T,D] --Linear D->H--GELU(erf)--Linear H->H--> [N,T,H]
#   GELU(x) = 0.5 x (1 + erf(x / sqrt 2))  (ORT fuses it into Gelu)
def _projector(b: GraphBuilder, x: str, weights: Mapping[str, np.ndarray], D: int, H: int) -> str:
    x = _linear(b, x, f"{PROJECTOR}.0", weights, D, H, "0")
    with b.scope("1"):
        e = b.op("Div", [x, b.scalar(float(np.sqrt(2.0)), "sqrt2")], out="x_div_sqrt2")
        e = b.op("Erf", [e], out="erf")
        e = b.op("Add", [e, b.scalar(1.0, "one")], out="one_plus_erf")
        e = b.op("Mul", [x, e], name="Mul_x", out="x_one_plus_erf")
        x = b.op("Mul", [e, b.scalar(0.5, "half")], name="Mul_half", out="output")
    return _linear(b, x, f"{PROJECTOR}.2", weights, H, H, "2")
