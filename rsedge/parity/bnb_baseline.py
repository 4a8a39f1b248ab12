"""What a user would do by hand: the reference's decoder linears quantized by bitsandbytes in PyTorch.

LLM.int8 (``Linear8bitLt``, outlier threshold 6.0) and NF4 (``Linear4bit``) replace every decoder Linear
(attention, the three experts, lm_head); the vision tower and connector stay as they are, as they would
in a typical ``load_in_8bit`` / ``load_in_4bit`` load. Only where bitsandbytes imports.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from rsedge.models.rsunivlm.modeling import RSUniVLMForCausalLM

KINDS = ("bnb-int8", "bnb-nf4")


def available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # bitsandbytes raises more than ImportError when its native library will not load
        return False
    return True


def _quantized_linear(linear: nn.Linear, kind: str) -> nn.Module:
    import bitsandbytes as bnb

    w = linear.weight.data.clone()
    bias = linear.bias is not None
    if kind == "bnb-int8":
        q = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False, threshold=6.0
        )
        q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=bias, quant_type="nf4", compute_dtype=torch.float32
        )
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
    if bias:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q.to("cpu")


def quantize_reference(model: RSUniVLMForCausalLM, kind: str) -> tuple[RSUniVLMForCausalLM, float]:
    """A copy of the reference with its decoder linears quantized; returns it and their size in MB."""
    if kind not in KINDS:
        raise ValueError(f"unknown bitsandbytes baseline {kind!r}")
    q = copy.deepcopy(model)
    bits = 8 if kind == "bnb-int8" else 4
    size = 0.0
    for parent in list(q.lm.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, _quantized_linear(child, kind))
                size += child.weight.numel() * bits / 8 / 1e6
    return q.eval(), size
