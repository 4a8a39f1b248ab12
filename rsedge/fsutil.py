"""Write a folder atomically: build it beside its target, move it into place only when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rsedge.errors import OptionError


def refuse_existing(out: Path) -> None:
    """Fail early, before a long job, on an output that atomic_folder would refuse at its end."""
    if out.exists():
        raise OptionError(f"{out} already exists; remove it or choose another output folder")


@contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; rename it to ``out`` on success, delete it on any error."""
    refuse_existing(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
        for p in tmp.rglob("*"):
            if p.is_file():
                os.chmod(p, 0o666 & ~umask)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
