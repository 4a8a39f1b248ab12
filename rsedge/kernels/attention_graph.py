"""A decoder graph's GroupQueryAttention nodes moved onto rsedge's decode-attention kernel (gqa_decode.c).

The kernel takes com.microsoft::GroupQueryAttention's inputs, outputs and attributes, so the rewrite only changes
each node's domain to ``ai.rsedge`` (and declares that domain): weights, external data and every other node stay as
exported. It applies to the float KV cache with packed QKV (the form rsedge exports for onnxruntime); anything else
keeps onnxruntime's kernel.
"""

from __future__ import annotations

from rsedge.kernels.build import KernelUnavailable

DOMAIN = "ai.rsedge"
ATTRIBUTES = {"num_heads", "kv_num_heads", "scale", "do_rotary", "rotary_interleaved", "local_window_size", "softcap",
              "smooth_softmax"}
FLOAT = 1  # onnx.TensorProto.FLOAT


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
        args = list(node.input)
        if not 7 <= len(args) <= 9 or args[1] or args[2]:
            raise KernelUnavailable(f"{node.name}: the kernel takes packed QKV and at most 9 inputs")
        if inputs.get(args[3]) != FLOAT or inputs.get(args[4]) != FLOAT:
            raise KernelUnavailable(f"{node.name}: the kernel runs a float32 KV cache (this graph's is not)")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if set(attrs) - ATTRIBUTES or attrs.get("local_window_size", -1) != -1 or attrs.get("softcap", 0.0) != 0.0 \
                or attrs.get("smooth_softmax", 0) != 0:
            raise KernelUnavailable(f"{node.name}: attributes the kernel does not implement ({sorted(attrs)})")
        node.domain = DOMAIN
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return model.SerializeToString()
