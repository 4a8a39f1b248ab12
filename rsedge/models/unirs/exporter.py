"""UniRS's exporter (and plain VILA-1.5's): the VILA-layout config and strict tensors, the reference, four kinds
of graph, the manifest sections (vicuna_v1 prompt, SigLIP preprocessing, eval overrides) and validation. The
generic steps are rsedge.export.driver's.

Graphs, each with its own weight file so the driver's static INT8 pass can replace ``vision`` whole:

- ``vision`` (``vision.onnx``): the SigLIP tower, pixels [N,3,S,S] -> features [N,T,C];
- ``projector`` (``projector.onnx``): ``mlp_downsample``'s single branch, features -> [N,T',H] tokens;
- ``change`` (``change.onnx``, UniRS only): two images' features -> one change map for the projector;
- ``decoder``: one dense LLaMA decoder (``decoder_spec.llama``), ``decoder_expert0``.

An image and each video frame run vision -> projector; a pair runs vision (both) -> change -> projector: one
block.
"""

from __future__ import annotations

import gc
import hashlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from rsedge.errors import ExportValidationError, OptionError
from rsedge.export.decoder_graph import build_decoder_graph, decoder_record, store_embedding_arrays
from rsedge.export.decoder_spec import llama
from rsedge.export.driver import ExportContext, Exporter, ExportOptions, Progress
from rsedge.export.onnx_builder import OPSET, save_graph
from rsedge.export.records import graph_io
from rsedge.export.validate import (
    GraphCheck,
    _run_decoder,
    apply_fake_quant,
    checks_to_json,
    compare,
    float_activation_twin,
    steady_reference,
    validation_image,
)
from rsedge.export.weight_store import WeightStore
from rsedge.models.rsunivlm.weights import checkpoint_files
from rsedge.models.unirs.config import EvalOverrides, UniRSConfig
from rsedge.models.unirs.graphs import (
    PAIR_FEATURES,
    PIXEL_VALUES,
    VISION_BIN,
    VISION_FEATURES,
    build_change_graph,
    build_projector_graph,
    build_tower_graph,
)
from rsedge.models.unirs.modeling import IMAGE_TOKEN_INDEX, UniRSForCausalLM
from rsedge.models.unirs.prompt import STOP, VICUNA_V1
from rsedge.models.unirs.weights import FOLDERS, load_checkpoint_tensors
from rsedge.runtime.bundle import sha256_file

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
    (tmp / "tokenizer").mkdir()
    for name in TOKENIZER_FILES:
        if (checkpoint / "llm" / name).is_file():
            shutil.copy2(checkpoint / "llm" / name, tmp / "tokenizer" / name)
    path = tmp / "tokenizer" / "tokenizer.json"
    if not path.is_file():
        raise OptionError(f"{checkpoint / 'llm'}: no tokenizer.json; the runtime needs it")
    tok = Tokenizer.from_file(str(path))
    stop = {cfg.eos_token_id, tok.token_to_id(STOP)} - {None}
    return {"file": "tokenizer/tokenizer.json", "stop_token_ids": sorted(stop)}


class UniRSExporter(Exporter):
    architecture = "unirs"

    def __init__(self, checkpoint: Path, options: ExportOptions, overrides: EvalOverrides | None = None) -> None:
        super().__init__(checkpoint, options)
        # What the original takes from its command line at evaluation (config.json does not save it).
        self.overrides = overrides or EvalOverrides()

    def check(self) -> None:
        if self.options.router:
            raise OptionError("a UniRS / VILA-1.5 bundle has one dense decoder: it takes no --router")
        if self.options.recipe is not None and self.options.recipe.algorithm == "awq":
            # AWQ's statistics come from RSUniVLM's reference and task-tagged calibration items.
            raise OptionError("AWQ is not built for UniRS bundles yet; use --algorithm rtn")
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

    def collect_statistics(self, ctx: ExportContext, routing: list[int]) -> bool:
        raise OptionError("AWQ is not built for UniRS bundles yet")  # check() refuses it first

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
        ctx.progress("building decoder graph")
        spec = llama(cfg.text)
        opset = plan.recipe.opset if plan is not None else OPSET
        llm = weights["llm"]
        dec = build_decoder_graph(spec, llm, 0, store, dtype, quant=plan, opset=opset, attention=opts.attention)
        save_graph(dec, tmp / "decoder_expert0.onnx")
        graphs["decoder"] = decoder_record(
            spec, {"0": {"file": "decoder_expert0.onnx", **graph_io(dec)}}, opts.attention
        )
        int8_rows = plan is not None and plan.recipe.embeddings == "int8-rows"
        arrays = store_embedding_arrays(spec, llm, store, dtype, int8_rows)
        return graphs, arrays

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
        model = self.reference()
        self.tensors.clear()  # the reference now holds the weights
        gc.collect()
        if ctx.plan is not None:  # the graphs compute what their quantized weights define
            apply_fake_quant(model, ctx.store.cache)
        precision = ctx.options.precision
        with steady_reference(), torch.no_grad():
            checks = _validate(ctx.tmp, manifest, model, precision)
        self.model = None
        return checks_to_json(checks, precision)


