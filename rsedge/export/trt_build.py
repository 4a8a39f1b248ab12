"""Build TensorRT engines from a bundle's ONNX graphs, on the target device (engines do not move between GPUs).

tensorrt is imported inside the functions, never at module import: this file imports on any machine and raises
TensorRTUnavailable (an RsedgeError) only when a build is asked for where TensorRT is absent. Check a bundle first
with ``rsedge.export.trt_support.check_bundle``: it names what a JetPack target's parser would reject.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rsedge.errors import BundleError, OptionError, RsedgeError
from rsedge.runtime.bundle import Bundle
from rsedge.runtime.engines import ENGINES_JSON, bundle_graphs, manifest_sha256
from rsedge.runtime.engines import FORMAT as ENGINES_FORMAT
from rsedge.runtime.engines import FORMAT_VERSION as ENGINES_FORMAT_VERSION
from rsedge.runtime.trt_session import gpu_identity, import_tensorrt

log = logging.getLogger(__name__)

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)

# Symbolic dims the graph builders give (decoder_graph.BATCH/SEQ/PAST, vision_graph.NUM_IMAGES); repeated here so
# this module stays importable on a Jetson without the export extra (onnx, torch).
BATCH, SEQ, PAST, NUM_IMAGES = "batch_size", "sequence_length", "past_sequence_length", "num_images"


class EngineBuildError(RsedgeError):
    """TensorRT could not parse a graph or build its engine."""


def default_profiles(
    manifest: Mapping[str, Any] | Any, max_prompt: int, max_total: int, max_images: int
) -> dict[str, Profile]:
    """(min, opt, max) shapes of every dynamic input of every graph a bundle manifest names, keyed by graph file.

    Batch is 1 (the runtime decodes one request at a time). The decoder takes 1..max_prompt new tokens after
    0..max_total-1 past ones; opt is tuned for the single-token decode step, which is most of the calls. Vision takes
    1..max_images tiles (anyres bundles send up to max_patches + 1 tiles per image). A Bundle object works too.
    """
    m = getattr(manifest, "manifest", manifest)
    if not 1 <= max_prompt <= max_total:
        raise OptionError(f"need 1 <= max_prompt ({max_prompt}) <= max_total ({max_total})")
    if max_images < 1:
        raise OptionError(f"max_images must be >= 1, got {max_images}")
    ranges = {
        BATCH: (1, 1, 1),
        SEQ: (1, 1, max_prompt),
        PAST: (0, max_total // 2, max_total - 1),  # 0: prefill with an empty cache (TRT takes empty tensors)
        NUM_IMAGES: (1, 1, max_images),
    }
    graphs = m.get("graphs", {})
    io = [graphs["vision"]] if "vision" in graphs else []
    io += [graphs["decoder"]["experts"][k] for k in sorted(graphs.get("decoder", {}).get("experts", {}), key=int)]
    out: dict[str, Profile] = {}
    for g in io:
        prof: Profile = {}
        for inp in g["inputs"]:
            dims = inp["shape"]
            if all(isinstance(d, int) for d in dims):
                continue  # static inputs need no profile entry
            unknown = [d for d in dims if isinstance(d, str) and d not in ranges]
            if unknown:
                raise BundleError(f"{g['file']}: input {inp['name']} has dims {unknown} with no default range")
            lo, opt, hi = (tuple(d if isinstance(d, int) else ranges[d][k] for d in dims) for k in range(3))
            prof[inp["name"]] = (lo, opt, hi)
        out[g["file"]] = prof
    return out


def needs_strong_typing(onnx_path: str | Path) -> bool | None:
    """True when the graph dequantizes INT4/FP8 weights (TRT 10 wants a strongly typed network for those);
    None when onnx is not installed here (then say it explicitly)."""
    try:
        import onnx
        from onnx import TensorProto
    except ImportError:
        return None
    model = onnx.load(str(onnx_path), load_external_data=False)
    low = {TensorProto.INT4, TensorProto.UINT4, TensorProto.FLOAT8E4M3FN}
    typed = {t.name for t in model.graph.initializer if t.data_type in low}
    return any(n.op_type == "DequantizeLinear" and n.input and n.input[0] in typed for n in model.graph.node)


def _graph_has_int8_qdq(onnx_path: Path) -> bool | None:
    try:
        import onnx
        from onnx import TensorProto
    except ImportError:
        return None
    model = onnx.load(str(onnx_path), load_external_data=False)
    int8 = {t.name for t in model.graph.initializer if t.data_type == TensorProto.INT8}
    return any(n.op_type == "DequantizeLinear" and n.input and n.input[0] in int8 for n in model.graph.node)


def _atomic_write(path: Path, data: Any) -> None:
    """Write bytes (or any buffer) beside ``path`` and rename into place: no half-written engine on a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    profile: Mapping[str, tuple[Shape, Shape, Shape]],
    *,
    fp16: bool = True,
    int8: bool = False,
    workspace_gb: float = 2.0,
    timing_cache: Path | None = None,
    strongly_typed: bool | None = None,
) -> Path:
    """Parse ``onnx_path`` (external weights beside it) and serialize a TensorRT engine to ``engine_path``.

    ``fp16``/``int8`` set the builder's precision flags for weakly typed networks; ``int8`` is for graphs that carry
    explicit INT8 Q/DQ (implicit calibration is deprecated since TRT 10.1, and none is offered). A graph with INT4
    Q/DQ is built strongly typed (``strongly_typed=None`` detects it), where the graph's own dtypes decide and the
    precision flags are not set. ``timing_cache`` is read if present and written back after the build.
    """
    return _build_engine(
        onnx_path, engine_path, profile, fp16=fp16, int8=int8, workspace_gb=workspace_gb,
        timing_cache=timing_cache, strongly_typed=strongly_typed,
    )["path"]  # fmt: skip


