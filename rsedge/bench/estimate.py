"""``rsedge estimate``: will a bundle fit on a Jetson, and how fast will it run, before anyone flashes a board.

Everything comes from the bundle's manifest (files, arrays, model dimensions, compute dtype, attention form,
graph I/O), the node counts and external data of its ONNX graphs, and the facts in
``rsedge/data/estimate/targets.json`` (the Jetson modules, the H200 measurements, published Jetson figures),
each of which names its source. Every number this module reports is a :func:`quantity`: value, unit, source.

Memory (bytes; Orin's DRAM is shared by CPU and GPU, so host and device terms add up):

- weights: every file onnxruntime reads for the graphs a mission loads (the vision graph and each loaded
  expert: the ``.onnx`` file and its external data, ``decoder_shared.bin`` once), less the manifest's
  arrays that live inside them but are not graph weights (the embedding table, its row scales, the image
  newline: the runtime memory-maps those and reads rows on the host);
- those memory-mapped arrays, counted whole: an upper bound, since only the rows a request touches are paged
  in, and they are clean file pages the kernel can drop;
- KV cache: buffers x layers x 2 x kv_heads x head_dim x context x the compute dtype's bytes (one buffer per
  layer for the shared-buffer attention, two for the past/present forms, as the runtime allocates them);
- activations: one image through the vision graph, plus a prefill of the whole context through each loaded
  expert (each expert's onnxruntime session keeps its own arena);
- runtime: what the H200 measurement leaves after the terms above (CUDA context, cuBLAS/cuDNN workspaces,
  onnxruntime arenas), and the measured host process (Python, onnxruntime-gpu and CUDA libraries, the
  tokenizer, weights staged on the host while sessions load).

Speed: each phase takes the longest of three floors, and the output says which one binds:

- compute: FLOPs / (the module's dense peak for the compute dtype x an efficiency);
- memory: bytes read / (bandwidth x an efficiency);
- launch: a fixed cost per graph run + the graph's nodes x a cost per node, both fitted to the H200 runs
  (there every phase was launch-bound: decode 3.2 ms/token against a 0.06 ms bandwidth roofline). The
  per-node cost is the H200 host's (a Xeon): a floor on Orin, whose Arm cores issue kernels more slowly.

Efficiencies: vision compute from the published SigLIP-So400m FP16 time on AGX Orin (the H200's vision run is
launch-bound, so it only bounds its compute efficiency from below); prefill compute from the H200 run of the
same precision; bandwidth from the published Jetson rule of thumb (real stacks reach 20-50 % of the cap).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rsedge.bench.vision_cost import vision_cost
from rsedge.errors import BundleError, OptionError

FACTS = Path(__file__).resolve().parents[1] / "data" / "estimate" / "targets.json"
DEFAULT_CONTEXT = 1024
MAX_CONTEXT = 1 << 20
SHARED_BIN = "decoder_shared.bin"
DTYPE_BYTES = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2}
MANIFEST_SOURCES = {
    "manifest": "the bundle's manifest.json: files and their sizes, arrays, model dimensions, compute dtype, "
    "attention form, graph inputs and outputs",
    "graphs": "the bundle's ONNX graphs: node count and the external-data files each one reads",
    "model": "arithmetic on the manifest's model dimensions (the formula is given with the figure)",
    "option": "the command's options (--context, default 1024 tokens; --experts, default all)",
}


def quantity(value: Any, unit: str, source: str, how: str | None = None) -> dict[str, Any]:
    """One reported number: its value, unit, the key of its source, and how it was computed."""
    out = {"value": value, "unit": unit, "source": source}
    if how:
        out["how"] = how
    return out


def load_facts(path: Path = FACTS) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def target_names(facts: Mapping[str, Any] | None = None) -> list[str]:
    return list((facts or load_facts())["targets"])


# -- model dimensions and the arithmetic on them -------------------------------------------------------------


@dataclass(frozen=True)
class TextDims:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def from_config(cls, d: Mapping[str, Any], where: str = "model.text") -> TextDims:
        keys = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")
        layers, hidden, inter, heads = (_pos(d, k, where) for k in keys)
        kv, vocab = _pos(d, "num_key_value_heads", where), _pos(d, "vocab_size", where)
        return cls(layers, hidden, inter, heads, kv, vocab, bool(d.get("tie_word_embeddings", False)))


@dataclass(frozen=True)
class VisionDims:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    patch: int
    image_size: int
    channels: int = 3

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch) ** 2

    @classmethod
    def from_config(cls, d: Mapping[str, Any], where: str = "model.vision") -> VisionDims:
        keys = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "patch_size")
        layers, hidden, inter, heads, patch = (_pos(d, k, where) for k in keys)
        return cls(layers, hidden, inter, heads, patch, _pos(d, "image_size", where), int(d.get("num_channels", 3)))


def _pos(d: Mapping[str, Any], key: str, where: str) -> int:
    v = d.get(key) if isinstance(d, Mapping) else None
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise BundleError(f"manifest field {where}.{key} must be a positive integer")
    return v


def decoder_linear_params(t: TextDims) -> int:
    """Weights one token multiplies in one decoder layer: fused QKV, o_proj and one expert's MLP."""
    return t.hidden * (t.hidden + 2 * t.kv_heads * t.head_dim) + t.hidden * t.hidden + 3 * t.hidden * t.intermediate


