"""Decoder forms: which of a bundle's decoder graph forms runs on a device.

A quantized bundle may carry its decoders in two graph forms (``rsedge export --target cpu --also-target jp6.1``):
``ort`` (MatMulNBits, onnxruntime) and ``qdq`` (explicit DequantizeLinear, what TensorRT consumes). The first form
sits where a one-form bundle has it (``graphs.decoder``, ``compute_dtype``, ``quantization``, ``runtime``,
``validation``), so an rsedge that knows nothing of forms runs it as before; ``forms`` lists both by name, the
second with its own decoder record and those fields. :func:`form_manifest` is the manifest as a one-form bundle of
the chosen form: everything downstream (sessions, engines, the TensorRT check, the estimate) reads that view.

Torch-free, like the rest of the runtime.
"""

from __future__ import annotations

from typing import Any

from rsedge.errors import BundleError

# The fields a form has of its own; the rest of the manifest (vision, arrays, tokenizer, router) is shared.
FORM_FIELDS = ("compute_dtype", "quantization", "runtime", "validation")
# The form each way of running prefers: onnxruntime's CPU and CUDA providers run MatMulNBits, TensorRT (its
# onnxruntime provider or rsedge build-engines' engines) parses explicit Q/DQ and not MatMulNBits.
DEVICE_FORMS = {"cpu": "ort", "cuda": "ort", "tensorrt": "qdq", "tensorrt-engine": "qdq"}


def carried(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Form name -> its ``forms`` entry; empty for a one-form bundle (every bundle before forms)."""
    forms = manifest.get("forms")
    return forms if isinstance(forms, dict) else {}


def primary(manifest: dict[str, Any]) -> str | None:
    """The form whose decoders are ``graphs.decoder`` (None for a one-form bundle)."""
    return next((name for name, entry in carried(manifest).items() if entry.get("primary")), None)


def form_for_device(manifest: dict[str, Any], device: str) -> str | None:
    """The form ``device`` runs ("cpu", "cuda", "tensorrt", "tensorrt-engine"): its preferred form where the bundle
    carries it, else the first; None for a one-form bundle."""
    forms = carried(manifest)
    if not forms:
        return None
    want = DEVICE_FORMS.get(device)
    return want if want in forms else primary(manifest)


def form_manifest(manifest: dict[str, Any], form: str) -> dict[str, Any]:
    """``manifest`` as a one-form bundle of ``form``: the same object for the first form, else a shallow copy whose
    decoder record and form fields are the second form's."""
    forms = carried(manifest)
    entry = forms.get(form)
    if not isinstance(entry, dict):
        raise BundleError(f"the bundle carries no {form} form (it carries {', '.join(forms) or 'one form'})")
    if entry.get("primary"):
        return manifest
    view = dict(manifest)
    view["graphs"] = {**manifest["graphs"], "decoder": entry.get("decoder")}
    for key in FORM_FIELDS:
        if key in entry:
            view[key] = entry[key]
        else:  # e.g. no validation: exported with --no-validate
            view.pop(key, None)
    return view
