"""Export targets: what graph form, compute dtype and attention each deployment target runs.

``rsedge export MODEL --target T --precision P`` picks the options below instead of a user knowing them;
an explicit option still wins where the target allows it, and a precision the target cannot run is
refused before anything is read. TensorRT targets are checked with the static JetPack check as part of
the export (a bundle that fails it is not left behind). ``--also-target`` adds a second target's decoder form to
the same bundle (:func:`second_form_options`, rsedge.export.forms).

Why these choices (measured, see the README):
- ``cuda``: onnxruntime's CUDA GroupQueryAttention and MatMulNBits take FP16 activations only; its
  shared-buffer GroupQueryAttention disagreed with the CPU kernel on an H200 (onnxruntime-gpu 1.31.1:
  logits cosine 0.18-0.98 from the first step) while past/present as separate tensors matched, so the CUDA
  form binds separate device buffers ("gqa"). The vision tower stays FP16: static INT8 Q/DQ runs on that
  provider as dequantize + FP16 matmul, slower than FP16 and less exact.
- ``cpu``: MatMulNBits with int8 activations and the shared-buffer attention (the fastest CPU form), and
  the vision tower as static INT8 Q/DQ for INT4 too: in FP32 it was 2.7 s of a 6.1 s INT4 request.
  It adds an INT8 prefill twin of each decoder: a 765-token prefill of the full-size INT4 decoder took
  2.5-2.7 s through MatMulNBits and 1.0-1.5 s through DynamicQuantizeMatMul on an AMX Xeon (MLAS runs the
  dense INT8 GEMM on AMX tiles); decode steps stay on the INT4 decoder, the fewest bytes a token.
- JetPack: static INT8 vision as well; TensorRT fuses the Q/DQ into INT8 kernels, and on an 8 GB Orin the
  FP16 tower would be most of the memory.
- JetPack: TensorRT consumes explicit Q/DQ; INT4 weight-only DequantizeLinear needs TensorRT 10 (JetPack
  6.1+), so JetPack 5.1 and 6.0 take FP16 and INT8 only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rsedge.errors import OptionError


@dataclass(frozen=True)
class Target:
    name: str
    engine: str  # "onnxruntime" or "tensorrt"
    precisions: tuple[str, ...]
    form: str  # quantized graph form: "ort" (MatMulNBits) or "qdq" (DequantizeLinear)
    compute: str  # activation dtype of quantized graphs
    attention: str  # decoder attention implementation (rsedge.export.decoder_graph.ATTENTION_IMPLS)
    vision: dict[str, str] = field(default_factory=dict)  # precision -> vision graph choice
    prefill: str = "same"  # "int8": an INT8 prefill twin of each quantized decoder (rsedge.export.prefill_graph)
    jetpack: str | None = None  # the static TensorRT check this target passes (rsedge check-trt --target)

    def options(self, precision: str) -> dict[str, Any]:
        """export_bundle keyword arguments for ``precision`` on this target."""
        if precision not in self.precisions:
            raise OptionError(
                f"target {self.name} cannot run {precision} bundles (it runs {', '.join(self.precisions)})"
            )
        quantized = precision in ("int8", "int4")
        opts: dict[str, Any] = {"precision": precision}
        if quantized:
            opts.update(form=self.form, compute=self.compute, attention=self.attention)
            if precision in self.vision:
                opts["vision"] = self.vision[precision]
            if self.prefill != "same":
                opts["prefill"] = self.prefill
        return opts


_JETPACK_PRECISIONS = {"jp5.1": ("fp32", "fp16", "int8"), "jp6.0": ("fp32", "fp16", "int8")}

TARGETS: dict[str, Target] = {
    "cpu": Target(
        "cpu",
        "onnxruntime",
        ("fp32", "fp16", "int8", "int4"),
        form="ort",
        compute="fp32",
        attention="gqa-shared",
        vision={"int8": "int8", "int4": "int8"},
        prefill="int8",
    ),
    "cuda": Target(
        "cuda",
        "onnxruntime",
        ("fp32", "fp16", "int8", "int4"),
        form="ort",
        compute="fp16",
        attention="gqa",
        vision={"int8": "model", "int4": "model"},
    ),
    **{
        jp: Target(
            jp,
            "tensorrt",
            _JETPACK_PRECISIONS.get(jp, ("fp32", "fp16", "int8", "int4")),
            form="qdq",
            compute="fp16",
            attention="standard",
            vision={"int8": "int8", "int4": "int8"},
            jetpack=jp,
        )
        for jp in ("jp5.1", "jp6.0", "jp6.1", "jp6.2")
    },
}


def target(name: str) -> Target:
    if name not in TARGETS:
        raise OptionError(f"unknown target {name!r}; choose from {', '.join(TARGETS)}")
    return TARGETS[name]


def export_options(name: str, precision: str, explicit: dict[str, Any]) -> dict[str, Any]:
    """The target's options for ``precision``, with the user's explicit (non-None) ones on top; an explicit
    option the target cannot run (e.g. ``--form ort`` for a JetPack) is refused."""
    t = target(name)
    opts = t.options(precision)
    for key, value in explicit.items():
        if value is None:
            continue
        if t.engine == "tensorrt" and key == "form" and value != t.form:
            raise OptionError(f"target {name} runs TensorRT, which takes --form {t.form}, not {value}")
        if key == "prefill" and value == "int8" and t.name != "cpu":
            raise OptionError(f"an INT8 prefill twin runs on the CPU provider; target {name} would not use it")
        if t.engine == "tensorrt" and key == "attention" and value != t.attention:
            raise OptionError(f"target {name} runs TensorRT, which takes the portable attention, not {value}")
        opts[key] = value
    return opts


FORM_NAMES = {"ort": "MatMulNBits, onnxruntime", "qdq": "explicit Q/DQ, TensorRT"}


def second_form_options(first: str | None, also: str, precision: str, first_form: str) -> dict[str, Any]:
    """The export options of the second decoder form ``--also-target`` adds to a ``--target first`` bundle (form,
    compute, attention, prefill: what ``also`` picks; the vision graph stays the first target's). OptionError, before
    any work, for a pair that cannot be one bundle: no first target, a precision ``also`` cannot run, an unquantized
    precision (its one graph form runs on both engines), or two targets of the same form."""
    if first is None:
        raise OptionError(f"--also-target {also} needs --target: the bundle's first form is the first target's")
    t = target(also)
    opts = t.options(precision)  # refuses a precision the target cannot run
    if "form" not in opts:
        raise OptionError(
            f"--also-target {also}: a {precision} bundle has one decoder form, which onnxruntime and TensorRT both "
            f"run; export it once (rsedge check-trt BUNDLE --target {t.jetpack or 'jp6.1'} checks it)"
        )
    if opts["form"] == first_form:
        raise OptionError(
            f"--target {first} and --also-target {also} both take the {first_form} form ({FORM_NAMES[first_form]}); "
            "a bundle carries each form once: export two bundles"
        )
    del opts["precision"]
    opts.pop("vision", None)
    return opts


def check_block_size(name: str | None, precision: str, block_size: int) -> None:
    """OptionError, before any work, where a TensorRT target's INT4 DequantizeLinear cannot take ``block_size``."""
    if name is None or target(name).engine != "tensorrt" or precision != "int4":
        return
    from rsedge.export.trt_support import INT4_BLOCK_SIZES

    if block_size not in INT4_BLOCK_SIZES:
        raise OptionError(
            f"target {name} runs TensorRT, whose INT4 DequantizeLinear takes --block-size "
            f"{' or '.join(map(str, INT4_BLOCK_SIZES))}, not {block_size}"
        )


def tensorrt_check(bundle_dir: Any, name: str, manifest: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The static TensorRT check of a TensorRT target, for the manifest: the JetPack, its TensorRT, whether every
    graph passes, the problems ("graph: issue") and the count of warnings and unverified points; None for an
    onnxruntime target. ``manifest``: the (form's) manifest to check, for a folder whose manifest.json is not
    written yet."""
    t = target(name)
    if t.jetpack is None:
        return None
    from rsedge.export import trt_support as ts

    jp = t.jetpack
    report = ts.check_bundle(bundle_dir, jp) if manifest is None else ts.check_manifest(bundle_dir, manifest, jp)
    issues = [(graph, i) for graph, found in report.items() for i in found]
    return {
        "jetpack": jp,
        "tensorrt": ts.resolve_version(jp),
        "passes": all(ts.passes(found) for found in report.values()),
        "problems": [f"{graph}: {i.op_type}: {i.reason} [{i.node}]" for graph, i in issues if i.severity == ts.ERROR],
        "warnings": sum(i.severity == ts.WARNING for _, i in issues),
        "unverified": sum(i.severity == ts.UNVERIFIED for _, i in issues),
        "graphs": sorted(report),
    }


def check_for_target(bundle_dir: Any, name: str) -> list[str]:
    """Problems the static TensorRT check finds for a TensorRT target (empty: passes, or not TensorRT)."""
    record = tensorrt_check(bundle_dir, name)
    return [] if record is None else record["problems"]
