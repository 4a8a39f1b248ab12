"""The generic export driver: options -> recipe -> calibration -> exporter -> graphs -> validation -> atomic write.

What an architecture contributes is an :class:`Exporter` (found through ``rsedge.models.registry``): its config and
tensors, its reference model, its graphs, the manifest sections it owns and its validation. Everything else, the
option rules, the quantization recipe and plan, the calibration set and its per-expert record, the static INT8
vision pass, the onnxruntime requirement, a TensorRT target's static check, a second decoder form's store, plan,
manifest entry and validation (``--also-target``, rsedge.export.forms), the file hashes and the all-or-nothing write,
is here, once.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx

from rsedge.calibration.calibset import RS_DEFAULT, CalibrationSet, resolve_calibration
from rsedge.calibration.readers import CalibrationError
from rsedge.errors import OptionError
from rsedge.export import targets
from rsedge.export.forms import FormStore, graph_listing, weights_record
from rsedge.export.kv_cache import KV_DTYPES, quantize_decoder_caches
from rsedge.export.linear_map import LINEAR_MAP, LinearMap
from rsedge.export.ort_requirements import bundle_runtime
from rsedge.export.records import graph_io, tool_versions
from rsedge.export.weight_store import WeightStore
from rsedge.fsutil import atomic_folder, refuse_existing
from rsedge.quantize.recipes import QuantPlan, Recipe, make_recipe
from rsedge.quantize.vision_int8 import quantize_vision
from rsedge.runtime.bundle import FORMAT, FORMAT_VERSION, MANIFEST, sha256_file
from rsedge.runtime.forms import form_manifest

PRECISIONS = ("fp32", "fp16", "int8", "int4")
GRAPH_DTYPES = {"fp32": np.float32, "fp16": np.float16}
Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportOptions:
    """Every choice an export takes, checked once (:meth:`resolve`) before any file is read.

    ``precision``: the weights' (fp32, fp16, int8, int4); ``compute``: the graphs' activation dtype (quantized
    bundles default to fp32 for the onnxruntime form, fp16 for the TensorRT qdq form). ``form``: "ort"
    (MatMulNBits) or "qdq" (DequantizeLinear, TensorRT >= 10). ``algorithm`` "awq" calibrates INT4/INT8 scales on
    ``calibration`` ("rs-default": the shipped RS images). ``vision`` "int8" quantizes the vision graph with static
    Q/DQ (the int8 default), "model" keeps it. ``keep``: regexes of decoder weight names kept unquantized.
    ``attention``: the decoder's attention form (default "gqa-shared" for the MatMulNBits form, which only
    onnxruntime runs, "standard" elsewhere). ``prefill`` "int8" adds an INT8 prefill twin per decoder graph.
    ``router``: a task-routed model's table, overriding its checkpoint's. ``kv_cache`` "int8" keeps the decoder's
    KV cache as INT8 with per-channel scales calibrated on ``calibration`` (fused attention forms only).
    ``target``: the export target these options were picked for (rsedge.export.targets); a TensorRT target's static
    check runs inside the export. ``also_target``: a second target whose decoder form the bundle carries beside the
    first (rsedge.export.forms); its options are resolved into ``second``.
    """

    precision: str = "fp32"
    router: Mapping[str, int] | None = None
    validate: bool = True
    block_size: int = 128
    form: str = "ort"
    compute: str | None = None
    algorithm: str = "rtn"
    calibration: str | Path = "rs-default"
    vision: str | None = None
    vision_calibration: str = "percentile"
    attention: str | None = None
    keep: tuple[str, ...] = ()
    prefill: str = "same"
    kv_cache: str = "float"
    target: str | None = None
    also_target: str | None = None
    recipe: Recipe | None = field(default=None, compare=False)
    second: ExportOptions | None = field(default=None, compare=False)

    def resolve(self) -> ExportOptions:
        """The options with their defaults filled in and the recipe made; OptionError for a combination no
        target runs."""
        if self.precision not in PRECISIONS:
            raise OptionError(f"unknown precision {self.precision!r}; this export writes {', '.join(PRECISIONS)}")
        recipe = make_recipe(
            self.precision,
            block_size=self.block_size,
            form=self.form,
            algorithm=self.algorithm,
            vision=self.vision,
            vision_calibration=self.vision_calibration,
            keep=tuple(self.keep),
        )
        compute = self.compute or (self.precision if recipe is None else ("fp16" if self.form == "qdq" else "fp32"))
        if compute not in GRAPH_DTYPES or (recipe is None and compute != self.precision):
            raise OptionError(f"compute dtype {compute!r} does not fit precision {self.precision!r}")
        attention = self.attention or ("gqa-shared" if recipe is not None and self.form == "ort" else "standard")
        if self.prefill not in ("same", "int8"):
            raise OptionError(f"prefill must be same or int8, got {self.prefill!r}")
        if self.prefill == "int8" and (recipe is None or self.form != "ort" or compute != "fp32"):
            raise OptionError(
                "an INT8 prefill twin needs an INT8/INT4 bundle of the onnxruntime form (--form ort) with fp32 "
                "compute (onnxruntime's DynamicQuantizeMatMul takes float32 activations)"
            )
        if self.kv_cache not in KV_DTYPES:
            raise OptionError(f"kv cache must be {' or '.join(KV_DTYPES)}, got {self.kv_cache!r}")
        if self.kv_cache == "int8" and (attention not in ("gqa", "gqa-shared") or self.form != "ort"):
            raise OptionError(
                "an INT8 KV cache is onnxruntime's GroupQueryAttention's: it needs --attention gqa-shared or gqa "
                f"(this export's is {attention}) and the onnxruntime form (--form ort)"
            )
        for name in (self.target, self.also_target):
            targets.check_block_size(name, self.precision, self.block_size)
        second = None
        if self.also_target is not None:
            picked = targets.second_form_options(self.target, self.also_target, self.precision, self.form)
            second = ExportOptions(**{
                **self.__dict__, "prefill": "same", "kv_cache": "float", "recipe": None, "second": None,
                "vision": recipe.vision,  # the bundle has one vision graph, the first form's
                **picked, "target": self.also_target, "also_target": None,
            }).resolve()  # fmt: skip
        return ExportOptions(
            **{**self.__dict__, "compute": compute, "attention": attention, "recipe": recipe, "second": second}
        )

    @property
    def dtype(self) -> type:
        return GRAPH_DTYPES[self.compute or self.precision]


@dataclass
class ExportContext:
    """What the driver hands an exporter's hooks: the temporary bundle folder and the export's shared state."""

    tmp: Path
    options: ExportOptions
    plan: QuantPlan | None
    calibration: CalibrationSet | None
    source_hash: str
    progress: Progress
    calib_record: dict[str, Any] | None = None
    store: WeightStore | None = None
    linear_map: LinearMap | None = None  # the exporter's: AWQ's statistics and validation's reference weights


class Exporter(ABC):
    """One architecture's export: subclass, set ``architecture`` (the manifest's), register the class as its model
    package's ``EXPORTER``. One instance per export."""

    architecture: ClassVar[str]
    default_calibration: ClassVar[str] = RS_DEFAULT  # the set "rs-default" means for this architecture
    second_forms: ClassVar[bool] = False  # whether write_form / validate_forms write and check a second form

    def __init__(self, checkpoint: Path, options: ExportOptions) -> None:
        self.checkpoint = checkpoint
        self.options = options

    @abstractmethod
    def check(self) -> None:
        """Read the checkpoint's config and check the options against it (e.g. a router's expert indices), before
        the output folder exists."""

    @abstractmethod
    def load(self, progress: Progress) -> None:
        """Read the tensors (strictly) and refuse non-finite weights."""

    @abstractmethod
    def linear_map(self) -> LinearMap:
        """Which reference linears each quantizable decoder-graph weight stands for (``export.linear_map``): the
        ONE map that AWQ's activation statistics and validation's dequantized reference weights both read."""

    def calibration_set(self, name_or_path: str | Path) -> CalibrationSet:
        """The calibration set ``--calibration`` names ("rs-default": this architecture's built-in set); a set
        made for another architecture's prompts is refused."""
        name = self.default_calibration if str(name_or_path) == RS_DEFAULT else name_or_path
        calib = resolve_calibration(name)
        made_for = calib.info.get("architecture", "rsunivlm")  # sets made before the field are RSUniVLM's
        if made_for != self.architecture:
            raise CalibrationError(
                f"calibration set {calib.name} was made for {made_for} prompts, not {self.architecture}'s; "
                f"use rs-default (the {self.architecture} set) or a set made for {self.architecture}"
            )
        return calib

    def calibration_info(self, calib: CalibrationSet) -> dict[str, Any]:
        """What the manifest's ``calibration`` record adds for this architecture (e.g. items per task)."""
        return {}

    @abstractmethod
    def checkpoint_hash(self) -> str:
        """A digest of the checkpoint's config and weights: the manifest's source record and the AWQ cache key."""

    def calibration_routing(self, calib: CalibrationSet) -> list[int]:
        """The expert each calibration item goes to under this bundle's routing (all 0 for a dense model)."""
        return [0] * len(calib.items)

    def num_experts(self) -> int:
        return 1

    @abstractmethod
    def collect_statistics(self, ctx: ExportContext, routing: list[int]) -> bool:
        """Activation statistics for AWQ into ``ctx.plan.stats``; returns whether they came from the cache."""

    @abstractmethod
    def write_graphs(self, ctx: ExportContext) -> tuple[dict[str, Any], dict[str, Any]]:
        """Every graph and raw array into ``ctx.tmp`` (``ctx.store`` set); returns the manifest's ``graphs`` and
        ``arrays``."""

    def kv_calibration(self, ctx: ExportContext, routing: list[int]) -> Iterator[tuple[np.ndarray, int]]:
        """(inputs_embeds [1, S, H] float32, expert) per calibration item, prompt and answer teacher-forced: what
        calibrates an INT8 KV cache. An architecture without it cannot export ``--kv-cache int8``."""
        raise OptionError(f"{self.architecture}: --kv-cache int8 needs calibration prompts its exporter does not give")

    def vision_graph_size(self) -> int:
        """The side of the vision graph's square input (static INT8 calibration feeds it)."""
        raise NotImplementedError

    def write_form(self, ctx: ExportContext) -> dict[str, Any]:
        """A second decoder form's graphs into ``ctx.tmp`` (``ctx.options``: its options, ``ctx.store``: its
        rsedge.export.forms.FormStore, which names its files); returns its ``graphs.decoder`` record. Only for an
        exporter with ``second_forms``."""
        raise NotImplementedError

    def validate_forms(self, forms: list[tuple[ExportContext, dict[str, Any]]]) -> list[dict[str, Any]]:
        """:meth:`validate` for each (context, one-form manifest) of the bundle's decoder forms, the first form
        first; an exporter with ``second_forms`` checks every form against one reference."""
        if len(forms) != 1:
            raise NotImplementedError(f"{self.architecture}: one decoder form per bundle")
        return [self.validate(*forms[0])]

    @abstractmethod
    def manifest_sections(self, ctx: ExportContext) -> dict[str, Any]:
        """The sections the architecture owns: model, router, preprocess, prompt, tokenizer."""

    @abstractmethod
    def validate(self, ctx: ExportContext, manifest: dict[str, Any]) -> dict[str, Any]:
        """Check every graph in ``ctx.tmp`` against the reference; returns the manifest's ``validation``."""

    def graph_files(self, graphs: dict[str, Any]) -> list[str]:
        """Every ONNX file the manifest names (the onnxruntime requirement reads their ops)."""
        files = [g["file"] for k, g in graphs.items() if "file" in g]
        for entry in graphs.get("decoder", {}).get("experts", {}).values():
            files += [entry["file"], *([entry["prefill_file"]] if "prefill_file" in entry else [])]
        return files


