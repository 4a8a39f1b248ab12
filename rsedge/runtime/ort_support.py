"""Which onnxruntime a bundle needs, and the refusal of an older one before any session is made.

The exporter lists the graph features a bundle uses that not every onnxruntime runs (contrib ops, their
attributes and dtypes, opset versions) under the manifest's ``runtime`` field, with the oldest onnxruntime
that runs them all. The runtime refuses an older onnxruntime with one line naming the version and the feature,
instead of a traceback from deep inside session creation, or a session that loads and then fails mid-answer.

The versions are measured, not read from release notes: ``scripts/ort_versions.py`` runs bundles of every form
on each onnxruntime release with the CPU provider (Python 3.11 wheels from PyPI) and compares the answers with
the newest release's. ``MIN_SUPPORTED`` is the oldest release that runs FP32 and FP16 bundles and everything this
runtime's own code calls on the CPU (pyproject's ``runtime`` extra requires it); ``MIN_SUPPORTED_GPU`` adds what
the GPU devices pass to their providers (the ``gpu`` extra). GPU kernels were not measured: a CPU kernel's finding
(``CPU_ONLY``) does not bind a GPU device.
"""

from __future__ import annotations

import re
from typing import Any

from rsedge.errors import BundleError

# The oldest onnxruntime this runtime supports at all: it runs FP32 and FP16 bundles (standard attention) and
# every call the CPU runtime makes. pyproject's runtime extra requires it (tests/test_ort_compat.py checks).
MIN_SUPPORTED = "1.15.0"
# onnxruntime-gpu: --device tensorrt passes trt_timing_cache_path, which the TensorRT provider takes from 1.17
# (older releases refuse the session: "Invalid TensorRT EP option"). pyproject's gpu extra requires it.
MIN_SUPPORTED_GPU = "1.17.0"
DEVICE_NEEDS = {"tensorrt": (MIN_SUPPORTED_GPU, "TensorRT provider option trt_timing_cache_path")}

# feature -> (what a person reads, the oldest onnxruntime that runs it with the newest release's answers), CPU
# provider, measured with scripts/ort_versions.py on 1.15.0 to 1.23.2 (the matrix is in the README).
FEATURES: dict[str, tuple[str, str]] = {
    "opset17": ("ONNX opset 17", MIN_SUPPORTED),
    "qdq-int8": ("INT8 QuantizeLinear/DequantizeLinear", MIN_SUPPORTED),
    # 1.15-1.17 refuse IR version 10 (opset 21); 1.18 reads it but has no int4 tensor type
    "opset21": ("ONNX opset 21", "1.18.0"),
    "qdq-int4-blocked": ("INT4 blocked DequantizeLinear", "1.19.0"),
    # 1.17-1.18 have MatMulNBits without the bias input our QKV projection uses
    "matmulnbits-4": ("INT4 MatMulNBits", "1.19.0"),
    "matmulnbits-bias": ("MatMulNBits with a bias input", "1.19.0"),
    # up to 1.21: "Only 4b quantization is supported for MatMulNBits op"
    "matmulnbits-8": ("INT8 MatMulNBits", "1.22.0"),
    # 1.19-1.22 run it on the CPU with wrong results (logits off by 9-33 on the built-in model)
    "matmulnbits-fp16": ("MatMulNBits on float16 activations (CPU)", "1.23.0"),
    # 1.17's CPU kernel takes float16 only; older ones lack the rotary cos/sin inputs
    "gqa": ("float32 GroupQueryAttention", "1.18.0"),
    "gqa-fp16": ("float16 GroupQueryAttention (CPU)", "1.18.0"),
    # An INT8 KV cache (k/v_scale, PER_CHANNEL, kv_cache_bit_width 8) on the CPU: 1.23-1.24 reject the inputs,
    # 1.25-1.26 fail at the first run (CUDA kernels only), 1.27.0-1.32.0 match a float cache within the scales'
    # rounding (a one-layer graph, 2026-11-30)
    "gqa-kv-int8": ("GroupQueryAttention with an INT8 KV cache (CPU)", "1.27.0"),
    # A twin exists only beside an INT4/INT8 MatMulNBits decoder, so its floor was measured with that: the
    # int4-ort-prefill-int8 form runs on 1.19.0 with the 1.23.2 tokens (scripts/ort_versions.py, 2026-11-30)
    "dynamic-quantize-matmul": ("DynamicQuantizeMatMul with a bias (INT8 prefill twins)", "1.19.0"),
    # 1.16.3 rejects the node (no such schema), 1.17.3 runs it (scripts/ort_versions.py, scatter-shared forms)
    "rotary-embedding": ("float32 RotaryEmbedding", "1.17.0"),
    "rotary-embedding-fp16": ("float16 RotaryEmbedding", "1.17.0"),
    "skip-simplified-layernorm": ("SkipSimplifiedLayerNormalization", MIN_SUPPORTED),
    "skip-simplified-layernorm-fp16": ("float16 SkipSimplifiedLayerNormalization", MIN_SUPPORTED),
}
# Kernel-level findings of the CPU provider: a GPU provider runs these nodes with its own kernels, so they do not
# bind --device cuda/tensorrt (whose floor is MIN_SUPPORTED_GPU; features a GPU provider leaves to the CPU, such as
# float32 GroupQueryAttention, still do).
CPU_ONLY = frozenset({"matmulnbits-fp16", "gqa-fp16", "skip-simplified-layernorm-fp16"})
# feature -> releases that fail it although newer and older ones run it
BROKEN: dict[str, tuple[str, ...]] = {
    "skip-simplified-layernorm-fp16": ("1.20.0",),  # "Missing Input" at the first run (fixed in 1.20.1)
}


