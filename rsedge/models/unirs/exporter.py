"""UniRS's exporter (and plain VILA-1.5's): the VILA-layout config and strict tensors, the reference, four kinds
of graph, the manifest sections (vicuna_v1 prompt, SigLIP preprocessing, eval overrides) and validation. The
generic steps are rsedge.export.driver's.

Graphs, each with its own weight file so the driver's static INT8 pass can replace ``vision`` whole:

- ``vision`` (``vision.onnx``): the SigLIP tower, pixels [N,3,S,S] -> features [N,T,C];
- ``projector`` (``projector.onnx``): ``mlp_downsample``'s single branch, features -> [N,T',H] tokens;
- ``change`` (``change.onnx``, UniRS only): two images' features -> one change map for the projector;
- ``decoder``: one dense LLaMA decoder (``decoder_spec.llama``), ``decoder_expert0``.

An image and each video frame run vision -> projector; a pair runs vision (both) -> change -> projector: one
block. ``prefill="int8"`` (the cpu target) adds the decoder's INT8 prefill twin, as for RSUniVLM. ``--also-target``
writes a second decoder form (:meth:`UniRSExporter.write_form` through the driver's rsedge.export.forms.FormStore);
the vision-side graphs are the first target's, one copy.

Quantization reads the decoder's :meth:`UniRSExporter.linear_map`; AWQ and the static INT8 vision graph calibrate on
UniRS's own set (``rs-default`` means ``rs-default-unirs``), fed through the reference as the bundle's runtime
family will feed the graphs (``rsedge.models.unirs.calibration``).
"""

from __future__ import annotations

import gc
import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from rsedge.calibration.calibset import CalibrationSet
from rsedge.calibration.unirs_set import RS_DEFAULT_UNIRS
from rsedge.errors import OptionError
from rsedge.export.decoder_graph import build_decoder_graph, decoder_record, store_embedding_arrays
from rsedge.export.decoder_spec import llama
from rsedge.export.driver import ExportContext, Exporter, ExportOptions, Progress
from rsedge.export.linear_map import LinearMap, decoder_linear_map
from rsedge.export.onnx_builder import OPSET, save_graph
from rsedge.export.prefill_graph import FORM as PREFILL_FORM
from rsedge.export.prefill_graph import build_prefill_graph, prefill_onnx
from rsedge.export.records import copy_tokenizer_files, graph_io
from rsedge.export.validate import apply_fake_quant, checks_to_json, steady_reference
from rsedge.export.weight_store import WeightStore
from rsedge.models.safetensors_files import checkpoint_files
from rsedge.models.unirs.calibration import calibration_stats
from rsedge.models.unirs.config import EvalOverrides, UniRSConfig
from rsedge.models.unirs.graphs import (
    VISION_BIN,
    build_change_graph,
    build_projector_graph,
    build_tower_graph,
)
from rsedge.models.unirs.modeling import IMAGE_TOKEN_INDEX, UniRSForCausalLM
from rsedge.models.unirs.prompt import STOP, VICUNA_V1
from rsedge.models.unirs.validate import validate_graphs
from rsedge.models.unirs.weights import FOLDERS, load_checkpoint_tensors
from rsedge.runtime.bundle import sha256_file
from rsedge.runtime.families.vila import VilaFamily

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
PROJECTOR_BIN, CHANGE_BIN = "projector.bin", "change.bin"
ASPECT_RATIOS = ("pad", "resize")  # config image_aspect_ratio values the runtime follows