def prefill_flops(t: TextDims, n: int) -> int:
    """FLOPs of a prefill of ``n`` tokens: the linears, causal attention (token i attends to i + 1 positions:
    4 x hidden FLOPs each for QK^T and AV), and the lm_head for the last position only."""
    linears = 2 * n * t.layers * decoder_linear_params(t)
    attention = 2 * t.layers * t.hidden * n * (n + 1)
    return linears + attention + 2 * t.hidden * t.vocab


def vision_flops(v: VisionDims, text_hidden: int | None) -> int:
    """FLOPs of one image: patch embedding, each layer's linears and full attention, and the mlp2x connector."""
    T, D = v.tokens, v.hidden
    patch = 2 * T * v.channels * v.patch * v.patch * D
    layer = 2 * T * (4 * D * D + 2 * D * v.intermediate) + 4 * T * T * D
    connector = 2 * T * (D * text_hidden + text_hidden * text_hidden) if text_hidden else 0
    return patch + v.layers * layer + connector


def kv_cache_bytes(t: TextDims, positions: int, itemsize: int, buffers: int) -> int:
    return buffers * t.layers * 2 * t.kv_heads * t.head_dim * positions * itemsize


def prefill_activation_bytes(t: TextDims, n: int, itemsize: int, logits_itemsize: int, standard: bool) -> int:
    """Peak live tensors of a prefill of ``n`` tokens: the residual and normed hidden states and the MLP's
    gate_up, gate, up and activation tensors ([n, 2H + 4I]); the materialized scores and softmax of the
    standard attention form ([2, heads, n, n]; the fused kernels keep none); the last position's logits."""
    x = n * itemsize * (2 * t.hidden + 4 * t.intermediate)
    if standard:
        x += 2 * t.heads * n * n * itemsize
    return x + t.vocab * logits_itemsize


def vision_activation_bytes(v: VisionDims, text_hidden: int, itemsize: int) -> int:
    """Peak live tensors of one image: the larger of the attention block (q, k, v, residual and output
    [T, 5D] plus scores and softmax [2, heads, T, T], materialized by the vision graph's standard ops) and
    the MLP block ([T, 2D + 3I]), plus the pixel input and the projected features."""
    T, D = v.tokens, v.hidden
    attention = T * 5 * D * itemsize + 2 * v.heads * T * T * itemsize
    mlp = T * (2 * D + 3 * v.intermediate) * itemsize
    return max(attention, mlp) + (v.channels * v.image_size**2 + T * text_hidden) * itemsize


# -- what a bundle is -----------------------------------------------------------------------------------------


@dataclass
class BundleFacts:
    """A bundle as the estimate sees it: its manifest, the files each graph makes onnxruntime read, and the
    graphs' node counts (None where the graphs were not read: a manifest written by hand)."""

    manifest: dict[str, Any]
    graph_files: dict[str, list[str]]
    nodes: dict[str, int] | None = None
    path: str | None = None


def expert_keys(manifest: Mapping[str, Any]) -> list[str]:
    experts = manifest.get("graphs", {}).get("decoder", {}).get("experts")
    if not isinstance(experts, dict) or not experts:
        raise BundleError("manifest field graphs.decoder.experts must name the expert graphs")
    return sorted(experts, key=int)


def graph_entries(manifest: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Graph key ("vision", "expert0", ...) -> its manifest entry."""
    graphs = manifest.get("graphs", {})
    out = {"vision": graphs.get("vision")}
    out.update({f"expert{e}": graphs["decoder"]["experts"][e] for e in expert_keys(manifest)})
    for key, entry in out.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise BundleError(f"manifest names no graph file for {key}")
    return out


def conventional_graph_files(manifest: Mapping[str, Any]) -> dict[str, list[str]]:
    """The files each graph reads by rsedge's layout (X.onnx with X.bin; every expert also reads
    decoder_shared.bin), for a manifest without its graphs."""
    files = manifest.get("files", {})
    out: dict[str, list[str]] = {}
    for key, entry in graph_entries(manifest).items():
        rel = entry["file"]
        names = [rel, posixpath.splitext(rel)[0] + ".bin"]
        if key != "vision":
            names.append(SHARED_BIN)
        out[key] = [n for n in dict.fromkeys(names) if n in files]
    return out


def graph_node_count(path: Path) -> int:
    """Nodes of an ONNX file's main graph, read from the protobuf without the onnx package."""
    from rsedge.runtime.onnx_refs import _fields, mapped

    with mapped(path) as view:
        count = 0
        for number, wire, a, b in _fields(view, 0, len(view)):
            if number == 7 and wire == 2:  # ModelProto.graph
                count += sum(1 for n, w, _, _ in _fields(view, a, b) if n == 1 and w == 2)  # GraphProto.node
        return count


