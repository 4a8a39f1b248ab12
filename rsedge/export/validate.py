"""Post-export validation: every graph of a fresh bundle against the PyTorch reference.

Runs by default; a violation raises ExportValidationError and the caller discards the bundle.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from rsedge.errors import ExportValidationError
from rsedge.export.decoder_graph import LM_HEAD_T
from rsedge.export.kv_cache import float_cache
from rsedge.export.linear_map import LINEAR_MAP, LinearMap
from rsedge.runtime.backends import DecoderSpec
from rsedge.runtime.backends.ort_cpu import OrtCpuDecoder
from rsedge.runtime.sessions import SessionConfig

if TYPE_CHECKING:
    from rsedge.models.rsunivlm.modeling import RSUniVLMForCausalLM

# max|graph - reference| <= atol + rtol * max|reference|, and cosine >= min_cosine
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"atol": 1e-4, "rtol": 2e-5, "min_cosine": 0.99999},
    "fp16": {"atol": 2e-2, "rtol": 2e-2, "min_cosine": 0.999},
    # Quantized graphs are checked against the reference with the same dequantized weights, twice where
    # MatMulNBits rounds activations to int8 (accuracy_level > 0): a float-activation twin of the graph must
    # match as tightly as fp32 (codes, scales and layout exact), then the graph as shipped is bounded in
    # shape: int8 activation rounding grows with a trained model's outlier features (5.7 % of the largest
    # logit on the built-in model's SEG expert, cosine 0.99998), not with any packing error.
    "int8": {"atol": 2e-2, "rtol": 0.1, "min_cosine": 0.999},
    "int4": {"atol": 2e-2, "rtol": 0.1, "min_cosine": 0.999},
    # A statically quantized vision graph has INT8 activations too: no float reference to match bit for bit.
    "vision-int8": {"atol": 5e-2, "rtol": 0.5, "min_cosine": 0.99},
}
ORT_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass
class GraphCheck:
    graph: str
    max_abs: float
    ref_scale: float
    cosine: float
    limit: float
    min_cosine: float
    passed: bool


def compare(graph: str, got: np.ndarray, ref: np.ndarray, precision: str) -> GraphCheck:
    tol = TOLERANCES[precision]
    got64, ref64 = got.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    max_abs = float(np.max(np.abs(got64 - ref64)))
    scale = float(np.max(np.abs(ref64)))
    cos = float(got64 @ ref64 / (np.linalg.norm(got64) * np.linalg.norm(ref64) + 1e-30))
    limit = tol["atol"] + tol["rtol"] * scale
    ok = max_abs <= limit and cos >= tol["min_cosine"]
    return GraphCheck(graph, max_abs, scale, cos, limit, tol["min_cosine"], ok)


def ort_session(path: Path) -> ort.InferenceSession:
    """A CPU onnxruntime session of one graph, warnings off."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def validation_image(size: int, seed: int = 0) -> np.ndarray:
    """A smooth deterministic [1,3,S,S] input in [-1, 1] (random noise would be an unfair test)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    chans = [np.sin(6.3 * (a * xx + b * yy) + c) for a, b, c in rng.uniform(0.2, 2.0, (3, 3))]
    return np.stack(chans)[None].astype(np.float32)


@torch.no_grad()
def apply_fake_quant(model: torch.nn.Module, cache: dict) -> None:
    """Give the reference the dequantized weights the quantized graphs carry: each graph weight split back into
    the reference linears the export's :class:`LinearMap` names (``cache[LINEAR_MAP]``, put there by the
    driver), the per-row INT8 embedding table into its embedding."""
    lmap: LinearMap = cache[LINEAR_MAP]
    untie_lm_head(model, lmap)
    modules = dict(model.named_modules())
    for key, value in cache.items():
        if key[0] == "embed_rows":
            q, scales = value
            model.get_parameter(lmap.embedding).copy_(torch.from_numpy(q.astype(np.float32) * scales[:, None]))
            continue
        if key[0] != "blockwise":
            continue
        name, deq = key[1], value.dequantize()
        entry = lmap.by_graph.get(name)
        if entry is None:
            raise ExportValidationError(f"graph weight {name} is not in the architecture's linear map")
        awq = cache.get(("awq_scales", name))
        if awq is not None:  # the graph divides x by s; fold it back into the reference's weight
            deq = deq / awq[:, None]
        w = torch.from_numpy(deq.T.copy())  # [out, in] as torch stores it
        linears = [modules[m] for m in entry.modules]
        parts = list(w.split([lin.out_features for lin in linears]))
        parts[0] = parts[0] / cache.get(("q_scale", name), 1.0)  # fused-attention graphs carry the scale in q
        for lin, rows in zip(linears, parts, strict=True):
            lin.weight.copy_(rows)


@torch.no_grad()
def untie_lm_head(model: torch.nn.Module, lmap: LinearMap) -> None:
    """Give a tied reference its own lm_head Parameter (a copy of the embedding table).

    A tied model has one Parameter for both, listed once (as the embedding). A quantized bundle gives them
    different values: the runtime looks up per-row INT8 rows, the graph's head multiplies by its own block
    codes (or, with ``--keep lm_head``, by the float table). Untied, the reference can carry each.
    """
    head = model.get_submodule(lmap.by_graph[LM_HEAD_T].modules[0])
    if head.weight is model.get_parameter(lmap.embedding):
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)


@contextmanager
def steady_reference() -> Iterator[None]:
    """Run the PyTorch reference on one thread while it is the yardstick.

    Multi-threaded, the reference's first decoder pass in a process sometimes summed differently on a
    loaded CPU (logits off by 4e-4 in about 1 export in 30, while onnxruntime's output never moved), which
    failed a correct bundle's fp32 check. One thread gives one summation order.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def validate_bundle(
    root: Path, manifest: dict[str, Any], model: RSUniVLMForCausalLM, precision: str, vision: bool = True
) -> list[GraphCheck]:
    """Check vision and every expert's decoder (prefill + 2 decode steps) against the reference. ``vision`` False
    leaves the vision graph out (a bundle's second decoder form shares the first's)."""
    with steady_reference(), torch.no_grad():
        return _validate(root, manifest, model, precision, vision)


