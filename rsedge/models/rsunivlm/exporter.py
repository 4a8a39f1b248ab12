"""RSUniVLM's exporter: its config, strict tensors, reference, graphs (SigLIP + projector, one Qwen2 decoder per
expert), manifest sections (router, ChatML prompt, anyres/square preprocessing) and validation. The generic steps
are rsedge.export.driver's."""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from rsedge.calibration.calibset import CalibrationSet
from rsedge.errors import OptionError
from rsedge.export.decoder_graph import (
    DECODER_SHARED_BIN,
    build_decoder_graph,
    decoder_record,
    store_embedding_arrays,
)
from rsedge.export.decoder_spec import qwen2_experts
from rsedge.export.driver import ExportContext, Exporter, Progress
from rsedge.export.linear_map import LinearMap, decoder_linear_map
from rsedge.export.onnx_builder import OPSET, save_graph
from rsedge.export.prefill_graph import FORM as PREFILL_FORM
from rsedge.export.prefill_graph import build_prefill_graph, prefill_onnx
from rsedge.export.records import copy_tokenizer_files, graph_io
from rsedge.export.validate import apply_fake_quant, checks_to_json, validate_bundle
from rsedge.export.vision_graph import build_vision_graph
from rsedge.export.weight_store import WeightStore
from rsedge.models.rsunivlm.config import TASK_TAGS, RSUniVLMConfig
from rsedge.models.rsunivlm.modeling import RSUniVLMForCausalLM
from rsedge.models.rsunivlm.weights import check_finite, checkpoint_files, load_checkpoint_tensors
from rsedge.quantize.calibrate import calibration_inputs, calibration_routing, calibration_stats
from rsedge.runtime.bundle import sha256_file
from rsedge.runtime.prompt import CHAT_TEMPLATE, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX, SYSTEM_PROMPT, TEMPLATE_SPECIALS
from rsedge.runtime.router import IMAGE_COUNTS

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)


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