def read_bundle(path: str | Path) -> BundleFacts:
    """Open a bundle (file sizes checked, every graph's external data among its hashed files) and read the node
    count and external-data files of each graph."""
    from rsedge.runtime.bundle import Bundle
    from rsedge.runtime.onnx_refs import OnnxFormatError, graph_external_locations

    bundle = Bundle.open(path, verify="size").for_device("tensorrt")  # a Jetson runs a two-form bundle's Q/DQ form
    graph_files: dict[str, list[str]] = {}
    nodes: dict[str, int] = {}
    for key, entry in graph_entries(bundle.manifest).items():
        rel = entry["file"]
        real = bundle.path(rel)
        try:
            locations = graph_external_locations(real)
            nodes[key] = graph_node_count(real)
        except (OnnxFormatError, OSError) as e:
            raise BundleError(f"{path}: graph {rel} is not a readable ONNX file ({e})") from None
        base = posixpath.dirname(rel)
        graph_files[key] = [rel, *sorted(posixpath.normpath(posixpath.join(base, loc)) for loc in locations)]
    return BundleFacts(bundle.manifest, graph_files, nodes, str(path))


def manifest_facts(manifest: dict[str, Any], nodes: Mapping[str, int] | None = None) -> BundleFacts:
    """A manifest on its own (tests, a manifest written by hand): files by rsedge's layout."""
    return BundleFacts(manifest, conventional_graph_files(manifest), dict(nodes) if nodes is not None else None)


# -- the target and the calibration ---------------------------------------------------------------------------


def target_facts(name: str, facts: Mapping[str, Any]) -> dict[str, Any]:
    targets = facts["targets"]
    if name not in targets:
        raise OptionError(f"unknown target {name!r}; choose from {', '.join(targets)}")
    return targets[name]


