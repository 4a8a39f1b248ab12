"""A decoder graph's GroupQueryAttention nodes moved onto rsedge's decode-attention kernel (gqa_decode.c).

The kernel takes com.microsoft::GroupQueryAttention's inputs, outputs and attributes, so the rewrite only changes
each node's domain to ``ai.rsedge`` (and declares that domain; an INT8-cache node's op becomes
``GroupQueryAttentionInt8``, as a custom op's types are fixed per name): weights, external data and every other
node stay as exported. It applies to packed QKV over a float32 cache or the INT8 per-channel cache of
``rsedge export --kv-cache int8`` (the forms rsedge exports for onnxruntime); anything else keeps onnxruntime's
kernel.
"""

from __future__ import annotations

from rsedge.kernels.build import KernelUnavailable

DOMAIN = "ai.rsedge"
ATTRIBUTES = {"num_heads", "kv_num_heads", "scale", "do_rotary", "rotary_interleaved", "local_window_size", "softcap",
              "smooth_softmax", "k_quant_type", "v_quant_type", "kv_cache_bit_width"}
FLOAT, INT8 = 1, 3  # onnx.TensorProto.FLOAT, INT8
K_SCALE, V_SCALE = 12, 13  # GroupQueryAttention's quantized-cache scale inputs


def decode_graph(model_bytes: bytes) -> bytes:
    """``model_bytes`` (an ONNX model without its external data) with every GroupQueryAttention on the kernel."""
    try:
        import onnx
        from onnx import helper
    except ImportError:
        raise KernelUnavailable("the onnx package is not installed (pip install onnx)") from None
    model = onnx.ModelProto()
    model.ParseFromString(model_bytes)
    inputs = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    nodes = [n for n in model.graph.node if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"]
    if not nodes:
        raise KernelUnavailable("the decoder graph has no GroupQueryAttention for the kernel to run")
    for node in nodes:
        args = list(node.input) + [""] * max(0, 14 - len(node.input))
        cache = {inputs.get(args[3]), inputs.get(args[4])} if len(node.input) >= 5 else set()
        if cache not in ({FLOAT}, {INT8}):
            raise KernelUnavailable(f"{node.name}: the kernel runs a float32 or int8 KV cache, not this graph's")
        if len(node.input) > 14 or args[1] or args[2] or any(args[9:12]):
            raise KernelUnavailable(f"{node.name}: the kernel takes packed QKV, no position_ids, bias or head sink")
        if (cache == {INT8}) != bool(args[K_SCALE] and args[V_SCALE]):
            raise KernelUnavailable(f"{node.name}: an int8 cache needs k_scale and v_scale inputs")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if set(attrs) - ATTRIBUTES or attrs.get("local_window_size", -1) != -1 or attrs.get("softcap", 0.0) != 0.0 \
                or attrs.get("smooth_softmax", 0) != 0 or attrs.get("kv_cache_bit_width", 8) != 8:
            raise KernelUnavailable(f"{node.name}: attributes the kernel does not implement ({sorted(attrs)})")
        node.domain = DOMAIN
        if cache == {INT8}:  # the kernel's int8-cache op (a custom op's types are fixed per name)
            node.op_type = "GroupQueryAttentionInt8"
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return model.SerializeToString()
