"""Qwen2.5-VL's exporter: the Hugging Face config and strict tensors, transformers' model as the reference, two
graphs, the manifest sections (ChatML prompt with the vision markers, dynamic-resolution preprocessing, the vision
record, mrope sections) and validation. The generic steps are rsedge.export.driver's.

Graphs:

- ``vision`` (``vision.onnx``, ``vision.bin``): tower + PatchMerger, ``pixel_values`` and the grid feeds ->
  ``image_embeds`` (rsedge.models.qwen2_5_vl.vision); static INT8 (``vision_int8.onnx``, the INT8 recipe's default)
  is calibrated here through the runtime's own preprocessing and grid feeds, not by the driver's square-pixel pass;
- ``decoder``: one dense Qwen2 decoder with multimodal rotary (``decoder_spec.qwen2_5_vl``), ``decoder_expert0``;
  ``--also-target`` adds a second form of it (:meth:`Qwen25VLExporter.write_form`, rsedge.export.forms), except the
  cpu target's, whose INT8 prefill twin is not built here.
"""

from __future__ import annotations

import gc
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from PIL import Image

from rsedge.calibration.calibset import CalibrationSet, resolve_calibration
from rsedge.errors import CheckpointError, ExportValidationError, OptionError
from rsedge.export.decoder_graph import build_decoder_graph, decoder_record, store_embedding_arrays
from rsedge.export.decoder_spec import qwen2_5_vl
from rsedge.export.driver import ExportContext, Exporter, ExportOptions, Progress
from rsedge.export.linear_map import LinearMap, decoder_linear_map
from rsedge.export.onnx_builder import OPSET, save_graph
from rsedge.export.records import copy_tokenizer_files, graph_io
from rsedge.export.validate import (
    ORT_NP,
    GraphCheck,
    apply_fake_quant,
    checks_to_json,
    compare,
    float_activation_twin,
    steady_reference,
)
from rsedge.export.weight_store import WeightStore
from rsedge.models.qwen2_5_vl.config import Qwen25VLConfig
from rsedge.models.qwen2_5_vl.modeling import Qwen25VLReference
from rsedge.models.qwen2_5_vl.vision import build_vision_graph, quantize_vision_graph, vision_config_record
from rsedge.models.qwen2_5_vl.weights import load_checkpoint_tensors
from rsedge.models.safetensors_files import checkpoint_files
from rsedge.runtime.backends import DecoderSpec
from rsedge.runtime.backends.ort_cpu import OrtCpuDecoder
from rsedge.runtime.bundle import sha256_file
from rsedge.runtime.families.qwen2_5_vl_image import PIXEL_VALUES, VisionPreprocess, preprocess, vision_feeds
from rsedge.runtime.mrope import MropePositions, expand_image_tokens, merged_tokens, rope_index
from rsedge.runtime.prompt import CHAT_TEMPLATE, SYSTEM_PROMPT
from rsedge.runtime.sessions import SessionConfig

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
TEMPLATE_SPECIALS = ("<|im_start|>", "<|im_end|>")
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")  # generation_config.json's eos_token_id pair
VISION_INT8 = "vision_int8.onnx"
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}  # preprocessor_config's resample ints


def checkpoint_hash(path: Path) -> str:
    """sha256 over config.json, preprocessor_config.json and the weights, in a fixed order."""
    h = hashlib.sha256()
    for f in [path / "config.json", path / "preprocessor_config.json", *checkpoint_files(path)]:
        if f.is_file():
            h.update(f.name.encode())
            h.update(sha256_file(f).encode())
    return h.hexdigest()