def _validate(
    root: Path, manifest: dict[str, Any], model: RSUniVLMForCausalLM, precision: str, vision: bool = True
) -> list[GraphCheck]:
    cfg = model.cfg
    checks: list[GraphCheck] = []
    pixels = np.concatenate([validation_image(cfg.vision.image_size, s) for s in (0, 1)])
    ref_feats = model.encode_images(torch.from_numpy(pixels))
    if vision:
        vis = ort_session(root / manifest["graphs"]["vision"]["file"])
        vin = vis.get_inputs()[0]
        got = vis.run(None, {vin.name: pixels.astype(ORT_NP[vin.type])})[0]
        # A vision graph left in the compute dtype (the INT4 default) is held to that dtype's bound.
        compute = "fp16" if vin.type == "tensor(float16)" else "fp32"
        vision_tol = "vision-int8" if manifest["graphs"]["vision"].get("quantized") else compute
        checks.append(compare("vision", got, ref_feats.numpy(), vision_tol))
        del vis

    # A prompt-shaped prefill: text embeddings around one image's visual tokens.
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.text.vocab_size, size=12).tolist()
    visual = torch.cat([ref_feats[0], model.image_newline[None]])
    embeds = model.embed_prompt([*ids[:6], -200, *ids[6:]], [visual])
    next_ids = rng.integers(0, cfg.text.vocab_size, size=2).tolist()
    model.step(embeds[:, :4], 0)  # a throwaway first pass: lazy set-up happens outside the compared ones
    # Decoders run through the runtime's own session and KV cache: what is validated is what will run.
    shared = manifest["graphs"]["decoder"]["kv_cache"] == "shared"
    step_embeds = [embeds] + [model.lm.model.embed_tokens(torch.tensor([[t]])) for t in next_ids]
    for expert, entry in sorted(manifest["graphs"]["decoder"]["experts"].items(), key=lambda kv: int(kv[0])):
        e = int(expert)
        out = model.step(embeds, e)
        ref_logits = [out.logits[0, -1].numpy()]
        for emb in step_embeds[1:]:
            out = model.step(emb, e, out.cache)
            ref_logits.append(out.logits[0, -1].numpy())
        ref = np.stack(ref_logits)
        checks += decoder_checks(root, entry, f"decoder_expert{e}", cfg, shared, step_embeds, ref, precision)
    raise_on_failure(checks, precision)
    return checks


