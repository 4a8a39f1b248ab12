"""A bundle on disk: its manifest, verified file by file before anything runs.

The manifest is the single source of truth (graph files and I/O, arrays, router table, preprocessing,
prompt template, precision); nothing is inferred from file names.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rsedge.errors import BundleError

FORMAT = "rsedge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ArrayRef:
    """A raw array inside a bundle file (the embedding table lives in the decoder's weight file)."""

    file: str
    offset: int
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ArrayRef:
        return cls(d["file"], int(d["offset"]), tuple(int(s) for s in d["shape"]), d["dtype"])

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "offset": self.offset, "shape": list(self.shape), "dtype": self.dtype}

    def open(self, root: Path) -> np.ndarray:
        """Memory-mapped, read-only: a 151,936-row table costs nothing until rows are touched."""
        return np.memmap(root / self.file, dtype=np.dtype(self.dtype), mode="r", offset=self.offset, shape=self.shape)


class Bundle:
    """A verified bundle folder."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | Path, verify: str = "sha256") -> Bundle:
        """Open and check a bundle; ``verify`` is "sha256" (every byte), "size" or "none"."""
        root = Path(path)
        mpath = root / MANIFEST
        if not root.is_dir():
            raise BundleError(f"{root}: no such bundle folder")
        if not mpath.is_file():
            raise BundleError(f"{root}: not a bundle (no {MANIFEST})")
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"{mpath}: unreadable manifest ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BundleError(f"{mpath}: not an rsedge bundle manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"{mpath}: bundle format version {manifest.get('format_version')}, this rsedge reads {FORMAT_VERSION}"
            )
        bundle = cls(root, manifest)
        if verify != "none":
            bundle.verify(full=verify == "sha256")
        return bundle

    def verify(self, full: bool = True) -> None:
        files = self.manifest.get("files")
        if not isinstance(files, dict) or not files:
            raise BundleError(f"{self.root}: manifest lists no files")
        for rel, meta in files.items():
            p = self.root / rel
            if not p.is_file():
                raise BundleError(f"{self.root}: file {rel} named by the manifest is missing")
            if p.stat().st_size != meta["bytes"]:
                raise BundleError(
                    f"{self.root}: file {rel} has {p.stat().st_size} bytes, manifest says {meta['bytes']}"
                )
            if full and sha256_file(p) != meta["sha256"]:
                raise BundleError(f"{self.root}: file {rel} fails its sha256 check (modified or corrupt)")

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

    def array(self, key: str) -> np.ndarray:
        return ArrayRef.from_json(self.manifest["arrays"][key]).open(self.root)

    def path(self, rel: str) -> Path:
        return self.root / rel