def _build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    profile: Mapping[str, tuple[Shape, Shape, Shape]],
    *,
    fp16: bool,
    int8: bool,
    workspace_gb: float,
    timing_cache: Path | None,
    strongly_typed: bool | None,
) -> dict[str, Any]:
    """build_engine's work; returns the engine's path, sha256 and size, the profile and the precision flags set."""
    trt = import_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise BundleError(f"{onnx_path}: no such ONNX file")
    if workspace_gb <= 0:
        raise OptionError(f"workspace_gb must be > 0, got {workspace_gb}")
    major = int(trt.__version__.split(".")[0])
    if strongly_typed is None:
        strongly_typed = needs_strong_typing(onnx_path)
        if strongly_typed is None:
            warnings.warn(f"{onnx_path.name}: onnx is not installed, cannot tell whether the graph needs a strongly "
                          "typed network; building weakly typed (pass strongly_typed=True for INT4 graphs)",
                          stacklevel=2)  # fmt: skip
            strongly_typed = False
    if not strongly_typed and not int8 and _graph_has_int8_qdq(onnx_path):
        raise OptionError(f"{onnx_path.name} carries INT8 Q/DQ weights: build it with int8=True")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if major < 10:  # TRT 10 removed implicit batch; before it, ONNX graphs need the explicit-batch flag
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if strongly_typed:
        if not hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
            raise EngineBuildError(f"{onnx_path.name} has INT4/FP8 Q/DQ: needs a strongly typed network, which "
                                   f"TensorRT {trt.__version__} lacks (INT4 needs TensorRT >= 10.0)")  # fmt: skip
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file, not parse(bytes): the parser resolves the external-data .bin files relative to the file.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT {trt.__version__} could not parse {onnx_path.name}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    flags_set = {"fp16": False, "int8": False, "strongly_typed": bool(strongly_typed)}
    if not strongly_typed:  # strongly typed networks take their precisions from the graph, not from flags
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
            flags_set["fp16"] = True
        if int8:
            config.set_flag(trt.BuilderFlag.INT8)
            flags_set["int8"] = True

    opt_profile = builder.create_optimization_profile()
    dynamic = []
    used: dict[str, dict[str, list[int]]] = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        if any(int(d) < 0 for d in t.shape):
            dynamic.append(t.name)
            if t.name not in profile:
                raise OptionError(f"{onnx_path.name}: dynamic input {t.name} {tuple(t.shape)} has no profile entry")
            lo, opt, hi = (tuple(int(d) for d in s) for s in profile[t.name])
            opt_profile.set_shape(t.name, lo, opt, hi)
            used[t.name] = {"min": list(lo), "opt": list(opt), "max": list(hi)}
    if dynamic:
        config.add_optimization_profile(opt_profile)

    cache = None
    if timing_cache is not None:
        timing_cache = Path(timing_cache)
        data = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, ignore_mismatch=False)

    log.info("building %s (TensorRT %s, strongly typed: %s)", onnx_path.name, trt.__version__, strongly_typed)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT {trt.__version__} failed to build {onnx_path.name} (see its log above)")
    data = memoryview(serialized)
    _atomic_write(engine_path, data)
    if cache is not None:
        _atomic_write(timing_cache, config.get_timing_cache().serialize())
    return {
        "path": engine_path,
        "bytes": data.nbytes,
        "sha256": hashlib.sha256(data).hexdigest(),
        "profile": used,
        "precision": flags_set,
    }