def copy_tokenizer(checkpoint: Path, tmp: Path, cfg: RSUniVLMConfig) -> dict[str, Any]:
    tok = copy_tokenizer_files(checkpoint, tmp, TOKENIZER_FILES)
    stop = {cfg.eos_token_id, tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")} - {None}
    return {"file": "tokenizer/tokenizer.json", "stop_token_ids": sorted(stop)}


def preprocess_spec(cfg: RSUniVLMConfig) -> dict[str, Any]:
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


class RSUniVLMExporter(Exporter):
    architecture = "rsunivlm"
    second_forms = True

    def check(self) -> None:
        self.cfg = RSUniVLMConfig.from_checkpoint(self.checkpoint)
        self.table = parse_router(self.options.router, self.cfg)
        self.model: RSUniVLMForCausalLM | None = None

    def load(self, progress: Progress) -> None:
        self.tensors = load_checkpoint_tensors(self.checkpoint, self.cfg)
        check_finite(self.tensors)  # --no-validate too: NaN weights make every answer garbage

    def checkpoint_hash(self) -> str:
        return checkpoint_hash(self.checkpoint)

    def linear_map(self) -> LinearMap:
        return decoder_linear_map(qwen2_experts(self.cfg.text))  # the reference keeps Qwen2 under ``lm``

    def num_experts(self) -> int:
        return self.cfg.text.num_experts

    def calibration_routing(self, calib: CalibrationSet) -> list[int]:
        return calibration_routing(calib, self.table, self.cfg.default_expert)

    def reference(self) -> RSUniVLMForCausalLM:
        if self.model is None:
            self.model = RSUniVLMForCausalLM.from_tensors(self.cfg, self.tensors)
        return self.model

    def collect_statistics(self, ctx: ExportContext, routing: list[int]) -> bool:
        tok = Tokenizer.from_file(str(self.checkpoint / "tokenizer.json"))
        ctx.plan.stats, cached = calibration_stats(
            self.reference(), tok, ctx.calibration, ctx.source_hash, routing, ctx.linear_map
        )
        return cached

    def kv_calibration(self, ctx: ExportContext, routing: list[int]) -> Iterator[tuple[np.ndarray, int]]:
        tok = Tokenizer.from_file(str(self.checkpoint / "tokenizer.json"))
        with torch.no_grad():
            for embeds, expert in calibration_inputs(self.reference(), tok, ctx.calibration, routing):
                yield embeds.float().numpy(), expert

    def vision_graph_size(self) -> int:
        return self.cfg.vision.image_size

    def write_graphs(self, ctx: ExportContext) -> tuple[dict[str, Any], dict[str, Any]]:
        """Vision graph, one decoder graph per expert (and its INT8 prefill twin with ``prefill="int8"``), and the
        raw arrays the runtime reads (embedding, newline)."""
        cfg, opts, plan, tmp = self.cfg, ctx.options, ctx.plan, ctx.tmp
        weights, dtype = NumpyView(self.tensors), opts.dtype
        store = ctx.store = WeightStore(tmp)
        ctx.progress("building vision graph")
        # A vision graph headed for static INT8 is calibrated in float32 (onnxruntime's histogram calibrators fail
        # on float16 activations); TensorRT still runs its float layers in fp16 when built with the FP16 flag.
        int8_vision = plan is not None and plan.recipe.vision == "int8"
        vision = build_vision_graph(cfg, weights, store, np.float32 if int8_vision else dtype)
        save_graph(vision, tmp / "vision.onnx")
        graphs: dict[str, Any] = {"vision": {"file": "vision.onnx", **graph_io(vision)}}
        graphs["decoder"] = self.write_form(ctx)
        # image_newline is read by the runtime, not by a graph: it lives with the decoder's shared weights, so a
        # re-quantized vision graph can replace vision.bin whole.
        store.tensor("model.image_newline", weights["model.image_newline"].astype(dtype), file=DECODER_SHARED_BIN)
        arrays = {"image_newline": store.record("model.image_newline", DECODER_SHARED_BIN)._asdict()}
        int8_rows = plan is not None and plan.recipe.embeddings == "int8-rows"
        arrays |= store_embedding_arrays(cfg, weights, store, dtype, int8_rows)
        return graphs, arrays

    def write_form(self, ctx: ExportContext) -> dict[str, Any]:
        """One decoder graph per expert in ``ctx.options``' form (and its INT8 prefill twin with ``prefill="int8"``),
        weights into ``ctx.store``, files named by it (a second form's store adds the form's suffix); returns the
        ``graphs.decoder`` record."""
        cfg, opts, plan, store = self.cfg, ctx.options, ctx.plan, ctx.store
        name = store.file_name
        weights, dtype = NumpyView(self.tensors), opts.dtype
        experts: dict[str, Any] = {}
        memo: dict[str, Any] = {}
        opset = plan.recipe.opset if plan is not None else OPSET
        for e in range(cfg.text.num_experts):
            ctx.progress(f"building decoder graph, expert {e}")
            dec = build_decoder_graph(cfg, weights, e, store, dtype, quant=plan, opset=opset, attention=opts.attention)
            experts[str(e)] = {"file": name(f"decoder_expert{e}.onnx"), **graph_io(dec)}
            save_graph(dec, ctx.tmp / experts[str(e)]["file"])
            if opts.prefill == "int8":
                experts[str(e)]["prefill_file"] = name(prefill_onnx(e))
                save_graph(build_prefill_graph(dec, store, e, memo), ctx.tmp / experts[str(e)]["prefill_file"])
        record = decoder_record(cfg, experts, opts.attention)
        if opts.prefill == "int8":
            record["prefill"] = PREFILL_FORM
        return record

    def manifest_sections(self, ctx: ExportContext) -> dict[str, Any]:
        return {
            "model": self.cfg.to_manifest(),
            "router": {
                "table": self.table,
                "default": self.cfg.default_expert,
                "tags": list(TASK_TAGS),
                "image_counts": {tag: list(n) for tag, n in IMAGE_COUNTS.items()},  # others: one image
                "rule": "the prompt's task tag, anywhere in it, picks its table entry, else default; "
                "two different tags or a tag in lower case are refused",
            },
            "preprocess": preprocess_spec(self.cfg),
            "prompt": {
                "template": CHAT_TEMPLATE,
                "system": SYSTEM_PROMPT,
                "specials": list(TEMPLATE_SPECIALS),  # only these become special ids; user text stays text
                "image_placeholder": IMAGE_PLACEHOLDER,
                "image_token_index": IMAGE_TOKEN_INDEX,
            },
            "tokenizer": copy_tokenizer(self.checkpoint, ctx.tmp, self.cfg),
        }

    def validate(self, ctx: ExportContext, manifest: dict[str, Any]) -> dict[str, Any]:
        return self.validate_forms([(ctx, manifest)])[0]

    def validate_forms(self, forms: list[tuple[ExportContext, dict[str, Any]]]) -> list[dict[str, Any]]:
        model = self.reference()
        self.tensors.clear()  # the reference now holds the weights; do not keep a second copy
        gc.collect()
        results = []
        for i, (ctx, manifest) in enumerate(forms):
            if ctx.plan is not None:  # check the graphs compute what their quantized weights define
                apply_fake_quant(model, ctx.store.cache)  # each form's own codes replace the form's before
            precision = ctx.options.precision
            checks = validate_bundle(ctx.tmp, manifest, model, precision, vision=i == 0)  # one vision graph
            results.append(checks_to_json(checks, precision))
        self.model = None
        return results