def decoder_checks(
    root: Path,
    entry: dict[str, Any],
    label: str,
    cfg: Any,
    shared: bool,
    step_embeds: list[torch.Tensor],
    ref: np.ndarray,
    precision: str,
) -> list[GraphCheck]:
    """One decoder graph (a manifest ``experts`` entry) on ``step_embeds`` against the reference's logits ``ref``:
    its float-activation twin first (where MatMulNBits rounds activations: the weights alone, held to the compute
    dtype's bound), the graph as shipped, and its INT8 prefill twin where it has one."""
    checks: list[GraphCheck] = []
    path = root / entry["file"]
    with float_activation_twin(path) as twin:
        if twin is not None:
            got, dtype = run_decoder(twin, cfg, shared, step_embeds)
            bound = "fp32" if dtype == np.float32 else "fp16"  # the compute dtype's bound, as unquantized
            checks.append(compare(f"{label}-weights", got, ref, bound))
    checks.append(compare(label, run_decoder(path, cfg, shared, step_embeds)[0], ref, precision))
    if "prefill_file" in entry:  # the prompt through the INT8 twin, the next tokens through the decoder
        got = run_decoder(path, cfg, shared, step_embeds, prefill=root / entry["prefill_file"])[0]
        checks.append(compare(label.replace("decoder_", "decoder_prefill_", 1), got, ref, precision))
    return checks


def raise_on_failure(checks: list[GraphCheck], precision: str) -> None:
    """ExportValidationError naming the first failed check, in one line."""
    failed = [c for c in checks if not c.passed]
    if failed:
        c = failed[0]
        raise ExportValidationError(
            f"{c.graph} disagrees with the PyTorch reference: max|diff| {c.max_abs:.3g} > {c.limit:.3g} "
            f"or cosine {c.cosine:.6f} < {c.min_cosine} ({precision})"
        )


def run_decoder(
    path: Path, cfg: Any, shared: bool, step_embeds: list[torch.Tensor], prefill: Path | None = None
) -> tuple[np.ndarray, np.dtype]:
    """Logits of a prefill and decode steps through the runtime's own session and KV cache, and its dtype
    (the prefill through ``prefill``, an INT8 twin, where given)."""
    spec = DecoderSpec(cfg.text.num_hidden_layers, cfg.text.num_key_value_heads, cfg.text.head_dim, shared)
    dec = OrtCpuDecoder(path, spec, SessionConfig(), prefill=prefill)
    state = dec.new_state(sum(int(emb.shape[1]) for emb in step_embeds))
    return np.stack([dec.step(emb.numpy(), state).copy() for emb in step_embeds]), dec.dtype


@contextmanager
def float_activation_twin(path: Path) -> Iterator[Path | None]:
    """The graph with every MatMulNBits at accuracy_level 0 (float activations) and a float KV cache (where it was
    INT8), beside it so its external weights resolve: what is left to differ from the fake-quantized reference is
    the weights' rounding alone. None when no node rounds activations. Removed on exit."""
    proto = onnx.load(str(path), load_external_data=False)
    changed = False
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        for attr in node.attribute:
            if attr.name == "accuracy_level" and attr.i > 0:
                attr.i, changed = 0, True
    changed = float_cache(proto) or changed
    if not changed:
        yield None
        return
    twin = path.with_name(f".{path.stem}.float-activations.onnx")
    onnx.save(proto, str(twin))
    try:
        yield twin
    finally:
        twin.unlink(missing_ok=True)


def checks_to_json(checks: list[GraphCheck], precision: str) -> dict[str, Any]:
    return {"tolerance": TOLERANCES[precision], "graphs": [asdict(c) for c in checks]}