def vision_preprocess(checkpoint: Path) -> VisionPreprocess:
    """The checkpoint's preprocessor_config.json as the runtime's VisionPreprocess (Qwen2.5-VL's defaults where
    it omits a field; transformers 5 writes the pixel bounds as ``size`` {shortest_edge, longest_edge})."""
    path = checkpoint / "preprocessor_config.json"
    raw: dict[str, Any] = {}
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable ({e})") from None
    size = raw.get("size") or {}
    fields = {
        "patch_size": raw.get("patch_size"),
        "temporal_patch_size": raw.get("temporal_patch_size"),
        "merge_size": raw.get("merge_size"),
        "min_pixels": raw.get("min_pixels", size.get("shortest_edge")),
        "max_pixels": raw.get("max_pixels", size.get("longest_edge")),
        "image_mean": raw.get("image_mean"),
        "image_std": raw.get("image_std"),
        "resample": PIL_RESAMPLE.get(raw["resample"], raw["resample"]) if "resample" in raw else None,
        "rescale_factor": raw.get("rescale_factor"),
    }
    return VisionPreprocess.from_manifest({k: v for k, v in fields.items() if v is not None})


def prompt_spec(cfg: Qwen25VLConfig) -> dict[str, Any]:
    return {
        "template_name": "qwen2_5_vl",
        "template": CHAT_TEMPLATE,  # ChatML, as Qwen2.5-VL's chat_template
        "system": SYSTEM_PROMPT,
        "specials": list(TEMPLATE_SPECIALS),
        "image_placeholder": IMAGE_PLACEHOLDER,
        # the pad's id doubles as the splice's sentinel: one per image in the ids, its visual tokens replace it
        "image_token_index": cfg.image_token_id,
        "vision_start_token_id": cfg.vision_start_token_id,
        "vision_end_token_id": cfg.vision_end_token_id,
    }


def copy_tokenizer(checkpoint: Path, tmp: Path, cfg: Qwen25VLConfig) -> dict[str, Any]:
    tok = copy_tokenizer_files(checkpoint, tmp, TOKENIZER_FILES)
    for name, want in (("<|image_pad|>", cfg.image_token_id), ("<|vision_start|>", cfg.vision_start_token_id)):
        if tok.token_to_id(name) != want:
            where = checkpoint / "tokenizer.json"
            raise CheckpointError(f"{where}: {name} is id {tok.token_to_id(name)}, config.json says {want}")
    stop = {cfg.eos_token_id, *(tok.token_to_id(t) for t in STOP_TOKENS)} - {None}
    return {"file": "tokenizer/tokenizer.json", "stop_token_ids": sorted(int(s) for s in stop)}


