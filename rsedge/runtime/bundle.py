"""A bundle on disk: its manifest, verified file by file before anything runs.

The manifest is the single source of truth (graph files and I/O, arrays, router table, preprocessing,
prompt template, precision); nothing is inferred from file names.

A bundle may come from someone else, so nothing it names is trusted: every file the runtime opens must be one
the manifest hashes (``files``), named by a plain relative path that stays inside the folder after symlinks;
that includes the external-data files each ONNX graph names, which onnxruntime would otherwise open unchecked.
Array extents are checked against file sizes before anything is memory-mapped. With trusted keys, the manifest's
exact bytes must carry an Ed25519 signature by one of them (:mod:`rsedge.runtime.signing`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from rsedge.errors import BundleError, OptionError, SignatureError
from rsedge.runtime import forms
from rsedge.runtime.hash_cache import HashCache
from rsedge.runtime.manifest_fields import Fields
from rsedge.runtime.onnx_refs import OnnxFormatError, graph_external_locations

FORMAT = "rsedge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"  # beside the manifest, never in its own file list (it signs that list)
MAX_MANIFEST_BYTES = 64 << 20  # a full-size manifest is ~100 kB; refuse to read a huge one into memory
# sha256: every byte, through the per-user verified-hash cache (rsedge.runtime.hash_cache) for unchanged files;
# sha256-nocache: every byte, read again
VERIFY_MODES = ("sha256", "sha256-nocache", "size", "none")
HASHED_MODES = ("sha256", "sha256-nocache")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def plain_relative(rel: Any) -> bool:
    """A normalized relative POSIX path with no ``..``: the only form a bundle may use to name a file."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        return False
    p = PurePosixPath(rel)
    return not p.is_absolute() and ".." not in p.parts and p.as_posix() == rel


@dataclass(frozen=True)
class ArrayRef:
    """A raw array inside a bundle file (the embedding table lives in the decoder's weight file)."""

    file: str
    offset: int
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def from_json(cls, d: Any, where: str = "array") -> ArrayRef:
        """Parse and check one ``arrays`` entry; garbage is a BundleError naming ``where``."""
        if not isinstance(d, dict):
            raise BundleError(f"{where} must be an object")
        file, offset, shape, dtype = (d.get(k) for k in ("file", "offset", "shape", "dtype"))
        if not isinstance(file, str):
            raise BundleError(f"{where}.file must be a file name")
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise BundleError(f"{where}.offset must be a non-negative integer")
        if not isinstance(shape, list) or not shape or not all(_positive_int(s) for s in shape):
            raise BundleError(f"{where}.shape must be a list of positive integers")
        if not _plain_numeric_dtype(dtype):
            raise BundleError(f"{where}.dtype {dtype!r} is not a numeric numpy dtype name")
        return cls(file, offset, tuple(shape), dtype)

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "offset": self.offset, "shape": list(self.shape), "dtype": self.dtype}

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=object)) * np.dtype(self.dtype).itemsize

    def check_fits(self, size: int, where: str) -> None:
        if self.offset + self.nbytes > size:
            raise BundleError(
                f"{where}: {self.dtype}{list(self.shape)} at offset {self.offset} needs {self.offset + self.nbytes} "
                f"bytes of {self.file}, which has {size}"
            )


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _plain_numeric_dtype(name: Any) -> bool:
    try:
        dt = np.dtype(name) if isinstance(name, str) else None
    except TypeError:
        return False
    return dt is not None and dt.kind in "fiu" and dt.name == name


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


