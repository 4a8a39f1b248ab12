"""``rsedge export``: checkpoint directory -> self-describing, validated bundle folder.

Everything is written into a temporary folder beside the target and moved into place only after
validation passed, so a failed or interrupted export leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from tokenizers import Tokenizer

import rsedge
from rsedge.calibration.calibset import resolve_calibration
from rsedge.errors import OptionError
from rsedge.export.decoder_graph import (
    DECODER_SHARED_BIN,
    EMBED_TOKENS,
    SHARED_KV,
    build_decoder_graph,
    max_positions,
    store_embedding_table,
)
from rsedge.export.onnx_builder import OPSET, save_graph
from rsedge.export.ort_requirements import bundle_runtime
from rsedge.export.prefill_graph import FORM as PREFILL_FORM
from rsedge.export.prefill_graph import build_prefill_graph, prefill_onnx
from rsedge.export.validate import apply_fake_quant, checks_to_json, validate_bundle
from rsedge.export.vision_graph import build_vision_graph
from rsedge.export.weight_store import WeightStore
from rsedge.fsutil import atomic_folder, refuse_existing
from rsedge.models.rsunivlm.config import TASK_TAGS, RSUniVLMConfig
from rsedge.models.rsunivlm.modeling import RSUniVLMForCausalLM
from rsedge.models.rsunivlm.weights import check_finite, checkpoint_files, load_checkpoint_tensors
from rsedge.quantize.calibrate import calibration_routing, calibration_stats
from rsedge.quantize.recipes import QuantPlan, make_recipe
from rsedge.quantize.vision_int8 import quantize_vision
from rsedge.runtime.bundle import FORMAT, FORMAT_VERSION, MANIFEST, sha256_file
from rsedge.runtime.prompt import (
    CHAT_TEMPLATE,
    IMAGE_PLACEHOLDER,
    IMAGE_TOKEN_INDEX,
    SYSTEM_PROMPT,
    TEMPLATE_SPECIALS,
)
from rsedge.runtime.router import IMAGE_COUNTS

PRECISIONS = ("fp32", "fp16", "int8", "int4")
GRAPH_DTYPES = {"fp32": np.float32, "fp16": np.float16}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
ONNX_TYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT64: "int64"}


class NumpyView(Mapping[str, np.ndarray]):
    """Checkpoint tensors seen as float32 numpy, converted on access (the 1B model never sits in RAM twice)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._t = tensors

    def __getitem__(self, name: str) -> np.ndarray:
        return self._t[name].float().numpy()

    def __iter__(self) -> Iterator[str]:
        return iter(self._t)

    def __len__(self) -> int:
        return len(self._t)


def checkpoint_hash(path: Path) -> str:
    """sha256 over config.json and the weight files, in name order."""
    h = hashlib.sha256()
    for f in [path / "config.json", *checkpoint_files(path)]:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def tool_versions() -> dict[str, str]:
    out = {"rsedge": rsedge.__version__}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime", "tokenizers", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def graph_io(model: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    def describe(vi: onnx.ValueInfoProto) -> dict[str, Any]:
        t = vi.type.tensor_type
        dims = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        return {"name": vi.name, "shape": dims, "dtype": ONNX_TYPES.get(t.elem_type, str(t.elem_type))}

    return {"inputs": [describe(v) for v in model.graph.input], "outputs": [describe(v) for v in model.graph.output]}


def parse_router(table: Mapping[str, int] | None, cfg: RSUniVLMConfig) -> dict[str, int]:
    table = dict(cfg.router if table is None else table)
    for tag, expert in table.items():
        if tag not in TASK_TAGS:
            raise OptionError(f"router tag {tag!r} is not a task tag ({' '.join(TASK_TAGS)})")
        if isinstance(expert, bool) or not isinstance(expert, int):
            raise OptionError(f"router sends {tag} to {expert!r}, which is not an expert index (an integer)")
        if not 0 <= expert < cfg.text.num_experts:
            raise OptionError(f"router sends {tag} to expert {expert}; the model has {cfg.text.num_experts}")
    return {k: int(v) for k, v in table.items()}


