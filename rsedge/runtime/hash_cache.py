"""A per-user cache of files already hashed, so reopening an unchanged bundle skips rehashing it.

A full-size bundle is ~2 GB: hashing every byte costs seconds on each cold start. An entry records the sha256 a
file had when this user last hashed it, keyed by the file's identity: resolved path, device, inode, size,
modification and status-change times (nanoseconds). Any write to a file changes its ctime, which no user can set
back (``os.utime`` sets mtime and atime only, and itself moves ctime), so a file changed since its entry was made
misses the cache and is hashed again; the digest found is always compared with the manifest's.

What the cache does not trust:
- another host: the file records the host it was written on (a home folder shared over NFS sees other hosts'
  devices and inodes); a file from elsewhere is treated as empty;
- itself when unreadable, corrupt, not owned by this user or writable by others: treated as empty;
- a file changed less than ``RACY_NS`` before it was hashed: not recorded, since a second write within the file
  system's timestamp granularity would leave its identity as it was (git's "racily clean" entries);
- a file whose identity changed while it was being hashed: not recorded.

What it cannot see: a change made outside this running system that also forges the timestamps (the card
modified on another machine that keeps creation times, root setting the clock back or editing the inode). Where
someone can do that to a bundle's medium, open it with ``--verify sha256-nocache``, which reads every byte.

It lives at ``$XDG_CACHE_HOME/rsedge/verified-v1.json`` (``~/.cache`` without XDG_CACHE_HOME), written
atomically (mode 0600); a cache that cannot be written is skipped silently (a read-only home still runs).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rsedge.fsutil import write_file_atomic

CACHE_FILE = "verified-v1.json"
VERSION = 1
MAX_ENTRIES = 4096  # oldest dropped first; one entry is ~250 bytes
MAX_CACHE_BYTES = 8 << 20  # never read a huge file into memory
RACY_NS = 2_000_000_000  # FAT keeps mtime to 2 s; ext4 and others to a clock tick


def cache_path() -> Path:
    """``$XDG_CACHE_HOME/rsedge/verified-v1.json``; a relative XDG_CACHE_HOME is ignored, as the spec says."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "rsedge" / CACHE_FILE


def host_id() -> str:
    """This machine: its hostname and, where there is one, its machine-id (a cloned hostname differs there)."""
    machine = ""
    for p in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(p, encoding="ascii", errors="replace") as f:
                machine = f.read(64).strip()
            break
        except OSError:
            continue
    return f"{socket.gethostname()}/{machine}"


def identity(st: os.stat_result) -> dict[str, int]:
    """What must be unchanged for a recorded digest to stand."""
    return {
        "dev": st.st_dev,
        "ino": st.st_ino,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
    }


def _entry_ok(e: Any) -> bool:
    ints = ("dev", "ino", "size", "mtime_ns", "ctime_ns", "hashed_ns")
    if not isinstance(e, dict) or not all(isinstance(e.get(k), int) and not isinstance(e.get(k), bool) for k in ints):
        return False
    digest = e.get("sha256")
    return isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)


class HashCache:
    """The verified-hash cache of this user on this host; ``lookup`` / ``digest`` / ``save``."""

    def __init__(self, path: Path | None = None, lookup: bool = True) -> None:
        """``lookup=False``: hash every file, only record (``--verify sha256-nocache`` refreshes the cache)."""
        self.path = Path(path) if path is not None else cache_path()
        self.use = lookup
        self.host = host_id()
        self.entries: dict[str, dict[str, Any]] = self._load() if lookup else {}
        self._new: dict[str, dict[str, Any]] = {}

    def _load(self) -> dict[str, dict[str, Any]]:
        """The entries on disk, or none at all for a cache that is missing, unreadable, foreign or corrupt."""
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return {}
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_CACHE_BYTES:
                return {}
            if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
                return {}  # another user could have written it: trust nothing in it
            with os.fdopen(fd, "rb") as f:
                fd = -1
                data = json.loads(f.read(MAX_CACHE_BYTES + 1))
        except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            return {}
        finally:
            if fd >= 0:
                os.close(fd)
        if not isinstance(data, dict) or data.get("version") != VERSION or data.get("host") != self.host:
            return {}
        entries = data.get("entries")
        if not isinstance(entries, dict):
            return {}
        return {k: e for k, e in entries.items() if isinstance(k, str) and _entry_ok(e)}

    def lookup(self, real: Path, st: os.stat_result) -> str | None:
        """The sha256 recorded for this exact file identity, or None."""
        e = self._new.get(str(real)) or self.entries.get(str(real))
        if e is None or any(e[k] != v for k, v in identity(st).items()):
            return None
        return e["sha256"]

    def digest(self, real: Path, hash_file: Callable[[Path], str]) -> str:
        """The file's sha256: from the cache when its identity is unchanged, else hashed (and recorded)."""
        before = os.stat(real)
        hit = self.lookup(real, before) if self.use else None
        if hit is not None:
            return hit
        started = time.time_ns()
        digest = hash_file(real)
        after = os.stat(real)
        same = identity(before) == identity(after)
        settled = max(after.st_mtime_ns, after.st_ctime_ns) < started - RACY_NS
        if same and settled:
            self._new[str(real)] = {**identity(after), "sha256": digest, "hashed_ns": started}
        return digest

    def save(self) -> None:
        """Merge what was hashed into the file on disk (re-read: another process may have saved meanwhile)."""
        if not self._new:
            return
        try:
            merged = {**self._load(), **self._new}
            if len(merged) > MAX_ENTRIES:
                keep = sorted(merged, key=lambda k: merged[k]["hashed_ns"])[-MAX_ENTRIES:]
                merged = {k: merged[k] for k in keep}
            body = json.dumps({"version": VERSION, "host": self.host, "entries": merged}, separators=(",", ":"))
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_file_atomic(self.path, body.encode(), mode=0o600, overwrite=True)
        except OSError:
            return  # a read-only or full home: the next open hashes again, nothing worse
        self.entries.update(self._new)
        self._new.clear()