class Bundle:
    """A checked bundle folder: open with :meth:`open`; load files only through :meth:`path` and :meth:`array`."""

    def __init__(self, root: Path, manifest: dict[str, Any], manifest_bytes: bytes = b"") -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.manifest_bytes = manifest_bytes  # exactly what was parsed (and, with trusted keys, verified)
        self._real_root = self.root.resolve()
        self.files = self._file_list()
        self._real = {rel: self._locate(rel) for rel in self.files}
        self._arrays: dict[str, ArrayRef] = {}
        self._graph_data: dict[str, list[str]] = {}  # graph -> the listed files holding its external data
        self.hashed = False  # whether open() checked every file against its sha256
        # The decoder form ``manifest`` describes (rsedge.runtime.forms): the first, or the one for_device chose;
        # None for a one-form bundle.
        self.form = forms.primary(manifest)
        self.full_manifest = manifest  # every form's (``manifest`` is one form's in a for_device view)
        self._check_references()

    @classmethod
    def open(
        cls,
        path: str | Path,
        verify: str = "sha256",
        trust: Sequence[str | Path | bytes | Any] | None = None,
    ) -> Bundle:
        """Open and check a bundle; ``verify`` is "sha256" (every byte, or its digest cached from when this user
        hashed the unchanged file), "sha256-nocache" (every byte, read now), "size" or "none".

        ``trust``: public keys (PEM files, PEM or raw 32-byte Ed25519 keys); when given, the bundle must carry
        a signature by one of them and every file is checked against its sha256 (``verify`` must be a sha256 mode).
        """
        if verify not in VERIFY_MODES:
            raise OptionError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
        if trust is not None and verify not in HASHED_MODES:
            raise OptionError(
                f"trusted keys need --verify sha256, not {verify}: the signature covers files through their sha256"
            )
        root = Path(path)
        if not root.is_dir():
            raise BundleError(f"{root}: no such bundle folder")
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"{root}: not a bundle (no {MANIFEST})")
        raw = _read_small(root, MANIFEST, MAX_MANIFEST_BYTES)
        if trust is not None:
            signing = signing_module()
            keys = signing.load_public_keys(trust)
            signing.verify_manifest_signature(root, raw, _read_signature(root), keys)
        try:
            manifest = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"{mpath}: unreadable manifest ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BundleError(f"{mpath}: not an rsedge bundle manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"{mpath}: bundle format version {manifest.get('format_version')}, this rsedge reads {FORMAT_VERSION}"
            )
        bundle = cls(root, manifest, raw)
        if verify != "none":
            bundle.verify(full=verify in HASHED_MODES, cache={"sha256": "use", "sha256-nocache": "refresh"}.get(verify))
            bundle.hashed = verify in HASHED_MODES
        bundle._check_graph_data()
        return bundle

    # -- what the manifest names ----------------------------------------------------------------------

    def _file_list(self) -> dict[str, FileEntry]:
        files = self.manifest.get("files")
        if not isinstance(files, dict) or not files:
            raise BundleError(f"{self.root}: manifest lists no files")
        out: dict[str, FileEntry] = {}
        for rel, meta in files.items():
            if not plain_relative(rel):
                raise BundleError(f"{self.root}: manifest names file {rel!r}, which is not a path inside the bundle")
            if rel in (MANIFEST, SIGNATURE):
                raise BundleError(f"{self.root}: manifest lists {rel} among its own hashed files")
            size = meta.get("bytes") if isinstance(meta, dict) else None
            digest = meta.get("sha256") if isinstance(meta, dict) else None
            if not (isinstance(size, int) and not isinstance(size, bool) and size >= 0):
                raise BundleError(f"{self.root}: manifest entry of {rel} has no byte count")
            if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
                raise BundleError(f"{self.root}: manifest entry of {rel} has no sha256")
            out[rel] = FileEntry(size, digest)
        return out

    def _locate(self, rel: str) -> Path:
        """The real path of a listed file; it must stay inside the bundle after symlinks and be a regular file."""
        try:
            real = (self._real_root / rel).resolve()
        except (OSError, RuntimeError):  # a symlink loop
            raise BundleError(f"{self.root}: file {rel} cannot be resolved (symlink loop)") from None
        # Decided before anything is stat'ed: the message never tells whether an outside file exists.
        if not real.is_relative_to(self._real_root):
            raise BundleError(f"{self.root}: file {rel} links outside the bundle")
        if not real.exists():
            raise BundleError(f"{self.root}: file {rel} named by the manifest is missing")
        if not real.is_file():
            raise BundleError(f"{self.root}: file {rel} is not a regular file")
        return real

    def _graph_files(self) -> Iterator[tuple[str, Any]]:
        """(field, file) of every graph the manifest names, wherever it sits under ``graphs``, and every second
        form's decoders (``forms.<name>.decoder``)."""
        stack: list[tuple[str, Any]] = [("graphs", self.manifest.get("graphs"))]
        stack += [(f"forms.{name}.decoder", e.get("decoder")) for name, e in forms.carried(self.manifest).items()]
        while stack:
            field, node = stack.pop()
            if isinstance(node, dict):
                if "file" in node:
                    yield f"{field}.file", node["file"]
                stack.extend((f"{field}.{k}", v) for k, v in node.items() if k != "file")

    def _check_references(self) -> None:
        """Every file the manifest names elsewhere is a listed (hashed) file; arrays fit inside theirs."""
        fields = Fields(str(self.root), self.manifest)
        fields.check_runtime_fields()
        self._check_forms()
        refs = [("tokenizer.file", self.manifest["tokenizer"]["file"]), *self._graph_files()]
        for name, entry in self.manifest["arrays"].items():
            ref = ArrayRef.from_json(entry, f"{self.root}: manifest field arrays.{name}")
            refs.append((f"arrays.{name}.file", ref.file))
            self._arrays[name] = ref
        for field, rel in refs:
            if not isinstance(rel, str) or rel not in self.files:
                raise fields.fail(field, f"names {rel!r}, which is not among the bundle's hashed files")
        for name, ref in self._arrays.items():
            ref.check_fits(self.files[ref.file].size, f"{self.root}: array {name}")

    def _check_forms(self) -> None:
        """A second form's fields as the runtime will read them: its view must pass the same checks, with as many
        experts as the first."""
        carried = self.manifest.get("forms")
        if carried is None:
            return
        if not isinstance(carried, dict) or not all(isinstance(e, dict) for e in carried.values()):
            raise BundleError(f"{self.root}: manifest field forms must map form names to objects")
        if sum(bool(e.get("primary")) for e in carried.values()) != 1:
            raise BundleError(f"{self.root}: manifest field forms must name one primary form")
        experts = len(self.manifest["graphs"]["decoder"]["experts"])
        for name in carried:
            view = forms.form_manifest(self.manifest, name)
            Fields(f"{self.root} ({name} form)", view).check_runtime_fields()
            if len(view["graphs"]["decoder"]["experts"]) != experts:
                raise BundleError(f"{self.root}: the {name} form has other experts than the first form's {experts}")

    def for_device(self, device: str) -> Bundle:
        """This bundle as the one-form bundle ``device`` runs (rsedge.runtime.forms.DEVICE_FORMS): itself where it
        carries one form or that form is already chosen, else a view whose manifest is that form's. Files, hashes
        and the signed manifest bytes are the bundle's own."""
        form = forms.form_for_device(self.full_manifest, device)
        if form is None or form == self.form:
            return self
        view = copy.copy(self)
        view.manifest = forms.form_manifest(self.full_manifest, form)
        view.form = form
        return view

    def _check_graph_data(self) -> None:
        """Each graph's external data must be listed files: onnxruntime opens them by the names the graph holds."""
        by_real = {real: rel for rel, real in self._real.items()}
        for _, rel in self._graph_files():
            graph = self._real[rel]
            try:
                locations = graph_external_locations(graph)
            except (OnnxFormatError, OSError) as e:
                raise BundleError(f"{self.root}: graph {rel} is not a readable ONNX file ({e})") from None
            for loc in sorted(locations):
                if not plain_relative(loc):
                    raise BundleError(f"{self.root}: graph {rel} names external data {loc!r} outside the bundle")
                if (graph.parent / loc).resolve() not in by_real:
                    raise BundleError(
                        f"{self.root}: graph {rel} reads external data {loc}, which is not among the hashed files"
                    )
            self._graph_data[rel] = sorted(by_real[(graph.parent / loc).resolve()] for loc in locations)

    def verify(self, full: bool = True, cache: str | None = None) -> None:
        """Every listed file's size, and with ``full`` its sha256. ``cache`` "use" takes the digest of a file
        unchanged since this user last hashed it from the verified-hash cache (:mod:`rsedge.runtime.hash_cache`),
        "refresh" hashes every file and records the digests there, None leaves the cache alone."""
        for rel, entry in self.files.items():  # sizes first: a truncated file fails before anything is hashed
            size = self._real[rel].stat().st_size
            if size != entry.size:
                raise BundleError(f"{self.root}: file {rel} has {size} bytes, manifest says {entry.size}")
        if not full:
            return
        hashes = HashCache(lookup=cache == "use") if cache in ("use", "refresh") else None
        try:
            for rel, entry in self.files.items():
                real = self._real[rel]
                digest = hashes.digest(real, sha256_file) if hashes is not None else sha256_file(real)
                if digest != entry.sha256:
                    raise BundleError(f"{self.root}: file {rel} fails its sha256 check (modified or corrupt)")
        finally:
            if hashes is not None:
                hashes.save()  # what was hashed, good or not: a digest is the file's, whatever the manifest says

    # -- typed views of the manifest ------------------------------------------------------------

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def model(self) -> dict[str, Any]:
        return self.manifest["model"]

    @property
    def router(self) -> dict[str, Any]:
        return self.manifest["router"]

    @property
    def preprocess(self) -> dict[str, Any]:
        return self.manifest["preprocess"]

    @property
    def prompt(self) -> dict[str, Any]:
        return self.manifest["prompt"]

    def graph(self, key: str) -> dict[str, Any]:
        return self.manifest["graphs"][key]

    def graph_digest(self, rel: str) -> str | None:
        """One sha256 over graph file ``rel`` and every external-data file it reads, from the manifest's digests:
        what the graph computes, whatever the bundle is called. None unless open() hashed every file (sizes alone
        say nothing about content)."""
        if not self.hashed:
            return None
        parts = [f"{name}:{self.files[name].sha256}" for name in (rel, *self._graph_data.get(rel, []))]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    @property
    def shared_kv(self) -> bool:
        """Whether the decoders read and append one capacity-long KV buffer per layer (bound as past and
        present) rather than taking a past and returning past + new. Bundles before the ``kv_cache`` field
        had one such form, gqa-shared."""
        dec = self.graph("decoder")
        return dec.get("kv_cache", "shared" if dec.get("attention") == "gqa-shared" else "past-present") == "shared"

    def path(self, rel: str) -> Path:
        """Where a file of the bundle is, for any loader: only files the manifest hashes, resolved in the folder."""
        real = self._real.get(rel) if isinstance(rel, str) else None
        if real is None:
            raise BundleError(f"{self.root}: {rel!r} is not among the files the manifest hashes")
        return real

    def array(self, key: str) -> np.ndarray:
        """A memory-mapped array, after checking it fits in its file as the file is now."""
        ref = self._arrays.get(key)
        if ref is None:
            raise BundleError(f"{self.root}: manifest has no array {key!r}")
        path = self.path(ref.file)
        ref.check_fits(path.stat().st_size, f"{self.root}: array {key}")
        return np.memmap(path, dtype=np.dtype(ref.dtype), mode="r", offset=ref.offset, shape=ref.shape)


def _read_small(root: Path, name: str, limit: int) -> bytes:
    """A bundle's own file (manifest, signature): regular, inside the folder, at most ``limit`` bytes."""
    real_root = root.resolve()
    real = (root / name).resolve()
    if not real.is_relative_to(real_root) or not real.is_file():
        raise BundleError(f"{root}: {name} is not a regular file inside the bundle")
    try:
        with open(real, "rb") as f:
            if os.fstat(f.fileno()).st_size > limit:
                raise BundleError(f"{root}: {name} is larger than {limit} bytes")
            return f.read(limit + 1)
    except OSError as e:
        raise BundleError(f"{root}: cannot read {name} ({e.strerror})") from None


def _read_signature(root: Path) -> bytes:
    if not os.path.lexists(root / SIGNATURE):
        raise SignatureError(f"{root}: bundle is not signed (no {SIGNATURE}); trusted keys require a signature")
    return _read_small(root, SIGNATURE, 4096)


def signing_module():
    """rsedge.runtime.signing, imported only when keys are trusted (cryptography is in the runtime extras)."""
    try:
        from rsedge.runtime import signing
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "cryptography":
            raise
        raise OptionError("trusted keys need the cryptography package: pip install 'rsedge[runtime]'") from None
    return signing
