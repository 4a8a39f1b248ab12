"""Graphs onnxruntime has already optimized, kept per user so that a session is created without optimizing again.

Creating a CPU session of the static INT8 vision graph is mostly onnxruntime's graph optimization (its QDQ
fusions into QLinearMatMul and friends): about half of the session's creation on the full-size tower, on the
critical path of a process's first request. onnxruntime can save the graph it optimized
(``optimized_model_filepath``) and load that later with its optimizations off: the "offline" mode its
documentation gives, valid for the same onnxruntime, providers, optimization level and hardware.

So an entry is keyed by all of those: the graph's content (the sha256 the bundle's manifest gives its file and
external data, taken only from a bundle whose files open() hashed), the onnxruntime version, the providers,
the optimization level, this machine's CPU model and instruction-set flags (the saved graph may hold layouts
for this CPU's vector width), and this module's format version. Entries live outside any bundle, under
``$XDG_CACHE_HOME/rsedge/ort-optimized-v1/<key>/``, each written in a temporary folder and moved into place
whole (:func:`rsedge.fsutil.atomic_folder`). An entry records the sha256 of its files; one that is incomplete,
altered, unreadable or that onnxruntime refuses is removed and rebuilt from the bundle's graph, never trusted,
never fatal. A cache that cannot be written (read-only home, full disk) only means the next start optimizes again.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from rsedge.fsutil import atomic_folder
from rsedge.runtime.bundle import sha256_file
from rsedge.runtime.hash_cache import HashCache

CACHE_DIR = "ort-optimized-v1"
FORMAT = 1
GRAPH, DATA, ENTRY = "graph.onnx", "graph.onnx.data", "entry.json"
# The session config entries that make onnxruntime write the optimized graph's weights beside it, not inside
# (a protobuf holds 2 GB at most).
EXTERNAL_FILE = "session.optimized_model_external_initializers_file_name"
EXTERNAL_MIN_BYTES = "session.optimized_model_external_initializers_min_size_in_bytes"

S = TypeVar("S")


def default_root() -> Path:
    """``$XDG_CACHE_HOME/rsedge/ort-optimized-v1``; a relative XDG_CACHE_HOME is ignored, as the spec says."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / "rsedge" / CACHE_DIR


def cpu_identity() -> str:
    """This CPU's architecture, model name and instruction-set flags (Linux; elsewhere what platform says)."""
    model, flags = platform.processor(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = " ".join(sorted(value.split()))
    except OSError:
        pass
    return f"{platform.machine()}|{model}|{flags}"


def entry_key(content: str, ort_version: str, providers: list[str], level: str) -> str:
    """The entry's folder name: a sha256 over everything the saved graph depends on."""
    fields = {
        "format": FORMAT,
        "content": content,
        "onnxruntime": ort_version,
        "providers": providers,
        "level": level,
        "cpu": cpu_identity(),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class OptimizedGraphCache:
    """``session(key, source, load, optimize)``: a session of the cached optimized graph, or of ``source``
    optimized now (and saved for next time)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()

    def session(
        self,
        key: str,
        source: Path,
        load: Callable[[Path], S],
        optimize: Callable[[Path, dict[str, str] | None], S],
    ) -> S:
        """``load(path)`` makes a session of an optimized graph with optimizations off; ``optimize(path, save)``
        makes one optimizing ``path`` and, unless ``save`` is None, writes the optimized graph as its session
        config entries say (``save["path"]`` is the ``optimized_model_filepath``)."""
        entry = self.root / key
        if self._intact(entry):
            try:
                return load(entry / GRAPH)
            except Exception:  # onnxruntime's errors derive from Exception alone
                pass  # saved by another onnxruntime build, or damaged in a way the digests missed: rebuild
        shutil.rmtree(entry, ignore_errors=True)
        sess = None
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            with atomic_folder(entry) as tmp:
                sess = optimize(source, {"path": str(tmp / GRAPH), EXTERNAL_FILE: DATA, EXTERNAL_MIN_BYTES: "1024"})
                files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
                if GRAPH not in files:  # onnxruntime saved nothing: no entry rather than an empty one
                    raise OSError(f"onnxruntime wrote no optimized graph for {source}")
                (tmp / ENTRY).write_text(json.dumps({"format": FORMAT, "source": str(source), "files": files}))
        except Exception:  # a cache that cannot be written is no reason to fail a request
            # Not writable, full, or another process put the same entry in place first. A session made while
            # writing is as good; if the failure came before it, the graph is optimized without saving (and a
            # bad graph then raises its own error there).
            pass
        return sess if sess is not None else optimize(source, None)

    def _intact(self, entry: Path) -> bool:
        """Whether ``entry`` is complete and every file has the sha256 it was written with (files unchanged since
        this user hashed them are looked up in the verified-hash cache, not read again)."""
        try:
            record: Any = json.loads((entry / ENTRY).read_text())
            files = record["files"]
            if record.get("format") != FORMAT or not isinstance(files, dict) or GRAPH not in files:
                return False
            present = {p.name for p in entry.iterdir()} - {ENTRY}
            if present != set(files):
                return False
            hashes = HashCache()
            try:
                return all(hashes.digest(entry / name, sha256_file) == digest for name, digest in files.items())
            finally:
                hashes.save()
        except (OSError, ValueError, KeyError, TypeError):
            return False