def build_bundle(
    bundle_dir: str | Path,
    out_dir: str | Path,
    *,
    max_prompt: int = 1024,
    max_total: int = 2048,
    max_images: int = 1,
    fp16: bool = True,
    workspace_gb: float = 2.0,
    timing_cache: Path | None = None,
    graphs: list[str] | None = None,
) -> dict[str, Path]:
    """Build one engine per graph of a bundle (``<graph>.engine`` in ``out_dir``); returns graph file -> engine.

    Writes ``out_dir/engines.json`` last (``rsedge.runtime.engines``): the bundle's manifest sha256 and graph
    sha256s, the TensorRT version, the GPU's name and compute capability, and each engine's file, sha256, profile
    and precision flags. The runtime checks all of them before it runs an engine. An older engines.json in
    ``out_dir`` is removed first, so a build that fails halfway leaves no record naming half-replaced engines.
    """
    root, out = Path(bundle_dir), Path(out_dir)
    # Every graph and weight file checked against its sha256 first: an engine built from a damaged file would
    # carry the damage past every later check.
    bundle = Bundle.open(root).for_device("tensorrt-engine")  # a two-form bundle's engines are its Q/DQ form's
    manifest = bundle.manifest
    profiles = default_profiles(manifest, max_prompt, max_total, max_images)
    for name in graphs or []:
        if name not in profiles:
            raise OptionError(f"{root} has no graph {name}; it has {', '.join(profiles)}")
    trt = import_tensorrt()
    gpu = gpu_identity()  # before minutes of building: the record needs it, and the runtime checks it
    out.mkdir(parents=True, exist_ok=True)
    (out / ENGINES_JSON).unlink(missing_ok=True)
    quant = manifest.get("quantization") or {}
    int4_qdq = any(
        isinstance(q, dict) and q.get("form") == "qdq" and q.get("bits") == 4
        for q in (quant.get("decoder"), quant.get("lm_head"))
    )
    int8_qdq = any(
        isinstance(q, dict) and q.get("form") == "qdq" and q.get("bits") == 8
        for q in (quant.get("decoder"), quant.get("lm_head"))
    )
    # A static INT8 vision graph (recipe.vision "int8": every JetPack target's) carries explicit INT8 Q/DQ around
    # float layers: weakly typed with the INT8 flag, whatever the decoders' weights are.
    vision_int8 = manifest["graphs"].get("vision", {}).get("quantized") == "int8-qdq"
    built: dict[str, Path] = {}
    entries: dict[str, dict[str, Any]] = {}
    for name in graphs or list(profiles):
        decoder = name != manifest["graphs"].get("vision", {}).get("file")
        engine = out / (Path(name).stem + ".engine")
        info = _build_engine(
            bundle.path(name),
            engine,
            profiles[name],
            fp16=fp16,
            int8=int8_qdq if decoder else vision_int8,
            workspace_gb=workspace_gb,
            timing_cache=timing_cache,
            strongly_typed=decoder and int4_qdq,
        )
        built[name] = info.pop("path")
        entries[name] = {"file": engine.name, "graph_sha256": bundle.files[name].sha256, **info}
    record = {
        "format": ENGINES_FORMAT,
        "format_version": ENGINES_FORMAT_VERSION,
        "bundle": {
            "manifest_sha256": manifest_sha256(bundle),
            "graphs": {g: bundle.files[g].sha256 for g in bundle_graphs(manifest)},
        },
        "tensorrt": trt.__version__,
        "gpu": gpu,
        "build": {
            "max_prompt": max_prompt,
            "max_total": max_total,
            "max_images": max_images,
            "fp16": fp16,
            "workspace_gb": workspace_gb,
        },
        "engines": entries,
    }
    _atomic_write(out / ENGINES_JSON, (json.dumps(record, indent=2) + "\n").encode())
    return built
