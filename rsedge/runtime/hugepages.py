"""Transparent huge pages for the weights and KV cache a CPU decode step streams.

A decode step reads every weight once (about 260 MB for the 0.5B INT4 decoder) and the whole KV cache. With
4 KiB pages that is ~65,000 TLB misses per step; the same bytes in 2 MiB pages read measurably faster (measured
on the project's Xeon VM, 2 threads: a 512 MB sum 9.2 -> 12.2-13.4 GB/s; an INT4 decode step at 760 positions
28.7 -> 25.7 ms with glibc allocating in huge pages). Most kernels ship THP in ``madvise`` mode, where only
memory a process asked for gets huge pages. numpy asks for its large arrays (the KV cache is one); onnxruntime
does not. So, on Linux, the memory a new session has written (its prepacked weights) is collapsed into huge
pages with ``MADV_COLLAPSE`` (Linux 6.1+; an older kernel, e.g. JetPack 6's 5.15, takes ``MADV_HUGEPAGE`` and
khugepaged collapses it later). Only huge pages whose every small page is resident are touched, so sparse
reservations (thread stacks, an arena's tail) do not grow into whole huge pages.

Everything here is advice: a kernel that refuses it (THP ``never``, no ``MADV_COLLAPSE``, not Linux) changes
nothing and costs nothing, and the numbers computed are the same either way.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
SMALL_PAGE = 4096  # mincore's unit here: x86_64 and JetPack's aarch64 kernels use 4 KiB pages (others: off)
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25  # <asm-generic/mman-common.h>, the same on x86_64 and aarch64
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
ENV_SWITCH = "RSEDGE_HUGE_PAGES"  # "0" turns the advice off for a process


def enabled_by_env() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def thp_mode() -> str | None:
    """The kernel's THP mode (``always``, ``madvise`` or ``never``), or None where there is no THP."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        text = THP_ENABLED.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def supported() -> bool:
    return thp_mode() in ("always", "madvise") and os.sysconf("SC_PAGE_SIZE") == SMALL_PAGE


_libc: ctypes.CDLL | None = None


def _madvise(start: int, length: int, advice: int) -> int:
    """madvise(2); 0 or the errno. ctypes releases the GIL for the call (a collapse copies megabytes)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise.restype = ctypes.c_int
    return 0 if _libc.madvise(start, length, advice) == 0 else ctypes.get_errno()


def _mincore(start: int, length: int, vec: np.ndarray) -> int:
    """mincore(2) into ``vec`` (one byte per small page); 0 or the errno."""
    global _libc
    if _libc is None:
        _madvise(0, 0, 0)  # loads libc
    assert _libc is not None
    _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    _libc.mincore.restype = ctypes.c_int
    return 0 if _libc.mincore(start, length, vec.ctypes.data) == 0 else ctypes.get_errno()


def _interior(start: int, end: int) -> tuple[int, int]:
    """The whole huge pages inside [start, end)."""
    return (start + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1), end & ~(HUGE_PAGE - 1)


@dataclass(frozen=True)
class Region:
    start: int
    end: int
    rss_kb: int
    huge_kb: int


def anonymous_regions() -> list[Region]:
    """This process's private anonymous writable mappings (the heap included), from /proc/self/smaps."""
    regions: list[Region] = []
    current: dict[str, int] | None = None
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return regions
    for line in lines:
        head = line.split(maxsplit=5)
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            if current is not None:
                regions.append(Region(**current))
            current = None
            path = head[5].strip() if len(head) > 5 else ""
            if head[1].startswith("rw") and head[1].endswith("p") and path in ("", "[heap]"):
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                current = {"start": lo, "end": hi, "rss_kb": 0, "huge_kb": 0}
        elif current is not None and head[0] in ("Rss:", "AnonHugePages:"):
            current["rss_kb" if head[0] == "Rss:" else "huge_kb"] = int(head[1])
    if current is not None:
        regions.append(Region(**current))
    return regions


def anon_huge_bytes() -> int:
    """Bytes of this process's anonymous memory mapped in huge pages."""
    return sum(r.huge_kb for r in anonymous_regions()) << 10


@dataclass(frozen=True)
class Collapse:
    runs: int  # resident runs advised
    collapsed: int  # of them, how many the kernel collapsed there and then (MADV_COLLAPSE)
    nbytes: int  # bytes advised
    seconds: float


def resident_runs(start: int, end: int) -> list[tuple[int, int]]:
    """The runs of whole huge pages inside [start, end) whose every 4 KiB page is resident (mincore(2)):
    memory that was written, where a huge page costs no more RAM than the small pages it replaces."""
    start, end = _interior(start, end)
    if end <= start:
        return []
    vec = np.zeros((end - start) // SMALL_PAGE, dtype=np.uint8)
    if _mincore(start, end - start, vec) != 0:
        return []
    full = (vec.reshape(-1, HUGE_PAGE // SMALL_PAGE) & 1).all(axis=1)
    runs: list[tuple[int, int]] = []
    edges = np.flatnonzero(np.diff(np.concatenate(([0], full.astype(np.int8), [0]))))
    for lo, hi in zip(edges[0::2], edges[1::2], strict=True):
        runs.append((start + int(lo) * HUGE_PAGE, start + int(hi) * HUGE_PAGE))
    return runs


def collapse_resident(min_bytes: int = HUGE_PAGE) -> Collapse:
    """Advise, and collapse into huge pages now where the kernel can, every wholly resident run of at least
    ``min_bytes`` of this process's anonymous memory not yet in huge pages. Only whole resident huge pages are
    touched, so collapsing adds no RSS (a mostly untouched reservation, e.g. a thread stack, stays as it is)."""
    t0 = time.perf_counter()
    runs = collapsed = nbytes = 0
    if supported() and enabled_by_env():
        for r in anonymous_regions():
            lo, hi = _interior(r.start, r.end)
            if hi - lo < min_bytes or (r.huge_kb << 10) >= hi - lo:  # too small, or already huge pages
                continue
            for start, end in resident_runs(r.start, r.end):
                if end - start < min_bytes or _madvise(start, end - start, MADV_HUGEPAGE) != 0:
                    continue
                runs += 1
                nbytes += end - start
                # EINVAL: a kernel before 6.1; EAGAIN/ENOMEM: pages busy or no huge page free now. khugepaged
                # collapses an advised range later either way.
                collapsed += _madvise(start, end - start, MADV_COLLAPSE) == 0
    return Collapse(runs, collapsed, nbytes, time.perf_counter() - t0)


# One background worker per process: a session's weights are collapsed while the request that created it goes
# on (a collapse copies its pages once; ~0.2 s for a full-size decoder on the project's VM).
_worker: ThreadPoolExecutor | None = None
_pending: Future | None = None
_lock = threading.Lock()


def collapse_soon() -> Future | None:
    """Collapse resident memory in the background (coalesced: one pending collapse at a time)."""
    global _worker, _pending
    if not supported() or not enabled_by_env():
        return None
    with _lock:
        if _pending is not None and not _pending.running() and not _pending.done():
            return _pending  # a queued collapse will see this session's memory too
        if _worker is None:
            _worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rsedge-hugepages")
        _pending = _worker.submit(_collapse_logged)
        return _pending


def _collapse_logged() -> Collapse:
    done = collapse_resident()
    log.debug("huge pages: %d runs, %d collapsed, %.0f MB, %.3f s", done.runs, done.collapsed,
              done.nbytes / 1e6, done.seconds)
    return done


def wait() -> None:
    """Block until the pending background collapse (if any) has finished."""
    with _lock:
        pending = _pending
    if pending is not None:
        pending.result()
