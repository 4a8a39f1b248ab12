"""A folder of TensorRT engines built from a bundle (``rsedge build-engines``), checked before anything runs it.

``ENGINES/engines.json`` records what the engines were built from and for: the bundle (its manifest's sha256 and
each graph's sha256 from that manifest), the TensorRT version, the GPU (name and compute capability), and each
engine's file, sha256, optimization profile and precision flags. An engine is only valid for the exact TensorRT
and GPU that built it, and only answers like the bundle whose graphs it was built from, so :meth:`EngineSet.open`
refuses, one line each, engines of another bundle, TensorRT version or GPU, and an engine file that was edited,
with the command that rebuilds them.

Like the rest of the runtime this imports neither torch nor onnx; TensorRT and the CUDA binding are imported only
by :meth:`EngineSet.open` (and only after the bundle check, which needs neither).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rsedge.errors import BundleError
from rsedge.runtime.bundle import Bundle, plain_relative, sha256_file

ENGINES_JSON = "engines.json"
FORMAT = "rsedge-engines"
FORMAT_VERSION = 1
MAX_RECORD_BYTES = 1 << 20
# onnxruntime's names for the dtypes an engine's I/O can have (Pipeline casts its feeds by these).
_ORT_TYPES = {np.dtype(np.float32): "tensor(float)", np.dtype(np.float16): "tensor(float16)"}


def bundle_graphs(manifest: dict[str, Any]) -> list[str]:
    """Every graph file a bundle manifest names: the vision graph, then the decoder experts in order."""
    graphs = manifest.get("graphs", {})
    files = [graphs["vision"]["file"]] if "vision" in graphs else []
    experts = graphs.get("decoder", {}).get("experts", {})
    return files + [experts[k]["file"] for k in sorted(experts, key=int)]


def manifest_sha256(bundle: Bundle) -> str:
    """The sha256 of the manifest's exact bytes: it names every file's sha256, so it identifies the whole bundle."""
    return hashlib.sha256(bundle.manifest_bytes).hexdigest()


def build_command(bundle_root: Path | str, engines_dir: Path | str) -> str:
    return f"rsedge build-engines {bundle_root} -o {engines_dir}"


@dataclass(frozen=True)
class EngineSet:
    """Checked engines of one bundle: graph file -> engine file (resolved inside the engines folder)."""

    root: Path
    record: dict[str, Any]
    engines: dict[str, Path]
    device_id: int = 0

    @classmethod
    def open(cls, engines_dir: str | Path, bundle: Bundle, device_id: int = 0) -> EngineSet:
        """Check ``engines_dir`` against ``bundle``, the installed TensorRT and GPU ``device_id``, then hash every
        engine; each mismatch is one BundleError line that says how to rebuild."""
        root = Path(engines_dir)
        command = build_command(bundle.root, root)
        if not root.is_dir():
            raise BundleError(f"{root}: no such engines folder; build it on this device: {command}")
        hint = f"rebuild them on this device: {command}"
        record = _read_record(root, hint)
        entries = _check_bundle(root, record, bundle, hint)

        from rsedge.runtime.trt_session import gpu_identity, import_tensorrt

        built_by, installed = str(record.get("tensorrt")), import_tensorrt().__version__
        if built_by != installed:
            raise BundleError(f"{root}: engines built by TensorRT {built_by}, this machine has TensorRT {installed} "
                              f"(an engine runs only on the TensorRT version that built it); {hint}")  # fmt: skip
        gpu = record.get("gpu") if isinstance(record.get("gpu"), dict) else {}
        here = gpu_identity(device_id)
        if (gpu.get("name"), gpu.get("compute_capability")) != (here["name"], here["compute_capability"]):
            raise BundleError(
                f"{root}: engines built for {gpu.get('name')} (compute capability {gpu.get('compute_capability')}), "
                f"this GPU is {here['name']} (compute capability {here['compute_capability']}); {hint}"
            )
        engines = {graph: _check_engine_file(root, graph, entry, hint) for graph, entry in entries.items()}
        return cls(root, record, engines, device_id)

    def engine(self, graph: str) -> Path:
        """The checked engine built from bundle graph file ``graph``."""
        if graph not in self.engines:
            raise BundleError(f"{self.root}: no engine for {graph}")
        return self.engines[graph]

    def vision_session(self, graph: str) -> OrtStyleSession:
        """The vision engine behind the two calls Pipeline makes of an onnxruntime session."""
        from rsedge.runtime.trt_session import TrtSession

        return OrtStyleSession(TrtSession(self.engine(graph), device_id=self.device_id))


class OrtStyleSession:
    """A TrtSession answering ``get_inputs()`` and ``run(None, feeds) -> [outputs]`` as onnxruntime does."""

    @dataclass(frozen=True)
    class _Arg:
        name: str
        type: str
        shape: list[Any]

    def __init__(self, session: Any) -> None:
        self.session = session

    def _args(self, names: Sequence[str]) -> list[OrtStyleSession._Arg]:
        s = self.session
        out = []
        for n in names:
            dtype = s.dtypes[n]
            out.append(self._Arg(n, _ORT_TYPES.get(dtype, f"tensor({dtype.name})"), list(s.shape(n))))
        return out

    def get_inputs(self) -> list[OrtStyleSession._Arg]:
        return self._args(self.session.input_names)

    def get_outputs(self) -> list[OrtStyleSession._Arg]:
        return self._args(self.session.output_names)

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        outs = self.session.run(feeds)
        return [outs[n] for n in (output_names or self.session.output_names)]


def _read_record(root: Path, hint: str) -> dict[str, Any]:
    path = root / ENGINES_JSON
    if not path.is_file():
        raise BundleError(f"{root}: no {ENGINES_JSON} (not a complete rsedge build-engines output); {hint}")
    if path.stat().st_size > MAX_RECORD_BYTES:
        raise BundleError(f"{path}: larger than {MAX_RECORD_BYTES} bytes, not an engines record")
    try:
        record = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: unreadable ({e}); {hint}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise BundleError(f"{path}: not an rsedge engines record; {hint}")
    if record.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: engines record version {record.get('format_version')}, this rsedge reads "
                          f"{FORMAT_VERSION}; {hint}")  # fmt: skip
    if not isinstance(record.get("bundle"), dict) or not isinstance(record.get("engines"), dict):
        raise BundleError(f"{path}: engines record lacks its bundle or engines section; {hint}")
    return record


def _check_bundle(root: Path, record: dict[str, Any], bundle: Bundle, hint: str) -> dict[str, dict[str, Any]]:
    """The engine entries, once the record says they were built from exactly this bundle's graphs."""
    built_from = record["bundle"]
    graphs = built_from.get("graphs") if isinstance(built_from.get("graphs"), dict) else {}
    ours = {g: bundle.files[g].sha256 for g in bundle_graphs(bundle.manifest)}
    differ = sorted(g for g in ours if g in graphs and graphs[g] != ours[g])
    sha, want = manifest_sha256(bundle), built_from.get("manifest_sha256")
    if differ or sha != want:
        which = f"graphs that differ: {', '.join(differ)}" if differ else "same graphs, other manifest"
        raise BundleError(f"{root}: engines built from another bundle (manifest sha256 {str(want)[:12]}, "
                          f"{bundle.root}'s is {sha[:12]}; {which}); {hint}")  # fmt: skip
    entries = record["engines"]
    missing = [g for g in ours if g not in entries or g not in graphs]
    if missing:
        raise BundleError(f"{root}: no engine for {', '.join(missing)} (built with --graphs?); {hint}")
    for g in ours:
        if not isinstance(entries[g], dict) or entries[g].get("graph_sha256") != ours[g]:
            raise BundleError(f"{root}: the engine of {g} was built from another graph; {hint}")
    return {g: entries[g] for g in ours}


def _check_engine_file(root: Path, graph: str, entry: dict[str, Any], hint: str) -> Path:
    rel = entry.get("file")
    if not plain_relative(rel):
        raise BundleError(f"{root}: {ENGINES_JSON} names engine {rel!r} for {graph}, not a path inside the folder")
    real_root = root.resolve()
    try:
        real = (real_root / rel).resolve()
    except (OSError, RuntimeError):
        raise BundleError(f"{root}: engine {rel} cannot be resolved (symlink loop)") from None
    if not real.is_relative_to(real_root):  # decided before anything is stat'ed
        raise BundleError(f"{root}: engine {rel} links outside the engines folder")
    if not real.is_file():
        raise BundleError(f"{root}: engine {rel} of {graph} is missing; {hint}")
    size = real.stat().st_size
    if size != entry.get("bytes") or sha256_file(real) != entry.get("sha256"):
        raise BundleError(f"{root}: engine {rel} fails its sha256 check (modified or corrupt); {hint}")
    return real