def checkpoint_hash(path: Path) -> str:
    """sha256 over the four config files and every folder's weights, in a fixed order."""
    h = hashlib.sha256()
    files = [path / "config.json"]
    for folder in FOLDERS:
        files += [path / folder / "config.json", *checkpoint_files(path / folder)]
    for f in files:
        h.update(str(f.relative_to(path)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def preprocess_spec(cfg: UniRSConfig) -> dict[str, Any]:
    """SigLIP's processor (384, bicubic, mean/std from the checkpoint); ``pad`` = expand2square with the mean
    colour first (training's ``process_images``), ``resize`` = stretch (the eval scripts)."""
    if cfg.image_aspect_ratio not in ASPECT_RATIOS:
        raise OptionError(f"image_aspect_ratio {cfg.image_aspect_ratio!r} is not built (pad or resize)")
    return {
        "kind": "square",  # one view per image
        "aspect_ratio": cfg.image_aspect_ratio,
        "image_size": cfg.vision.image_size,
        "resample": "bicubic",
        "rescale": 1 / 255,
        "mean": list(cfg.image_mean),
        "std": list(cfg.image_std),
        "tokens_per_image": cfg.tokens_per_image,
    }


def prompt_spec(cfg: UniRSConfig) -> dict[str, Any]:
    return {
        "template_name": cfg.template,
        "template": VICUNA_V1.template,
        "system": VICUNA_V1.system,
        "specials": list(VICUNA_V1.specials),
        "image_placeholder": VICUNA_V1.placeholder,
        "image_separator": VICUNA_V1.image_separator,  # "<image>\n" per video frame
        "image_token_index": IMAGE_TOKEN_INDEX,
        "bos_token_id": cfg.bos_token_id,  # prepended once, before the first chunk (tokenizer_image_token)
        "stop": STOP,
    }


def copy_tokenizer(checkpoint: Path, tmp: Path, cfg: UniRSConfig) -> dict[str, Any]:
    tok = copy_tokenizer_files(checkpoint / "llm", tmp, TOKENIZER_FILES)
    stop = {cfg.eos_token_id, tok.token_to_id(STOP)} - {None}
    return {"file": "tokenizer/tokenizer.json", "stop_token_ids": sorted(stop)}


class UniRSExporter(Exporter):
    architecture = "unirs"
    default_calibration = RS_DEFAULT_UNIRS
    second_forms = True

    def __init__(self, checkpoint: Path, options: ExportOptions, overrides: EvalOverrides | None = None) -> None:
        super().__init__(checkpoint, options)
        # What the original takes from its command line at evaluation (config.json does not save it).
        self.overrides = overrides or EvalOverrides()

    def check(self) -> None:
        if self.options.router:
            raise OptionError("a UniRS / VILA-1.5 bundle has one dense decoder: it takes no --router")
        self.cfg = UniRSConfig.from_checkpoint(self.checkpoint, self.overrides)
        preprocess_spec(self.cfg)  # an aspect ratio the runtime cannot follow fails before any file is read
        self.model: UniRSForCausalLM | None = None

    def load(self, progress: Progress) -> None:
        self.tensors = load_checkpoint_tensors(self.checkpoint, self.cfg)
        for folder, table in self.tensors.items():  # --no-validate too: NaN weights make every answer garbage
            for name, t in table.items():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise OptionError(f"{self.checkpoint / folder}: tensor {name} has non-finite values")

    def checkpoint_hash(self) -> str:
        return checkpoint_hash(self.checkpoint)

    def linear_map(self) -> LinearMap:
        return decoder_linear_map(llama(self.cfg.text))  # the reference keeps its LlamaForCausalLM under ``lm``

    def family(self) -> VilaFamily:
        """The runtime family a bundle of this checkpoint gets, from the manifest sections this exporter writes:
        calibration feeds the reference as that family will feed the graphs."""
        graphs = {"change": {}} if self.cfg.has_change else {}
        view = SimpleNamespace(
            root=self.checkpoint,
            prompt=prompt_spec(self.cfg),
            preprocess=preprocess_spec(self.cfg),
            manifest={"graphs": graphs},
        )
        return VilaFamily(view, Tokenizer.from_file(str(self.checkpoint / "llm" / "tokenizer.json")))

    def calibration_info(self, calib: CalibrationSet) -> dict[str, Any]:
        tasks: dict[str, int] = {}
        for item in calib.items:
            tasks[item.task] = tasks.get(item.task, 0) + 1
        pairs = sum(len(item.images) == 2 and item.task != "video" for item in calib.items)
        return {
            "template": self.cfg.template,
            "tasks": tasks,
            "video_frames": self.cfg.num_video_frames,
            # a VILA-1.5 checkpoint has no change module: its pairs are not fed
            "skipped_pairs": 0 if self.cfg.has_change else pairs,
        }

    def collect_statistics(self, ctx: ExportContext, routing: list[int]) -> bool:
        family = self.family()
        # The eval overrides change what the reference computes on one checkpoint: part of the cache key.
        key = f"{ctx.source_hash}:{json.dumps(asdict(self.overrides), sort_keys=True)}"
        ctx.plan.stats, cached = calibration_stats(
            self.reference(), family, family.tokenizer, ctx.calibration, key, ctx.linear_map, routing
        )
        return cached

    def vision_graph_size(self) -> int:
        return self.cfg.vision.image_size

    def reference(self) -> UniRSForCausalLM:
        if self.model is None:
            self.model = UniRSForCausalLM.from_tensors(self.cfg, self.tensors)
        return self.model

    def write_graphs(self, ctx: ExportContext) -> tuple[dict[str, Any], dict[str, Any]]:
        cfg, opts, plan, tmp = self.cfg, ctx.options, ctx.plan, ctx.tmp
        weights = {f: {k: v.float().numpy() for k, v in t.items()} for f, t in self.tensors.items()}
        dtype = np.dtype(opts.dtype).name
        store = ctx.store = WeightStore(tmp)
        # A vision graph headed for static INT8 is calibrated in float32 (as RSUniVLM's exporter does).
        int8_vision = plan is not None and plan.recipe.vision == "int8"
        parts = [("vision", build_tower_graph, VISION_BIN, "float32" if int8_vision else dtype)]
        parts.append(("projector", build_projector_graph, PROJECTOR_BIN, dtype))
        if cfg.has_change:
            parts.append(("change", build_change_graph, CHANGE_BIN, dtype))
        graphs: dict[str, Any] = {}
        for key, build, file, graph_dtype in parts:
            ctx.progress(f"building {key} graph")
            graph = build(cfg, weights, store, graph_dtype, file=file)
            save_graph(graph, tmp / f"{key}.onnx")
            graphs[key] = {"file": f"{key}.onnx", **graph_io(graph)}
        llm = weights["llm"]
        graphs["decoder"] = self.write_form(ctx, llm)
        int8_rows = plan is not None and plan.recipe.embeddings == "int8-rows"
        arrays = store_embedding_arrays(llama(cfg.text), llm, store, dtype, int8_rows)
        return graphs, arrays

    def write_form(self, ctx: ExportContext, llm: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
        """The decoder graph in ``ctx.options``' form (and its INT8 prefill twin with ``prefill="int8"``), weights
        into ``ctx.store``, files named by it (a second form's store adds the form's suffix); returns the
        ``graphs.decoder`` record. ``llm``: the language model's weights as float32 numpy (read from the checkpoint's
        tensors when not given)."""
        opts, plan, store = ctx.options, ctx.plan, ctx.store
        if llm is None:
            llm = {k: v.float().numpy() for k, v in self.tensors["llm"].items()}
        ctx.progress("building decoder graph")
        spec = llama(self.cfg.text)
        opset = plan.recipe.opset if plan is not None else OPSET
        dtype = np.dtype(opts.dtype).name
        dec = build_decoder_graph(spec, llm, 0, store, dtype, quant=plan, opset=opset, attention=opts.attention)
        expert = {"file": store.file_name("decoder_expert0.onnx"), **graph_io(dec)}
        save_graph(dec, ctx.tmp / expert["file"])
        if opts.prefill == "int8":  # the prompt through onnxruntime's INT8 GEMM (the cpu target's default)
            expert["prefill_file"] = store.file_name(prefill_onnx(0))
            save_graph(build_prefill_graph(dec, store, 0, {}), ctx.tmp / expert["prefill_file"])
        record = decoder_record(spec, {"0": expert}, opts.attention)
        if opts.prefill == "int8":
            record["prefill"] = PREFILL_FORM
        return record

    def manifest_sections(self, ctx: ExportContext) -> dict[str, Any]:
        return {
            "model": self.cfg.to_manifest(),  # has_change, eval_overrides, num_video_frames, aspect ratio
            # No router: one dense decoder. The section keeps the generic runtime's reading of it (warmup).
            "router": {"table": {}, "default": 0, "tags": [], "rule": "no router: one dense decoder"},
            "preprocess": preprocess_spec(self.cfg),
            "prompt": prompt_spec(self.cfg),
            "tokenizer": copy_tokenizer(self.checkpoint, ctx.tmp, self.cfg),
        }

    def validate(self, ctx: ExportContext, manifest: dict[str, Any]) -> dict[str, Any]:
        return self.validate_forms([(ctx, manifest)])[0]

    def validate_forms(self, forms: list[tuple[ExportContext, dict[str, Any]]]) -> list[dict[str, Any]]:
        model = self.reference()
        self.tensors.clear()  # the reference now holds the weights
        gc.collect()
        results = []
        for i, (ctx, manifest) in enumerate(forms):
            if ctx.plan is not None:  # the graphs compute what their quantized weights define
                apply_fake_quant(model, ctx.store.cache)  # each form's own codes replace the form's before
            precision = ctx.options.precision
            with steady_reference(), torch.no_grad():  # the vision-side graphs are one set, the first form's
                checks = validate_graphs(ctx.tmp, manifest, model, precision, vision=i == 0)
            results.append(checks_to_json(checks, precision))
        self.model = None
        return results