def run_export(exporter: Exporter, out: Path, progress: Progress) -> dict[str, Any]:
    """Drive ``exporter`` into the bundle folder ``out``; returns the manifest. Nothing is left at ``out`` unless
    every step (validation included) passed."""
    opts = exporter.options
    recipe = opts.recipe
    refuse_existing(out)
    t_start = time.perf_counter()
    if opts.second is not None and not exporter.second_forms:
        raise OptionError(f"--also-target: the {exporter.architecture} exporter writes one decoder form per bundle; "
                          "export one bundle per target")  # fmt: skip
    exporter.check()
    with atomic_folder(out) as tmp:  # entered first: an unwritable output fails before the checkpoint is read
        progress("reading checkpoint")
        exporter.load(progress)
        source_hash = exporter.checkpoint_hash()  # once: the AWQ cache key and the manifest's record
        plan = QuantPlan(recipe) if recipe is not None else None
        wants_calibration = (recipe is not None and recipe.needs_calibration) or opts.kv_cache == "int8"
        calib = exporter.calibration_set(opts.calibration) if wants_calibration else None
        ctx = ExportContext(tmp, opts, plan, calib, source_hash, progress, linear_map=exporter.linear_map())
        routing: list[int] = []
        if calib is not None:
            # Each item goes to the expert this bundle's router picks, which --router may move.
            routing = exporter.calibration_routing(calib)
            ctx.calib_record = {
                "name": calib.name,
                "sha256": calib.content_hash,
                "items": len(calib.items),
                "per_expert": {str(e): routing.count(e) for e in range(exporter.num_experts())},
                **exporter.calibration_info(calib),
            }
        if plan is not None and recipe.algorithm == "awq":
            progress("collecting calibration statistics")
            ctx.calib_record["statistics_cached"] = exporter.collect_statistics(ctx, routing)
        graphs, arrays = exporter.write_graphs(ctx)
        if ctx.store is not None:  # validation splits each quantized graph weight back by this map
            ctx.store.cache[LINEAR_MAP] = ctx.linear_map
        second = None
        if opts.second is not None:
            progress(f"building the {opts.second.form} decoder graphs ({opts.second.target})")
            second = second_form_context(ctx, opts.second)
            second_decoder = exporter.write_form(second)
        if opts.kv_cache == "int8":
            progress("calibrating the INT8 KV cache")
            graphs["decoder"]["kv_cache_quantization"] = quantize_decoder_caches(
                tmp, graphs["decoder"], exporter.kv_calibration(ctx, routing)
            )
        # (an exporter whose vision graph takes more than square pixels quantizes it itself and says so)
        if (
            recipe is not None
            and recipe.vision == "int8"
            and "vision" in graphs
            and not graphs["vision"].get("quantized")
        ):
            progress(f"quantizing the vision graph to INT8 ({recipe.vision_calibration} calibration)")
            src = graphs["vision"]["file"]
            quantize_vision(tmp / src, tmp / "vision_int8.onnx", calib, exporter.vision_graph_size(),
                            recipe.vision_calibration)  # fmt: skip
            (tmp / src).unlink()
            (tmp / src).with_suffix(".bin").unlink(missing_ok=True)
            vision = onnx.load(str(tmp / "vision_int8.onnx"), load_external_data=False)
            graphs["vision"] = {"file": "vision_int8.onnx", "quantized": "int8-qdq", **graph_io(vision)}
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "architecture": exporter.architecture,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "precision": opts.precision,
            "compute_dtype": opts.compute,
            "quantization": recipe.to_json() if recipe is not None else None,
            "calibration": ctx.calib_record,
            "source": {"checkpoint": str(exporter.checkpoint.resolve()), "sha256": source_hash},
            **exporter.manifest_sections(ctx),
            "arrays": arrays,
            "graphs": graphs,
            "tools": tool_versions(),
        }
        # The oldest onnxruntime that runs these graphs (the runtime refuses an older one with that reason).
        manifest["runtime"] = bundle_runtime(tmp / f for f in exporter.graph_files(graphs))
        if second is not None:
            manifest["forms"] = form_entries(exporter, ctx, second, second_decoder, graphs, manifest["runtime"])
        # A TensorRT target's static check, before minutes of validation: a bundle that fails it is not left behind.
        for form_opts in (opts, opts.second):
            if form_opts is not None and form_opts.target is not None:
                tensorrt_check_into(manifest, tmp, form_opts, second is not None)
        if plan is not None and plan.awq:
            manifest["awq"] = plan.summary()
        if opts.validate:
            progress("validating against the PyTorch reference")
            if second is None:
                manifest["validation"] = exporter.validate(ctx, manifest)
            else:
                view = form_manifest(manifest, opts.second.form)
                first, other = exporter.validate_forms([(ctx, manifest), (second, view)])
                manifest["validation"], manifest["forms"][opts.second.form]["validation"] = first, other
        manifest["export_seconds"] = round(time.perf_counter() - t_start, 2)
        manifest["files"] = {
            str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        for name, entry in manifest.get("forms", {}).items():  # each form's graphs with their hashes
            entry["graphs"] = graph_listing(tmp, form_manifest(manifest, name)["graphs"]["decoder"], manifest["files"])
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def second_form_context(ctx: ExportContext, options: ExportOptions) -> ExportContext:
    """The context a second decoder form is written and validated in: its options, its own store (files with the
    form's suffix; tensors the first form stored byte for byte are read from the first's files) and a plan that
    shares the first's calibration statistics and AWQ scales, so both forms quantize to the same codes."""
    plan = None
    if ctx.plan is not None:
        plan = QuantPlan(options.recipe, stats=ctx.plan.stats, awq=ctx.plan.awq)
    return replace(ctx, options=options, plan=plan, store=FormStore(ctx.store, options.form))


def form_entries(
    exporter: Exporter,
    ctx: ExportContext,
    second: ExportContext,
    decoder: dict[str, Any],
    graphs: dict[str, Any],
    first_runtime: dict[str, Any],
) -> dict[str, Any]:
    """The manifest's ``forms``: the first form (its decoder stays ``graphs.decoder``) and the second, with the
    decoder record and the fields a one-form manifest of it has (rsedge.runtime.forms)."""
    first, other = ctx.options, second.options
    runtime = bundle_runtime(ctx.tmp / f for f in exporter.graph_files({**graphs, "decoder": decoder}))
    common = lambda o: {  # noqa: E731
        "target": o.target,
        "engine": targets.target(o.target).engine,
        "compute_dtype": o.compute,
        "attention": o.attention,
        "prefill": o.prefill,
    }
    return {
        first.form: {"primary": True, **common(first), "onnxruntime_min": first_runtime["onnxruntime_min"]},
        other.form: {
            **common(other),
            "onnxruntime_min": runtime["onnxruntime_min"],
            "decoder": decoder,
            "quantization": other.recipe.to_json(),
            "runtime": runtime,
            "weights": weights_record(second.store, first.form, first.precision),
        },
    }


def tensorrt_check_into(manifest: dict[str, Any], tmp: Path, options: ExportOptions, two_forms: bool) -> None:
    """Run ``options.target``'s static TensorRT check on its form's graphs (nothing for an onnxruntime target);
    OptionError naming the first problem where it fails, else its record in that form's ``forms`` entry."""
    view = form_manifest(manifest, options.form) if two_forms else manifest
    record = targets.tensorrt_check(tmp, options.target, view)
    if record is None:
        return
    problems = record["problems"]
    if problems:  # the bundle is not left behind: the export's folder is dropped with this error
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        which = f"{options.form} form of the " if two_forms else ""
        raise OptionError(
            f"the {which}{options.precision} bundle fails the {options.target} TensorRT check: {problems[0]}{more}"
        )
    if two_forms:
        manifest["forms"][options.form]["tensorrt_check"] = record