def _validate(root: Path, manifest: dict[str, Any], model: UniRSForCausalLM, precision: str) -> list[GraphCheck]:
    """Each vision-side graph on a pair's pixels, then the decoder (prefill of a prompt around the pair's block
    and two decode steps), against the reference."""
    from rsedge.export.validate import _session

    cfg, graphs = model.cfg, manifest["graphs"]
    checks: list[GraphCheck] = []

    def run(key: str, name: str, x: np.ndarray) -> np.ndarray:
        sess = _session(root / graphs[key]["file"])
        want = np.float16 if sess.get_inputs()[0].type == "tensor(float16)" else np.float32
        return sess.run(None, {name: x.astype(want)})[0].astype(np.float32)

    def bound(key: str) -> str:
        if graphs[key].get("quantized"):
            return "vision-int8"
        return "fp16" if manifest["compute_dtype"] == "fp16" else "fp32"

    pixels = np.concatenate([validation_image(cfg.vision.image_size, s) for s in (0, 1)])
    ref_feats = model.vision_features(torch.from_numpy(pixels))
    feats = run("vision", PIXEL_VALUES, pixels)
    checks.append(compare("vision", feats, ref_feats.numpy(), bound("vision")))
    # Each later graph takes the reference's input: a check measures its own error, not its inputs'.
    tokens = run("projector", VISION_FEATURES, ref_feats.numpy())
    ref_tokens = model.mm_projector.single(ref_feats)
    checks.append(compare("projector", tokens, ref_tokens.numpy(), bound("projector")))
    block = ref_tokens[0]
    if "change" in graphs:
        change = run("change", PAIR_FEATURES, ref_feats.numpy())
        ref_change = model.change_features(ref_feats[:1], ref_feats[1:])
        checks.append(compare("change", change, ref_change.numpy(), bound("change")))
        block = model.mm_projector.single(ref_change)[0]

    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.text.vocab_size, size=12).tolist()
    embeds = model.embed_prompt([*ids[:6], IMAGE_TOKEN_INDEX, *ids[6:]], [block])
    next_ids = rng.integers(3, cfg.text.vocab_size, size=2).tolist()
    model.step(embeds[:, :4])  # a throwaway first pass: lazy set-up happens outside the compared ones
    step_embeds = [embeds] + [model.lm.model.embed_tokens(torch.tensor([[t]])) for t in next_ids]
    out = model.step(embeds)
    ref_logits = [out.logits[0, -1].numpy()]
    for emb in step_embeds[1:]:
        out = model.step(emb, out.cache)
        ref_logits.append(out.logits[0, -1].numpy())
    ref = np.stack(ref_logits)
    shared = graphs["decoder"]["kv_cache"] == "shared"
    path = root / graphs["decoder"]["experts"]["0"]["file"]
    with float_activation_twin(path) as twin:
        if twin is not None:
            got, dtype = _run_decoder(twin, cfg, shared, step_embeds)
            checks.append(compare("decoder_expert0-weights", got, ref, "fp32" if dtype == np.float32 else "fp16"))
    checks.append(compare("decoder_expert0", _run_decoder(path, cfg, shared, step_embeds)[0], ref, precision))
    failed = [c for c in checks if not c.passed]
    if failed:
        c = failed[0]
        raise ExportValidationError(
            f"{c.graph} disagrees with the PyTorch reference: max|diff| {c.max_abs:.3g} > {c.limit:.3g} "
            f"or cosine {c.cosine:.6f} < {c.min_cosine} ({precision})"
        )
    return checks