def quantize_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric INT8 of an embedding table: the runtime dequantizes only the rows it looks up."""
    scales = np.abs(table).max(axis=1) / 127.0
    scales[scales == 0] = 1.0
    q = np.clip(np.rint(table / scales[:, None]), -127, 127).astype(np.int8)
    return q, scales.astype(np.float32)


def write_graphs(
    tmp: Path,
    cfg: RSUniVLMConfig,
    weights: Mapping[str, np.ndarray],
    dtype: type,
    plan: QuantPlan | None,
    progress: Callable[[str], None],
    attention: str = "standard",
    prefill: str = "same",
) -> tuple[dict[str, Any], dict[str, Any], WeightStore]:
    """Vision graph, one decoder graph per expert (and its INT8 prefill twin with ``prefill="int8"``), and the
    raw arrays the runtime reads (embedding, newline)."""
    store = WeightStore(tmp)
    progress("building vision graph")
    # A vision graph headed for static INT8 is calibrated in float32 (onnxruntime's histogram calibrators fail on
    # float16 activations); TensorRT still runs its float layers in fp16 when built with the FP16 flag.
    int8_vision = plan is not None and plan.recipe.vision == "int8"
    vision = build_vision_graph(cfg, weights, store, np.float32 if int8_vision else dtype)
    save_graph(vision, tmp / "vision.onnx")
    graphs: dict[str, Any] = {"vision": {"file": "vision.onnx", **graph_io(vision)}}
    experts: dict[str, Any] = {}
    memo: dict[str, Any] = {}
    for e in range(cfg.text.num_experts):
        progress(f"building decoder graph, expert {e}")
        opset = plan.recipe.opset if plan is not None else OPSET
        dec = build_decoder_graph(cfg, weights, e, store, dtype, quant=plan, opset=opset, attention=attention)
        save_graph(dec, tmp / f"decoder_expert{e}.onnx")
        experts[str(e)] = {"file": f"decoder_expert{e}.onnx", **graph_io(dec)}
        if prefill == "int8":
            save_graph(build_prefill_graph(dec, store, e, memo), tmp / prefill_onnx(e))
            experts[str(e)]["prefill_file"] = prefill_onnx(e)
    graphs["decoder"] = {
        "experts": experts,
        "attention": attention,
        "max_positions": max_positions(cfg),  # portable graphs too: their prefill's scores grow with its square
        "kv_layout": "[batch, kv_heads, seq, head_dim]",
        # "shared": past and present are one [B, kv, capacity, hd] buffer per layer and kind, bound as both;
        # "past-present": present = past + the new rows, a second buffer (the runtime ping-pongs two)
        "kv_cache": "shared" if attention in SHARED_KV else "past-present",
        "logits": "last position only",
    }
    if prefill == "int8":
        graphs["decoder"]["prefill"] = PREFILL_FORM
    # image_newline is read by the runtime, not by a graph: it lives with the decoder's shared weights, so a
    # re-quantized vision graph can replace vision.bin whole.
    store.tensor("model.image_newline", weights["model.image_newline"].astype(dtype), file=DECODER_SHARED_BIN)
    arrays = {"image_newline": store.record("model.image_newline", DECODER_SHARED_BIN)._asdict()}
    if plan is not None and plan.recipe.embeddings == "int8-rows":
        q, scales = quantize_rows(weights[EMBED_TOKENS])
        store.cache[("embed_rows",)] = (q, scales)
        store.tensor(f"{EMBED_TOKENS}.int8", q, file=DECODER_SHARED_BIN)
        store.tensor(f"{EMBED_TOKENS}.scales", scales, file=DECODER_SHARED_BIN)
        arrays["embed_tokens"] = store.record(f"{EMBED_TOKENS}.int8", DECODER_SHARED_BIN)._asdict()
        arrays["embed_scales"] = store.record(f"{EMBED_TOKENS}.scales", DECODER_SHARED_BIN)._asdict()
    else:
        arrays["embed_tokens"] = store_embedding_table(cfg, weights, store, dtype)._asdict()
    return graphs, arrays, store


def copy_tokenizer(checkpoint: Path, tmp: Path, cfg: RSUniVLMConfig) -> dict[str, Any]:
    (tmp / "tokenizer").mkdir()
    for name in TOKENIZER_FILES:
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, tmp / "tokenizer" / name)
    path = tmp / "tokenizer" / "tokenizer.json"
    if not path.is_file():
        raise OptionError(f"{checkpoint}: no tokenizer.json; the runtime needs it")
    tok = Tokenizer.from_file(str(path))
    stop = {cfg.eos_token_id, tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")} - {None}
    return {"file": "tokenizer/tokenizer.json", "stop_token_ids": sorted(stop)}


def export_bundle(
    checkpoint: str | Path,
    out: str | Path,
    precision: str = "fp32",
    router: Mapping[str, int] | None = None,
    validate: bool = True,
    progress: Callable[[str], None] = lambda msg: None,
    block_size: int = 128,
    form: str = "ort",
    compute: str | None = None,
    algorithm: str = "rtn",
    calibration: str | Path = "rs-default",
    vision: str | None = None,
    vision_calibration: str = "percentile",
    attention: str | None = None,
    keep: tuple[str, ...] = (),
    prefill: str = "same",
) -> dict[str, Any]:
    """Export a checkpoint to a bundle folder; returns the manifest.

    ``precision`` is the weights' (fp32, fp16, int8, int4); ``compute`` the graph's activation dtype (fp32 or
    fp16; quantized bundles default to fp32 for the onnxruntime form, fp16 for the TensorRT qdq form).
    ``form`` picks the quantized graph form: "ort" (MatMulNBits) or "qdq" (DequantizeLinear, TensorRT >= 10).
    ``algorithm`` "awq" calibrates INT4/INT8 scales on ``calibration`` ("rs-default": the shipped RS images),
    each item on the expert ``router`` sends it to.
    ``vision`` "int8" quantizes the vision graph with static Q/DQ (the int8 default), "model" keeps it.
    ``keep``: regexes of decoder weight names kept unquantized (recorded in the manifest's recipe).
    ``attention`` "gqa-shared" (onnxruntime's fused GroupQueryAttention over one preallocated KV buffer; the
    default of the MatMulNBits form, which only onnxruntime runs anyway), "gqa" (the same, past and present
    as separate tensors) or "standard" (portable ops; the default everywhere else).
    ``prefill`` "int8" adds to each expert an INT8 prefill twin of its MatMulNBits decoder
    (``rsedge.export.prefill_graph``: the prompt runs through onnxruntime's INT8 GEMM, the answer through the
    decoder); "same" (the default) prefills with the decoder itself.
    """
    if precision not in PRECISIONS:
        raise OptionError(f"unknown precision {precision!r}; this export writes {', '.join(PRECISIONS)}")
    recipe = make_recipe(
        precision,
        block_size=block_size,
        form=form,
        algorithm=algorithm,
        vision=vision,
        vision_calibration=vision_calibration,
        keep=tuple(keep),
    )
    compute = compute or (precision if recipe is None else ("fp16" if form == "qdq" else "fp32"))
    if compute not in GRAPH_DTYPES or (recipe is None and compute != precision):
        raise OptionError(f"compute dtype {compute!r} does not fit precision {precision!r}")
    attention = attention or ("gqa-shared" if recipe is not None and form == "ort" else "standard")
    if prefill not in ("same", "int8"):
        raise OptionError(f"prefill must be same or int8, got {prefill!r}")
    if prefill == "int8" and (recipe is None or form != "ort" or compute != "fp32"):
        raise OptionError(
            "an INT8 prefill twin needs an INT8/INT4 bundle of the onnxruntime form (--form ort) with fp32 compute "
            "(onnxruntime's DynamicQuantizeMatMul takes float32 activations)"
        )
    checkpoint, out = Path(checkpoint), Path(out)
    refuse_existing(out)
    t_start = time.perf_counter()
    cfg = RSUniVLMConfig.from_checkpoint(checkpoint)
    table = parse_router(router, cfg)
    with atomic_folder(out) as tmp:  # entered first: an unwritable output fails before the checkpoint is read
        progress("reading checkpoint")
        tensors = load_checkpoint_tensors(checkpoint, cfg)
        check_finite(tensors)  # --no-validate too: NaN weights make every answer garbage
        source_hash = checkpoint_hash(checkpoint)  # once: the AWQ cache key and the manifest's record
        plan = QuantPlan(recipe) if recipe is not None else None
        model = None
        calib = resolve_calibration(calibration) if recipe is not None and recipe.needs_calibration else None
        calib_record = None
        if calib is not None:
            # Each item goes to the expert this bundle's router picks, which --router may move.
            routing = calibration_routing(calib, table, cfg.default_expert)
            calib_record = {
                "name": calib.name,
                "sha256": calib.content_hash,
                "items": len(calib.items),
                "per_expert": {str(e): routing.count(e) for e in range(cfg.text.num_experts)},
            }
        if plan is not None and recipe.algorithm == "awq":
            progress("collecting calibration statistics")
            model = RSUniVLMForCausalLM.from_tensors(cfg, tensors)
            tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
            plan.stats, calib_record["statistics_cached"] = calibration_stats(model, tok, calib, source_hash, routing)
        graphs, arrays, store = write_graphs(
            tmp, cfg, NumpyView(tensors), GRAPH_DTYPES[compute], plan, progress, attention, prefill
        )
        if recipe is not None and recipe.vision == "int8":
            progress(f"quantizing the vision graph to INT8 ({recipe.vision_calibration} calibration)")
            quantize_vision(
                tmp / "vision.onnx", tmp / "vision_int8.onnx", calib, cfg.vision.image_size, recipe.vision_calibration
            )
            (tmp / "vision.onnx").unlink()
            (tmp / "vision.bin").unlink()
            vision = onnx.load(str(tmp / "vision_int8.onnx"), load_external_data=False)
            graphs["vision"] = {"file": "vision_int8.onnx", "quantized": "int8-qdq", **graph_io(vision)}
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "architecture": "rsunivlm",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "precision": precision,
            "compute_dtype": compute,
            "quantization": recipe.to_json() if recipe is not None else None,
            "calibration": calib_record,
            "source": {"checkpoint": str(checkpoint.resolve()), "sha256": source_hash},
            "model": cfg.to_manifest(),
            "router": {
                "table": table,
                "default": cfg.default_expert,
                "tags": list(TASK_TAGS),
                "image_counts": {tag: list(n) for tag, n in IMAGE_COUNTS.items()},  # others: one image
                "rule": "the prompt's task tag, anywhere in it, picks its table entry, else default; "
                "two different tags or a tag in lower case are refused",
            },
            "preprocess": _preprocess_spec(cfg),
            "prompt": {
                "template": CHAT_TEMPLATE,
                "system": SYSTEM_PROMPT,
                "specials": list(TEMPLATE_SPECIALS),  # only these become special ids; user text stays text
                "image_placeholder": IMAGE_PLACEHOLDER,
                "image_token_index": IMAGE_TOKEN_INDEX,
            },
            "tokenizer": copy_tokenizer(checkpoint, tmp, cfg),
            "arrays": arrays,
            "graphs": graphs,
            "tools": tool_versions(),
        }
        # The oldest onnxruntime that runs these graphs (the runtime refuses an older one with that reason).
        graph_files = [graphs["vision"]["file"]]
        for entry in graphs["decoder"]["experts"].values():
            graph_files += [entry["file"], *([entry["prefill_file"]] if "prefill_file" in entry else [])]
        manifest["runtime"] = bundle_runtime(tmp / f for f in graph_files)
        if plan is not None and plan.awq:
            manifest["awq"] = plan.summary()
        if validate:
            progress("validating against the PyTorch reference")
            model = model or RSUniVLMForCausalLM.from_tensors(cfg, tensors)
            tensors.clear()  # the reference now holds the weights; do not keep a second copy
            gc.collect()
            if recipe is not None:  # check the graphs compute what their quantized weights define
                apply_fake_quant(model, store.cache)
            manifest["validation"] = checks_to_json(validate_bundle(tmp, manifest, model, precision), precision)
            del model
        manifest["export_seconds"] = round(time.perf_counter() - t_start, 2)
        manifest["files"] = {
            str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _preprocess_spec(cfg: RSUniVLMConfig) -> dict[str, Any]:
    base = {
        "image_size": cfg.vision.image_size,
        "resample": "bicubic",
        "rescale": 1 / 255,
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "tokens_per_tile": cfg.vision.num_patches,
    }
    if cfg.anyres_max_patches is None:
        return {"kind": "square", **base}
    return {"kind": "anyres_max", **base, "pinpoints": cfg.image_grid_pinpoints, "max_patches": cfg.anyres_max_patches}