class Qwen25VLExporter(Exporter):
    architecture = "qwen2_5_vl"
    second_forms = True

    def check(self) -> None:
        if self.options.router:
            raise OptionError("a Qwen2.5-VL bundle has one dense decoder: it takes no --router")
        recipe = self.options.recipe
        if recipe is not None and recipe.algorithm == "awq":
            raise OptionError("AWQ is not built for Qwen2.5-VL bundles yet; use --algorithm rtn")
        if self.options.prefill == "int8":
            hint = " (--target cpu adds one by default; --prefill same leaves it out)"
            hint = hint if self.options.target == "cpu" else ""
            raise OptionError(f"an INT8 prefill twin is not built for Qwen2.5-VL bundles yet{hint}")
        second = self.options.second
        if second is not None and second.prefill == "int8":  # what --also-target cpu brings; no flag drops it
            raise OptionError(
                f"--also-target {second.target}: that target's form carries an INT8 prefill twin, which is not built "
                f"for Qwen2.5-VL bundles yet; make it the first form: --target {second.target} --prefill same "
                f"--also-target {self.options.target}"
            )
        self.cfg = Qwen25VLConfig.from_checkpoint(self.checkpoint)
        self.vision = vision_config_record(self.cfg.vision)
        self.pre = vision_preprocess(self.checkpoint)
        if self.pre.patch_size != self.vision["patch_size"] or self.pre.merge_size != self.vision["spatial_merge_size"]:
            raise CheckpointError(
                f"{self.checkpoint}: preprocessor_config.json's patch/merge sizes ({self.pre.patch_size}, "
                f"{self.pre.merge_size}) are not the vision tower's ({self.vision['patch_size']}, "
                f"{self.vision['spatial_merge_size']})"
            )
        self.spec = qwen2_5_vl(self.cfg.text, self.cfg.mrope_section)
        self.model: Qwen25VLReference | None = None

    def load(self, progress: Progress) -> None:
        self.tensors = load_checkpoint_tensors(self.checkpoint, self.cfg)
        for name, t in self.tensors.items():  # --no-validate too: NaN weights make every answer garbage
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise OptionError(f"{self.checkpoint}: tensor {name} has non-finite values")

    def checkpoint_hash(self) -> str:
        return checkpoint_hash(self.checkpoint)

    def linear_map(self) -> LinearMap:
        return decoder_linear_map(self.spec)  # validation sees the language model under ``lm`` (_LMView)

    def calibration_set(self, name_or_path: str | Path) -> CalibrationSet:
        """Any set: RTN reads no prompts (AWQ is refused), so only the vision graph's static INT8 reads a set,
        and only its images."""
        return resolve_calibration(name_or_path)

    def collect_statistics(self, ctx: ExportContext, routing: list[int]) -> bool:
        raise OptionError("AWQ is not built for Qwen2.5-VL bundles yet")  # check() refuses it first

    def write_graphs(self, ctx: ExportContext) -> tuple[dict[str, Any], dict[str, Any]]:
        opts, plan, tmp = ctx.options, ctx.plan, ctx.tmp
        dtype = np.dtype(opts.dtype).name
        store = ctx.store = WeightStore(tmp)
        ctx.progress("building vision graph")
        # A vision graph headed for static INT8 is built and calibrated in float32, as the other exporters do.
        int8_vision = plan is not None and plan.recipe.vision == "int8"
        vision_dtype = "float32" if int8_vision else dtype
        graphs: dict[str, Any] = {
            "vision": build_vision_graph(
                self.tensors, self.vision, tmp, "vision", vision_dtype, store=store, file="vision.bin"
            )
        }
        if int8_vision:  # the driver's own pass feeds square pixels to a one-input graph, which this is not
            method = plan.recipe.vision_calibration
            ctx.progress(f"quantizing the vision graph to INT8 ({method} calibration)")
            dst = quantize_vision_graph(
                tmp / "vision.onnx", tmp / VISION_INT8, ctx.calibration, self.pre, self.vision, method
            )
            (tmp / "vision.onnx").unlink()
            (tmp / "vision.bin").unlink()
            graphs["vision"] = {
                "file": VISION_INT8,
                "quantized": "int8-qdq",
                **graph_io(onnx.load(str(dst), load_external_data=False)),
            }
        weights = self.language_weights()
        graphs["decoder"] = self.write_form(ctx, weights)
        int8_rows = plan is not None and plan.recipe.embeddings == "int8-rows"
        arrays = store_embedding_arrays(self.spec, weights, store, dtype, int8_rows)
        return graphs, arrays

    def language_weights(self) -> dict[str, np.ndarray]:
        """The language model's tensors (everything but ``visual.*``) as float32 numpy."""
        return {k: v.float().numpy() for k, v in self.tensors.items() if not k.startswith("visual.")}

    def write_form(self, ctx: ExportContext, weights: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
        """The decoder graph in ``ctx.options``' form, weights into ``ctx.store``, its file named by it (a second
        form's store adds the form's suffix); returns the ``graphs.decoder`` record. ``weights``: the language
        model's (:meth:`language_weights` when not given)."""
        opts, plan, store = ctx.options, ctx.plan, ctx.store
        weights = self.language_weights() if weights is None else weights
        ctx.progress("building decoder graph")
        opset = plan.recipe.opset if plan is not None else OPSET
        dtype = np.dtype(opts.dtype).name
        dec = build_decoder_graph(
            self.spec, weights, 0, store, dtype, quant=plan, opset=opset, attention=opts.attention
        )
        experts = {"0": {"file": store.file_name("decoder_expert0.onnx"), **graph_io(dec)}}
        save_graph(dec, ctx.tmp / experts["0"]["file"])
        record = decoder_record(self.spec, experts, opts.attention)
        record["rope"] = {"kind": "mrope", "input": "rope_position_ids", "sections": list(self.spec.mrope_section)}
        return record

    def manifest_sections(self, ctx: ExportContext) -> dict[str, Any]:
        return {
            "model": self.cfg.to_manifest(),
            # No router: one dense decoder. The section keeps the generic runtime's reading of it (warmup).
            "router": {"table": {}, "default": 0, "tags": [], "rule": "no router: one dense decoder"},
            "preprocess": self.pre.to_manifest(),
            "vision": self.vision,
            "prompt": prompt_spec(self.cfg),
            "tokenizer": copy_tokenizer(self.checkpoint, ctx.tmp, self.cfg),
            "reference": {"transformers": "Qwen2_5_VLForConditionalGeneration", "attention": "eager"},
        }

    def reference(self) -> Qwen25VLReference:
        if self.model is None:
            self.model = Qwen25VLReference.from_tensors(self.checkpoint, self.cfg, self.tensors)
        return self.model

    def validate(self, ctx: ExportContext, manifest: dict[str, Any]) -> dict[str, Any]:
        return self.validate_forms([(ctx, manifest)])[0]

    def validate_forms(self, forms: list[tuple[ExportContext, dict[str, Any]]]) -> list[dict[str, Any]]:
        ref = self.reference()
        self.tensors.clear()  # the reference now holds the weights
        gc.collect()
        results = []
        for i, (ctx, manifest) in enumerate(forms):
            if ctx.plan is not None:  # the graphs compute what their quantized weights define
                apply_fake_quant(_LMView(ref), ctx.store.cache)  # each form's own codes replace the form's before
            precision = ctx.options.precision
            with steady_reference(), torch.no_grad():  # one vision graph, the first form's
                checks = _validate(ctx.tmp, manifest, ref, self.pre, precision, vision=i == 0)
            results.append(checks_to_json(checks, precision))
        self.model = None
        return results


class _LMView(torch.nn.Module):
    """The reference's language model where :meth:`Qwen25VLExporter.linear_map` names it (``lm.model.*``,
    ``lm.lm_head``): the same modules, so the fake-quantized weights land in transformers' model."""

    def __init__(self, ref: Qwen25VLReference) -> None:
        super().__init__()
        self.cfg = ref.cfg
        self.lm = torch.nn.Module()
        self.lm.model = ref.model.model.language_model
        self.lm.lm_head = ref.model.lm_head


def validation_image(width: int, height: int) -> Image.Image:
    """A smooth deterministic RGB image (random noise would be an unfair test of a resampling pipeline)."""
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([np.sin(6.0 * xx + 1.0), np.cos(4.0 * yy - 0.5), np.sin(3.0 * (xx + yy))], axis=-1)
    return Image.fromarray(((rgb + 1.0) * 127.5).astype(np.uint8), "RGB")


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_decoder(
    path: Path, cfg: Qwen25VLConfig, shared: bool, feeds: MropePositions, steps: list[np.ndarray]
) -> tuple[np.ndarray, np.dtype]:
    """Logits of a prefill and decode steps through the runtime's own session, KV cache and rotary feeds."""
    t = cfg.text
    spec = DecoderSpec(t.num_hidden_layers, t.num_key_value_heads, t.head_dim, shared)
    dec = OrtCpuDecoder(path, spec, SessionConfig())
    state = dec.new_state(sum(int(s.shape[1]) for s in steps))
    state.extra_inputs = feeds
    return np.stack([dec.step(s, state).copy() for s in steps]), dec.dtype


def _validate(
    root: Path,
    manifest: dict[str, Any],
    ref: Qwen25VLReference,
    pre: VisionPreprocess,
    precision: str,
    vision: bool = True,
) -> list[GraphCheck]:
    """The vision graph on a non-square image, then the decoder (prefill of a prompt around its tokens, at their
    rotary positions, and two decode steps), against transformers' model. ``vision`` False checks the decoder
    alone (a bundle's second decoder form shares the first's vision graph)."""
    cfg, graphs, model = ref.cfg, manifest["graphs"], ref.model
    compute = "fp16" if manifest["compute_dtype"] == "fp16" else "fp32"
    checks: list[GraphCheck] = []

    pixels, grid, _ = preprocess(validation_image(150, 96), pre)
    image_ref = model.model.get_image_features(torch.from_numpy(pixels), torch.from_numpy(grid)).pooler_output[0]
    if vision:
        sess = _session(root / graphs["vision"]["file"])
        types = {i.name: ORT_NP.get(i.type) for i in sess.get_inputs()}
        feeds = {PIXEL_VALUES: pixels, **vision_feeds(grid, manifest["vision"])}
        got = sess.run(None, {k: v.astype(types[k]) if types[k] is not None else v for k, v in feeds.items()})[0]
        vision_bound = "vision-int8" if graphs["vision"].get("quantized") else compute
        checks.append(compare("vision", got.astype(np.float32), image_ref.numpy(), vision_bound))
        del sess

    rng = np.random.default_rng(0)
    text = rng.integers(3, min(cfg.text.vocab_size, cfg.image_token_id), size=10).tolist()
    merge = cfg.spatial_merge_size
    ids = [*text[:4], cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id, *text[4:]]
    ids = expand_image_tokens(ids, [merged_tokens(grid[0], merge)], cfg.image_token_id)
    positions, delta = rope_index(ids, grid.tolist(), cfg.image_token_id, merge)
    rope = MropePositions(positions, delta)
    input_ids = torch.tensor([ids])
    embed = model.model.language_model.embed_tokens
    embeds = embed(input_ids)
    embeds[input_ids == cfg.image_token_id] = image_ref  # the reference's own image rows: the decoder's own error
    next_ids = rng.integers(3, cfg.text.vocab_size, size=2).tolist()
    whole = torch.cat([embeds, embed(torch.tensor([next_ids]))], dim=1)
    all_positions = torch.from_numpy(rope(0, whole.shape[1])["rope_position_ids"])
    logits = model(inputs_embeds=whole, position_ids=all_positions).logits[0]
    n = len(ids)
    want = logits[n - 1 : n + 2].numpy()
    steps = [embeds.numpy(), *(embed(torch.tensor([[t]])).numpy() for t in next_ids)]
    shared = graphs["decoder"]["kv_cache"] == "shared"
    path = root / graphs["decoder"]["experts"]["0"]["file"]
    with float_activation_twin(path) as twin:
        if twin is not None:
            got_twin, dtype = run_decoder(twin, cfg, shared, rope, steps)
            bound = "fp32" if dtype == np.float32 else "fp16"
            checks.append(compare("decoder_expert0-weights", got_twin, want, bound))
    checks.append(compare("decoder_expert0", run_decoder(path, cfg, shared, rope, steps)[0], want, precision))
    failed = [c for c in checks if not c.passed]
    if failed:
        c = failed[0]
        raise ExportValidationError(
            f"{c.graph} disagrees with transformers' Qwen2.5-VL: max|diff| {c.max_abs:.3g} > {c.limit:.3g} "
            f"or cosine {c.cosine:.6f} < {c.min_cosine} ({precision})"
        )
    return checks


def export_options(options: dict[str, Any]) -> ExportOptions:
    """The export's options (a None is the option's default)."""
    return ExportOptions(**{k: v for k, v in options.items() if v is not None}).resolve()
