"""Temporary folders that say who made them, so a killed job's leftovers can be told from a running job's.

An export builds its bundle in a hidden folder beside the output. SIGTERM is turned into an exception for the
duration, so the usual cleanup runs; SIGKILL or a power cut cannot be caught, so each folder carries a marker
(process id, host, boot id) and the next job writing the same output removes the folders whose writer provably
no longer runs: same host, and that process is gone or the machine has rebooted since.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MARKER = "owner.json"
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def _boot_id() -> str | None:
    try:
        return _BOOT_ID.read_text().strip() or None
    except OSError:  # not Linux
        return None


def _identity() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": _boot_id()}


def make_owned_temp(parent: Path, target: str) -> Path:
    """A new private folder ``.<target>.XXXX`` in ``parent``, with the marker naming this process inside."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target}.", dir=parent))
    try:
        (tmp / MARKER).write_text(json.dumps({**_identity(), "target": target, "created": time.time()}) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _process_gone(pid: int) -> bool:
    if os.name != "posix":  # no safe liveness probe (os.kill(pid, 0) is not one on Windows): assume it runs
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it exists, under another user
        return False
    return False


def is_stale(tmp: Path, target: str) -> bool:
    """True when ``tmp`` is a temporary folder for ``target`` whose writer provably no longer runs."""
    try:
        owner = json.loads((tmp / MARKER).read_text())
    except (OSError, ValueError):
        return False  # no readable marker: not provably ours
    if not isinstance(owner, dict) or owner.get("target") != target or owner.get("host") != socket.gethostname():
        return False
    pid = owner.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    booted = owner.get("boot_id")
    now = _boot_id()
    if booted and now and booted != now:
        return True  # the machine rebooted since: no process of then still runs
    return _process_gone(pid)


def remove_stale(parent: Path, target: str) -> list[Path]:
    """Remove the leftover temporary folders of killed writers of ``target`` in ``parent``; returns them."""
    removed = []
    with contextlib.suppress(OSError):
        candidates = sorted(parent.glob(f".{glob.escape(target)}.*"))
        for tmp in candidates:
            if tmp.is_dir() and not tmp.is_symlink() and is_stale(tmp, target):
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
    return removed


class Terminated(BaseException):
    """Raised in the main thread when SIGTERM arrives inside :func:`sigterm_unwinds`."""


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM into a :class:`Terminated` exception inside the block, so cleanup code runs; afterwards the
    process dies of the signal as it would have. A no-op outside the main thread (Python delivers signals there
    only) and where SIGTERM is ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_IGN or previous is None:  # ignored, or a handler installed outside Python
        yield
        return

    fired = []

    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
        fired.append(signum)
        raise Terminated(signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except BaseException as e:
        # Raised inside an extension's callback (torch reading safetensors), Terminated can come back as that
        # library's own error ("could not determine the shape of object type ..."): the signal still decides.
        if not isinstance(e, Terminated) and not fired:
            raise
        signal.signal(signal.SIGTERM, previous)
        if previous == signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGTERM)  # die of the signal: the exit status a supervisor expects
        elif callable(previous):
            previous(signal.SIGTERM, None)
        raise
    else:
        if fired:  # the exception was caught and swallowed on the way: the block finished, the signal still stands
            signal.signal(signal.SIGTERM, previous)
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