def parse_version(text: Any) -> tuple[int, ...] | None:
    """(major, minor, patch) of "1.20.1", "1.23.0+cu126", "1.19.0.dev20240101"; None if it has no such prefix."""
    m = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", text) if isinstance(text, str) else None
    if m is None:
        return None
    return tuple(int(g or 0) for g in m.groups())


def _runtime_field(manifest: dict[str, Any], where: str) -> dict[str, Any] | None:
    field = manifest.get("runtime")
    if field is None:
        return None
    bad = BundleError(
        f"{where}: manifest field runtime must hold onnxruntime_min (a version), needs (a reason), features "
        "(a list of names) and onnxruntime_broken (versions to reasons)"
    )
    if not isinstance(field, dict):
        raise bad
    features, broken = field.get("features", []), field.get("onnxruntime_broken", {})
    if parse_version(field.get("onnxruntime_min")) is None or not isinstance(field.get("needs"), str):
        raise bad
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        raise bad
    if not isinstance(broken, dict) or not all(isinstance(v, str) for v in broken.values()):
        raise bad
    return field


def requirement(manifest: dict[str, Any], where: str = "bundle", device: str = "cpu") -> dict[str, Any] | None:
    """What this bundle needs of onnxruntime on ``device``: {"min": version, "needs": reason, "broken": {version:
    reason}}; None for a bundle exported before manifests recorded it.

    On the CPU the recorded minimum is raised to what this runtime's own table says of the features the bundle
    lists, so a bundle exported by an rsedge that knew less is still refused where it would fail. On a GPU device
    the minimum is taken from that table alone, leaving out the CPU kernels' findings (CPU_ONLY).
    """
    field = _runtime_field(manifest, where)
    if field is None:
        return None
    features = [f for f in field.get("features", []) if f in FEATURES]
    if device == "cpu" or not features:
        version, reason = field["onnxruntime_min"], field["needs"]
        broken = dict(field.get("onnxruntime_broken", {}))
    else:
        version, reason, broken = MIN_SUPPORTED, FEATURES["opset17"][0], {}
    for key in features:
        if device != "cpu" and key in CPU_ONLY:
            continue
        label, v = FEATURES[key]
        if parse_version(v) > parse_version(version):
            version, reason = v, label
        for bad in BROKEN.get(key, ()):
            broken.setdefault(bad, label)
    return {"min": version, "needs": reason, "broken": broken}


def refusal(manifest: dict[str, Any], ort_version: str, where: str = "bundle", device: str = "cpu") -> str | None:
    """The one line refusing ``ort_version`` for this bundle on ``device``, or None where it runs it."""
    have = parse_version(ort_version)
    if have is None:  # a build that does not say: let onnxruntime itself decide
        return None
    if device in DEVICE_NEEDS and have < parse_version(DEVICE_NEEDS[device][0]):
        need, why = DEVICE_NEEDS[device]
        return f"--device {device} needs onnxruntime-gpu >= {need} ({why}); this is {ort_version}"
    need = requirement(manifest, where, device)
    if need is None:
        return None
    if have < parse_version(need["min"]):
        return f"this bundle needs onnxruntime >= {need['min']} ({need['needs']}); this is {ort_version}"
    for bad, why in need["broken"].items():
        if parse_version(bad) == have:
            return (
                f"this bundle needs onnxruntime >= {need['min']} other than {bad} ({why} fails in {bad}); "
                f"this is {ort_version}"
            )
    return None


def check_onnxruntime(manifest: dict[str, Any], where: str = "bundle", device: str = "cpu") -> None:
    """BundleError where the installed onnxruntime cannot run this bundle on ``device`` (imports onnxruntime)."""
    import onnxruntime

    problem = refusal(manifest, onnxruntime.__version__, where, device)
    if problem is not None:
        raise BundleError(problem)


def summarize(features: set[str]) -> dict[str, Any]:
    """The manifest's ``runtime`` field for a bundle whose graphs use ``features`` (keys of FEATURES)."""
    unknown = sorted(features - set(FEATURES))
    if unknown:
        raise ValueError(f"features without a measured onnxruntime version: {unknown}")
    chosen = max(sorted(features), key=lambda f: parse_version(FEATURES[f][1]), default="opset17")
    label, version = FEATURES[chosen]
    broken = {
        v: FEATURES[f][0]
        for f in sorted(features)
        for v in BROKEN.get(f, ())
        if parse_version(v) >= parse_version(version)  # an older one is refused by the minimum already
    }
    return {"onnxruntime_min": version, "needs": label, "features": sorted(features), "onnxruntime_broken": broken}