def peaks(t: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The module GPU's dense peaks (FLOP/s) by compute dtype."""
    sparse = t["gpu_int8_tops_sparse"]
    src = t["sources"]["gpu_int8_tops_sparse"]
    return {
        "fp16": quantity(sparse / 4 * 1e12, "FLOP/s", "ampere-ratios", f"GPU sparse INT8 TOPS {sparse} ({src}) / 4"),
        "int8": quantity(sparse / 2 * 1e12, "op/s", "ampere-ratios", f"GPU sparse INT8 TOPS {sparse} ({src}) / 2"),
        "fp32": quantity(
            t["cuda_cores"] * 2 * t["gpu_clock_mhz"] * 1e6,
            "FLOP/s",
            "ampere-ratios",
            f"{t['cuda_cores']} CUDA cores x 2 x {t['gpu_clock_mhz']} MHz (gpu-clock)",
        ),
    }


@dataclass(frozen=True)
class Calibration:
    run_ms: float  # fixed cost of one graph run
    node_ms: float  # cost per graph node
    prefill_efficiency: dict[str, float]  # H200 bundle precision -> achieved fraction of dense FP16
    vision_efficiency: float
    vision_source: str
    bandwidth_efficiency: float
    gpu_runtime_bytes: int
    host_process_bytes: int
    notes: dict[str, str]


def h200_residual_bytes(h200: Mapping[str, Any], name: str) -> int:
    """GPU memory the H200 bench process used beyond weights, KV and activations (the terms this module
    models): its CUDA context, cuBLAS/cuDNN workspaces and onnxruntime arena slack."""
    b = h200["bundles"][name]
    t, v = TextDims.from_config(h200["model"]["text"]), VisionDims.from_config(h200["model"]["vision"])
    size = b["bytes"]
    weights = sum(size.values()) - b["host_array_bytes"]  # vision + one expert, as the bench loaded
    item = DTYPE_BYTES[b["compute"]]
    positions = h200["prompt_tokens"] + h200["new_tokens"] + 1
    kv = kv_cache_bytes(t, positions, item, 1 if b["attention"] == "gqa-shared" else 2)
    act = prefill_activation_bytes(t, h200["prompt_tokens"], item, 4, b["attention"] == "standard")
    act += vision_activation_bytes(v, t.hidden, DTYPE_BYTES[b["vision_dtype"]])
    return round(b["gpu_memory_used_mb"] * 1e6) - weights - kv - act


def calibrate(facts: Mapping[str, Any]) -> Calibration:
    h200 = facts["h200"]
    b4, b16 = h200["bundles"]["int4"], h200["bundles"]["fp16"]
    # Launch floor: decode of the INT4 graph (292 nodes) and the FP16 graph (1594 nodes) on the same H200.
    node_ms = (b16["decode_ms"] - b4["decode_ms"]) / (b16["decoder_nodes"] - b4["decoder_nodes"])
    run_ms = b4["decode_ms"] - b4["decoder_nodes"] * node_ms
    t = TextDims.from_config(h200["model"]["text"])
    peak = h200["fp16_tflops_dense"] * 1e12
    flops = prefill_flops(t, h200["prompt_tokens"])
    prefill_eff = {name: flops / (b["prefill_ms"] / 1e3 * peak) for name, b in h200["bundles"].items()}
    cal = next(p for p in facts["published"] if p["id"] == facts["vision_calibration"])
    agx = facts["targets"][cal["target"]]
    vision_eff = vision_flops(VisionDims.from_config(cal["tower"]), None) / (
        cal["value"] / 1e3 * peaks(agx)["fp16"]["value"]
    )
    residual = max(h200_residual_bytes(h200, name) for name in ("int4", "int8"))
    host = round(max(h200["bundles"][n]["rss_peak_mb"] for n in ("int4", "int8")) * 1e6)
    return Calibration(
        run_ms=run_ms,
        node_ms=node_ms,
        prefill_efficiency=prefill_eff,
        vision_efficiency=vision_eff,
        vision_source=cal["source"],
        bandwidth_efficiency=facts["decode_bandwidth_efficiency"]["value"],
        gpu_runtime_bytes=residual,
        host_process_bytes=host,
        notes={
            "launch": f"H200 decode: INT4 graph {b4['decoder_nodes']} nodes {b4['decode_ms']} ms, FP16 graph "
            f"{b16['decoder_nodes']} nodes {b16['decode_ms']} ms -> {run_ms:.3f} ms per run + {node_ms * 1e3:.3f} us "
            f"per node (h200-check, h200-nodes)",
            "vision": f"SigLIP-So400m ({cal['tower']['num_hidden_layers']} layers) FP16 {cal['value']} ms on "
            f"{agx['name']} ({cal['source']}): {vision_flops(VisionDims.from_config(cal['tower']), None) / 1e9:.1f} "
            f"GFLOP / ({cal['value']} ms x dense FP16 peak)",
            "prefill": f"H200 prefill of {h200['prompt_tokens']} tokens: {flops / 1e9:.1f} GFLOP / (measured ms x "
            f"{h200['fp16_tflops_dense']} TFLOPS dense FP16, h200-datasheet)",
            "gpu_runtime": "H200 NVML GPU memory of the bench process (INT4, INT8) less weights on the GPU, KV and "
            "activations as modelled here; the larger",
            "host_process": "H200 bench process peak RSS (VmHWM), INT4 and INT8; the larger",
        },
    )


def prefill_efficiency_key(precision: str) -> str:
    """The H200 run whose prefill efficiency applies: the same precision; FP32/FP16 take the FP16 run."""
    return precision if precision in ("int4", "int8") else "fp16"


def streamed_bytes(rels: Iterable[str], size: Any, host_arrays: Mapping[str, Any]) -> int:
    """Weight bytes a run of a graph reads: its external-data files less the arrays the runtime maps on the host
    (the .onnx file itself is the graph's structure, read once at load)."""
    rels = [r for r in rels if not r.endswith(".onnx")]
    return sum(size(r) for r in rels) - sum(a.nbytes for a in host_arrays.values() if a.file in rels)


# -- the estimate -----------------------------------------------------------------------------------------------


def _phase(floors: Mapping[str, float | None], unit_how: Mapping[str, tuple[str, str]]) -> dict[str, Any]:
    """The binding floor of a phase and every floor with its source."""
    known = {k: v for k, v in floors.items() if v is not None}
    bound = max(known, key=lambda k: known[k])
    return {
        "ms": quantity(known[bound], "ms", unit_how[bound][0], f"the largest floor: {bound}"),
        "bound": bound,
        "floors": {
            k: quantity(v, "ms", unit_how[k][0], unit_how[k][1]) if v is not None else None for k, v in floors.items()
        },
    }


def _dtype_bytes(name: Any, where: str) -> int:
    if name not in DTYPE_BYTES:
        raise BundleError(f"manifest field {where} names dtype {name!r}, which the estimate does not know")
    return DTYPE_BYTES[name]


def _io_dtype(entry: Mapping[str, Any], kind: str, name: str | None) -> str | None:
    for io in entry.get(kind, []):
        if isinstance(io, dict) and (name is None or io.get("name") == name):
            return io.get("dtype")
    return None


def parse_experts(values: Iterable[str | int], manifest: Mapping[str, Any]) -> list[str]:
    """``--experts`` values (repeatable, comma-separated) as the manifest's expert keys; none: all of them."""
    keys = expert_keys(manifest)
    chosen: list[str] = []
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            if part not in keys:
                raise OptionError(f"--experts: {part!r} is not an expert of this bundle (it has {', '.join(keys)})")
            if part not in chosen:
                chosen.append(part)
    return chosen or keys


def estimate(
    bundle: BundleFacts,
    target: str,
    context: int = DEFAULT_CONTEXT,
    experts: Sequence[str | int] | None = None,
    facts: Mapping[str, Any] | None = None,
    image_size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Memory and speed of ``bundle`` on ``target`` at ``context`` tokens with ``experts`` loaded (all if None).

    ``image_size`` (width, height): the image a dynamic-resolution bundle's vision graph is costed on (None:
    rsedge.bench.vision_cost.DEFAULT_IMAGE); a fixed-input bundle takes none."""
    facts = facts or load_facts()
    tgt = target_facts(target, facts)
    if not 1 <= context <= MAX_CONTEXT:
        raise OptionError(f"--context must be between 1 and {MAX_CONTEXT}, got {context}")
    m = bundle.manifest
    model = m.get("model")
    if not isinstance(model, dict):
        raise BundleError("manifest has no model section")
    t, vis = TextDims.from_config(model.get("text", {})), vision_cost(m, image_size)
    experts = parse_experts(experts or (), m)
    entries = graph_entries(m)
    decoder = m["graphs"]["decoder"]
    attention = decoder.get("attention", "standard")
    shared_kv = decoder.get("kv_cache", "shared" if attention == "gqa-shared" else "past-present") == "shared"
    holds_scores = attention in ("standard", "scatter-shared")  # plain MatMul attention keeps S x T scores
    compute = m.get("compute_dtype", m.get("precision"))
    item = _dtype_bytes(compute, "compute_dtype")
    first = entries[f"expert{experts[0]}"]
    logits_item = DTYPE_BYTES.get(_io_dtype(first, "outputs", "logits"), item)
    vision_entry = entries["vision"]
    vision_dtype = _io_dtype(vision_entry, "inputs", None) or compute
    vision_item = _dtype_bytes(vision_dtype, "graphs.vision.inputs")
    quant = m.get("quantization") or {}
    form = (quant.get("decoder") or {}).get("form", "ort") if quant else None
    cal = calibrate(facts)
    files = m.get("files", {})
    sources = {**MANIFEST_SOURCES, **facts["sources"]}

    def size(rel: str) -> int:
        entry = files.get(rel)
        if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int):
            raise BundleError(f"manifest lists no byte count for {rel}")
        return entry["bytes"]

    # -- memory ------------------------------------------------------------------------------------------------
    from rsedge.runtime.bundle import ArrayRef

    arrays = {k: ArrayRef.from_json(a, f"arrays.{k}") for k, a in (m.get("arrays") or {}).items()}
    # A tied, unquantized head reads the embedding table as a graph weight; an int8-rows table never is one.
    table_in_graph = t.tied and "embed_tokens" in arrays and arrays["embed_tokens"].dtype != "int8"
    host_arrays = {k: a for k, a in arrays.items() if not (k == "embed_tokens" and table_in_graph)}
    loaded = ["vision", *(f"expert{e}" for e in experts)]
    readers: dict[str, int] = {}
    for key in loaded:
        for rel in bundle.graph_files[key]:
            readers[rel] = readers.get(rel, 0) + 1
    src = "graphs" if bundle.path is not None else "manifest"  # files read from the graphs, or by the layout
    terms: list[dict[str, Any]] = []

    def weight_term(label: str, rels: list[str]) -> None:
        minus = sum(a.nbytes for a in host_arrays.values() if a.file in rels)
        how = " + ".join(f"{r} {size(r)}" for r in rels) + (f" - {minus} memory-mapped array bytes" if minus else "")
        terms.append({"term": label, **quantity(sum(size(r) for r in rels) - minus, "bytes", src, how)})

    for key in loaded:
        own = [r for r in bundle.graph_files[key] if readers[r] == 1]
        weight_term(f"weights: {'vision graph' if key == 'vision' else 'expert ' + key[6:]} ({', '.join(own)})", own)
    for rel in (r for r, n in readers.items() if n > 1):
        weight_term(f"weights: {rel} (read by {readers[rel]} graphs, loaded once)", [rel])
    weights = sum(x["value"] for x in terms)
    mapped = sum(a.nbytes for a in host_arrays.values())
    terms.append(
        {
            "term": "memory-mapped arrays (" + ", ".join(host_arrays) + ")",
            **quantity(
                mapped,
                "bytes",
                "manifest",
                "the arrays' shapes x dtypes, counted whole: an upper bound (only the rows a request reads are "
                "paged in, and they are clean file pages)",
            ),
        }
    )
    buffers = 1 if shared_kv else 2
    kv = kv_cache_bytes(t, context, item, buffers)
    terms.append(
        {
            "term": f"KV cache ({context} positions)",
            **quantity(
                kv,
                "bytes",
                "model",
                f"{buffers} buffer(s) ({attention}) x {t.layers} layers x 2 x {t.kv_heads} kv heads x {t.head_dim} "
                f"head dim x {context} x {item} bytes ({compute})",
            ),
        }
    )
    vis_act, vis_act_how = vis.activation_bytes(t.hidden, vision_item)
    terms.append({"term": vis.label, **quantity(vis_act, "bytes", "model", f"{vis_act_how} ({vision_dtype})")})
    pre_one = prefill_activation_bytes(t, context, item, logits_item, holds_scores)
    terms.append(
        {
            "term": f"activations: prefill of {context} tokens x {len(experts)} expert session(s)",
            **quantity(
                pre_one * len(experts),
                "bytes",
                "model",
                f"{context} x (2 x {t.hidden} + 4 x {t.intermediate}) x {item}"
                + (f" + 2 x {t.heads} x {context}^2 x {item}" if holds_scores else "")
                + f" + {t.vocab} logits x {logits_item}, per loaded expert (each session keeps its own arena)",
            ),
        }
    )
    terms.append(
        {
            "term": "runtime: CUDA context, cuBLAS/cuDNN, onnxruntime arenas",
            **quantity(cal.gpu_runtime_bytes, "bytes", "h200-check", cal.notes["gpu_runtime"]),
        }
    )
    if tgt.get("unified_memory", True):
        terms.append(
            {
                "term": "runtime: host process (shares Orin's DRAM)",
                **quantity(cal.host_process_bytes, "bytes", "h200-check", cal.notes["host_process"]),
            }
        )
    total = sum(x["value"] for x in terms)
    usable = round(tgt["usable_gb"] * 1e9)
    memory: dict[str, Any] = {
        "terms": terms,
        "weights": quantity(weights, "bytes", "manifest", "sum of the weights terms"),
        "total": quantity(total, "bytes", "model", "sum of the terms"),
        "usable": quantity(usable, "bytes", tgt["sources"]["usable_gb"], f"{tgt['usable_gb']} GB after JetPack"),
        "headroom": quantity(usable - total, "bytes", "model", "usable - total"),
        "fits": total <= usable,
    }
    if "usable_docker_gb" in tgt:
        docker = round(tgt["usable_docker_gb"] * 1e9)
        memory["usable_docker"] = quantity(docker, "bytes", tgt["sources"]["usable_docker_gb"], "inside Docker")
        memory["fits_docker"] = total <= docker

    # -- speed --------------------------------------------------------------------------------------------------
    pk = peaks(tgt)
    bw = tgt["bandwidth_gb_s"] * 1e9
    bw_src = tgt["sources"]["bandwidth_gb_s"]
    eff_bw = cal.bandwidth_efficiency
    nodes = bundle.nodes or {}

    def launch(key: str) -> float | None:
        return cal.run_ms + nodes[key] * cal.node_ms if key in nodes else None

    launch_how = f"{cal.run_ms:.3f} ms per run + nodes x {cal.node_ms * 1e3:.3f} us (H200 host: a floor on Orin)"

    # Vision: an INT8 Q/DQ graph uses INT8 tensor cores only under TensorRT (the qdq form); onnxruntime's CUDA
    # provider runs it as dequantize + a float matmul (rsedge/export/targets.py).
    vision_quantized = vision_entry.get("quantized") == "int8-qdq"
    v_peak_key = "int8" if vision_quantized and form == "qdq" else ("fp32" if vision_item == 4 else "fp16")
    v_flops, v_flops_how = vis.flops(t.hidden)
    v_bytes = streamed_bytes(bundle.graph_files["vision"], size, host_arrays)
    vision = _phase(
        {
            "compute": v_flops / (pk[v_peak_key]["value"] * cal.vision_efficiency) * 1e3,
            "bandwidth": v_bytes / (bw * eff_bw) * 1e3,
            "launch": launch("vision"),
        },
        {
            "compute": (
                "model",
                f"{v_flops / 1e9:.1f} GFLOP / ({pk[v_peak_key]['value'] / 1e12:.2f} T/s {v_peak_key} dense x "
                f"{cal.vision_efficiency:.3f} efficiency: {cal.notes['vision']})",
            ),
            "bandwidth": ("model", f"{v_bytes / 1e6:.1f} MB of weights / ({bw / 1e9} GB/s, {bw_src}, x {eff_bw})"),
            "launch": ("h200-check", f"{nodes.get('vision')} nodes: {launch_how}"),
        },
    )
    vision["flops"] = quantity(v_flops, "FLOP", "model", v_flops_how)

    # Decoder phases use the largest loaded expert (they are the same size in rsedge's bundles).
    dec_bytes = {e: streamed_bytes(bundle.graph_files[f"expert{e}"], size, host_arrays) for e in experts}
    e_max = max(dec_bytes, key=lambda e: dec_bytes[e])
    key = f"expert{e_max}"
    p_peak_key = "fp32" if item == 4 else "fp16"  # MatMulNBits/DequantizeLinear feed float GEMMs
    eff_key = prefill_efficiency_key(m.get("precision", ""))
    eff_p = cal.prefill_efficiency[eff_key]
    p_flops = prefill_flops(t, context)
    prefill = _phase(
        {
            "compute": p_flops / (pk[p_peak_key]["value"] * eff_p) * 1e3,
            "bandwidth": dec_bytes[e_max] / (bw * eff_bw) * 1e3,
            "launch": launch(key),
        },
        {
            "compute": (
                "model",
                f"{p_flops / 1e9:.1f} GFLOP / ({pk[p_peak_key]['value'] / 1e12:.2f} TFLOP/s {p_peak_key} dense x "
                f"{eff_p:.3f}, the H200 {eff_key} prefill's efficiency: {cal.notes['prefill']})",
            ),
            "bandwidth": (
                "model",
                f"{dec_bytes[e_max] / 1e6:.1f} MB of decoder weights / ({bw / 1e9} GB/s x {eff_bw})",
            ),
            "launch": ("h200-check", f"{nodes.get(key)} nodes: {launch_how}"),
        },
    )
    prefill["flops"] = quantity(
        p_flops, "FLOP", "model", "2 x tokens x layers x linear weights + causal attention + lm_head"
    )
    prefill["tokens_per_s"] = quantity(
        context / prefill["ms"]["value"] * 1e3, "tok/s", "model", f"{context} tokens / prefill ms"
    )

    kv_read = kv_cache_bytes(t, context, item, 1) * (1 if shared_kv else 2)
    table_read = arrays["embed_tokens"].nbytes if table_in_graph else 0
    step_bytes = dec_bytes[e_max] + kv_read
    decode = _phase(
        {"bandwidth": step_bytes / (bw * eff_bw) * 1e3, "launch": launch(key)},
        {
            "bandwidth": (
                "model",
                f"({dec_bytes[e_max]} bytes of one expert's decoder weights"
                + (f", the tied head's {table_read}-byte table among them" if table_read else "")
                + f" + {kv_read} bytes of KV at depth {context}"
                + ("" if shared_kv else ", read and written again")
                + f") / ({bw / 1e9} GB/s, {bw_src}, x {eff_bw}: bandwidth-rule)",
            ),
            "launch": ("h200-check", f"{nodes.get(key)} nodes: {launch_how}"),
        },
    )
    decode["bytes_per_token"] = quantity(step_bytes, "bytes", "model", "decoder weights read + KV cache")
    decode["tokens_per_s"] = quantity(1e3 / decode["ms"]["value"], "tok/s", "model", "1000 / decode ms per token")
    decode["roofline_tokens_per_s"] = quantity(
        bw / step_bytes, "tok/s", bw_src, "bandwidth / bytes per token (efficiency 1: the speed of light)"
    )
    speed = {
        "vision": vision,
        "prefill": prefill,
        "decode": decode,
        "first_token_ms": quantity(
            vision["ms"]["value"] + prefill["ms"]["value"], "ms", "model", "one image's vision + the prefill"
        ),
    }

    notes = []
    if context < vis.tokens:
        notes.append(f"--context {context} is shorter than one image's {vis.tokens} visual tokens")
    limit = decoder.get("max_positions")
    if isinstance(limit, int) and context > limit:
        notes.append(f"--context {context} exceeds this bundle's {limit} positions: the runtime refuses such a request")
    if bundle.nodes is None:
        notes.append("the graphs were not read (a bare manifest): no launch floor")
    if form == "ort" and item == 4:
        notes.append(
            "compute fp32 in the onnxruntime form: onnxruntime's CUDA GroupQueryAttention and MatMulNBits take "
            "fp16 activations (rsedge/export/targets.py), so parts of this decoder fall back to the CPU and the GPU "
            "figures are optimistic; export with --target cuda for a GPU"
        )
    if vision_quantized and form != "qdq":
        notes.append(
            "INT8 Q/DQ vision under onnxruntime's CUDA provider runs as dequantize + float matmul: estimated at the "
            "float peak, and measured slower than FP16 on the H200 (rsedge/export/targets.py)"
        )
    notes.append(
        "launch floors use the H200 host's per-run and per-node costs; Orin's Arm cores issue kernels more slowly, "
        "so a launch-bound phase will be slower than shown"
    )
    published = [_published(p, tgt, pk, cal, facts) for p in facts["published"] if p["target"] == target]
    used = {"manifest", "model", "h200-check", "h200-nodes", "h200-datasheet", "ampere-ratios", "bandwidth-rule"}
    used |= (
        set(tgt["sources"].values())
        | {p["published"]["source"] for p in published}
        | {"gpu-clock", "option", cal.vision_source}
    )
    if bundle.nodes or bundle.path is not None:
        used.add("graphs")
    return {
        "bundle": bundle.path,
        "precision": m.get("precision"),
        "compute_dtype": compute,
        "attention": attention,
        "vision_dtype": vision_dtype + (" (INT8 Q/DQ weights)" if vision_quantized else ""),
        "target": target,
        "target_name": tgt["name"],
        "context": quantity(context, "tokens", "option", "prefilled at once (an upper bound) and the decode depth"),
        "experts": [int(e) for e in experts],
        "image": vis.image,
        "memory": memory,
        "speed": speed,
        "efficiency": {
            "vision_compute": quantity(cal.vision_efficiency, "fraction", cal.vision_source, cal.notes["vision"]),
            "prefill_compute": quantity(eff_p, "fraction", "h200-check", f"{eff_key}: {cal.notes['prefill']}"),
            "bandwidth_efficiency": quantity(eff_bw, "fraction", "bandwidth-rule"),
            "run_ms": quantity(cal.run_ms, "ms", "h200-check", cal.notes["launch"]),
            "node_us": quantity(cal.node_ms * 1e3, "us", "h200-check", cal.notes["launch"]),
        },
        "target_facts": {
            "memory_bandwidth": quantity(bw, "bytes/s", bw_src),
            "fp16_dense": pk["fp16"],
            "int8_dense": pk["int8"],
            "fp32": pk["fp32"],
            "usable_memory": memory["usable"],
        },
        "published": published,
        "notes": notes,
        "sources": {k: v for k, v in sources.items() if k in used},
    }


def _published(
    p: Mapping[str, Any], tgt: Mapping[str, Any], pk: Mapping[str, Any], cal: Calibration, facts: Mapping[str, Any]
) -> dict[str, Any]:
    """A published figure for this module, and what this module's arithmetic predicts for the same work."""
    out: dict[str, Any] = {"id": p["id"], "what": p["what"], "published": quantity(p["value"], p["unit"], p["source"])}
    bw = tgt["bandwidth_gb_s"] * 1e9
    if p["kind"] == "vision_ms":
        flops = vision_flops(VisionDims.from_config(p["tower"]), None)
        ms = flops / (pk["fp16"]["value"] * cal.vision_efficiency) * 1e3
        role = (
            "calibration (this figure sets the vision efficiency)"
            if p["id"] == facts["vision_calibration"]
            else "check"
        )
        out["predicted"] = quantity(
            ms, "ms", "model", f"{flops / 1e9:.1f} GFLOP / (FP16 dense x {cal.vision_efficiency:.3f})"
        )
        out["role"] = role
    elif p["kind"] == "decode_tok_s":
        pred = bw * cal.bandwidth_efficiency / p["bytes_per_token"]
        out["predicted"] = quantity(pred, "tok/s", "model", f"bandwidth x {cal.bandwidth_efficiency} / bytes per token")
        out["implied_bandwidth_efficiency"] = quantity(
            p["value"] * p["bytes_per_token"] / bw, "fraction", p["source"], p["bytes_per_token_how"]
        )
        out["role"] = "check"
    elif p["kind"] == "prefill_tok_s":
        out["implied_compute_efficiency"] = quantity(
            p["value"] * p["flops_per_token"] / pk["fp16"]["value"], "fraction", p["source"], p["flops_per_token_how"]
        )
        out["role"] = "check"
    else:
        out["role"] = "context"
    if "predicted" in out:
        out["ratio"] = quantity(out["predicted"]["value"] / p["value"], "x", "model", "predicted / published")
    return out


# -- output -------------------------------------------------------------------------------------------------


def _shown(q: Mapping[str, Any]) -> str:
    """A factor in the unit people read it in (GB/s, TFLOP/s, GB)."""
    value, unit = q["value"], q["unit"]
    scaled = {"bytes/s": (1e9, "GB/s"), "FLOP/s": (1e12, "TFLOP/s"), "op/s": (1e12, "TOPS"), "bytes": (1e9, "GB")}
    if unit in scaled:
        div, unit = scaled[unit]
        return f"{value / div:.4g} {unit}"
    return f"{value:.3g} {unit}"


def _mb(q: Mapping[str, Any]) -> str:
    return f"{q['value'] / 1e6:,.1f}"


def render(result: Mapping[str, Any], console: Any = None) -> None:
    """Print an estimate as rich tables: memory, speed, factors, published figures, then the sources."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and pipes: wide enough that the tables do not fold
            console = Console(width=160)
    mem, speed = result["memory"], result["speed"]
    head = (
        f"{result['bundle'] or 'manifest'}: {result['precision']}, compute {result['compute_dtype']}, attention "
        f"{result['attention']}, vision {result['vision_dtype']}; experts {', '.join(map(str, result['experts']))}; "
        f"context {result['context']['value']} tokens"
    )
    table = Table(title=f"memory on {result['target_name']} ({result['target']})", caption=head)
    for col, just in (("term", "left"), ("MB", "right"), ("source", "left")):
        table.add_column(col, justify=just)
    for term in mem["terms"]:
        table.add_row(term["term"], _mb(term), term["source"])
    table.add_row("total", _mb(mem["total"]), "sum", style="bold")
    table.add_row("usable after JetPack", _mb(mem["usable"]), mem["usable"]["source"])
    verdict = "fits" if mem["fits"] else "DOES NOT FIT"
    table.add_row(f"headroom ({verdict})", _mb(mem["headroom"]), "usable - total", style="bold")
    if "usable_docker" in mem:
        table.add_row(
            f"usable inside Docker ({'fits' if mem['fits_docker'] else 'does not fit'})",
            _mb(mem["usable_docker"]),
            mem["usable_docker"]["source"],
        )
    console.print(table)

    table = Table(title="speed (batch 1)")
    for col in ("phase", "estimate", "bound", "compute ms", "bandwidth ms", "launch ms"):
        table.add_column(col, justify="left" if col in ("phase", "bound") else "right")

    def floors(phase: Mapping[str, Any]) -> list[str]:
        f = phase["floors"]
        return [f"{f[k]['value']:.2f}" if f.get(k) else "-" for k in ("compute", "bandwidth", "launch")]

    v, p, d = speed["vision"], speed["prefill"], speed["decode"]
    ctx = result["context"]["value"]
    image = result.get("image") or {}
    shown = "one image"
    if image.get("kind") == "dynamic":  # the assumed size: a dynamic-resolution tower's cost follows it
        shown = f"one {image['size'][0]}x{image['size'][1]} image, {image['tokens']} visual tokens"
    table.add_row(f"vision, {shown}", f"{v['ms']['value']:.1f} ms", v["bound"], *floors(v))
    table.add_row(
        f"prefill, {ctx} tokens",
        f"{p['ms']['value']:.1f} ms = {p['tokens_per_s']['value']:,.0f} tok/s",
        p["bound"],
        *floors(p),
    )
    table.add_row(
        f"decode at depth {ctx}",
        f"{d['ms']['value']:.2f} ms/token = {d['tokens_per_s']['value']:.0f} tok/s",
        d["bound"],
        *floors(d),
    )
    table.add_row("first token (vision + prefill)", f"{speed['first_token_ms']['value']:.1f} ms", "", "", "", "")
    table.caption = (
        f"decode reads {d['bytes_per_token']['value'] / 1e6:.1f} MB/token; bandwidth roofline "
        f"{d['roofline_tokens_per_s']['value']:.0f} tok/s"
    )
    console.print(table)

    table = Table(title="factors")
    for col in ("factor", "value", "source", "how"):
        table.add_column(col, overflow="fold")
    for name, q in {**result["efficiency"], **result["target_facts"]}.items():
        table.add_row(name, _shown(q), q["source"], q.get("how", ""))
    console.print(table)

    if result["published"]:
        table = Table(title=f"published figures for {result['target_name']}")
        for col in ("figure", "published", "this model predicts", "role", "source"):
            table.add_column(col, overflow="fold")
        for pub in result["published"]:
            pq = pub["published"]
            pred = pub.get("predicted")
            extra = pub.get("implied_bandwidth_efficiency") or pub.get("implied_compute_efficiency")
            shown = f"{pred['value']:.1f} {pred['unit']} ({pub['ratio']['value']:.2f}x)" if pred else ""
            if extra:
                shown += f"{'; ' if shown else ''}implied efficiency {extra['value']:.2f}"
            table.add_row(pub["what"], f"{pq['value']} {pq['unit']}", shown, pub["role"], pq["source"])
        console.print(table)
    for note in result["notes"]:
        console.print(f"note: {note}")
    console.print("sources:")
    for key, text in result["sources"].items():
        console.print(f"  {key}: {text}")
