"""Write a folder or a file atomically: build it beside its target, move it into place only when complete."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from rsedge.errors import OptionError, OutputError
from rsedge.temp_owner import make_owned_temp, remove_stale, sigterm_unwinds

# Errors of a write that no retry fixes: the user must make room or pick another place.
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def refuse_existing(out: Path) -> None:
    """Fail early, before a long job, on an output that atomic_folder would refuse: one that exists (a dangling
    symlink included) or lies under a file."""
    if os.path.lexists(out):
        if out.is_symlink() and not out.exists():
            raise OutputError(f"{out} already exists as a symlink to {os.readlink(out)}, which does not exist")
        raise OutputError(f"{out} already exists; remove it or choose another output folder")
    for folder in out.parents:
        if os.path.lexists(folder):
            if not folder.is_dir():
                raise OutputError(f"cannot write {out}: {folder} is a file, not a folder")
            return


@contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Yield an empty folder to fill; it becomes ``out`` on success and is deleted on any error or SIGTERM.

    It lies in a hidden temporary folder beside ``out`` that names its writer (:mod:`rsedge.temp_owner`), so the
    leftovers of a killed writer are removed by the next one. The checks run before any work: ``out`` must not
    exist, and its folder must be one this process can create entries in.
    """
    refuse_existing(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(out.parent, out.name)
    except OSError as e:
        raise OutputError(f"cannot write {out}: {e.strerror or e} ({e.filename or out.parent})") from None
    with sigterm_unwinds():  # outermost: the cleanup below runs before the process dies of the signal
        try:
            holder = make_owned_temp(out.parent, out.name)
        except OSError as e:
            raise OutputError(f"cannot write {out}: {e.strerror or e} ({e.filename or out.parent})") from None
        tmp = holder / "folder"
        try:
            tmp.mkdir()
            yield tmp
            umask = os.umask(0)
            os.umask(umask)
            for p in tmp.rglob("*"):
                if p.is_file():
                    os.chmod(p, 0o666 & ~umask)  # mkstemp-made files are private; these are ordinary files
            _move_into_place(tmp, out)
        except OSError as e:
            if e.errno in _WRITE_ERRNOS:
                raise OutputError(f"cannot write {out}: {e.strerror}") from None
            raise
        finally:
            shutil.rmtree(holder, ignore_errors=True)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; another process that got there first (two exports to one output) wins."""
    lost = f"{out} already exists: another process wrote it while this one was working; nothing of this run is kept"
    if os.path.lexists(out):
        raise OutputError(lost)
    try:
        os.rename(tmp, out)
    except OSError:
        if os.path.lexists(out):
            raise OutputError(lost) from None
        raise


def write_file_atomic(
    path: Path, content: bytes | Callable[[BinaryIO], None], mode: int = 0o666, overwrite: bool = False
) -> Path:
    """Write ``path`` through a temporary file in its folder, so no reader ever sees it half-written.

    ``content`` is the bytes, or a function writing into the open file. The file gets ``mode`` less the umask
    (0644 under the usual umask; mkstemp would make it 0600). ``overwrite=False`` never replaces an existing
    path, even one created meanwhile: the file is put in place with a hard link, which fails if the name exists.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)  # the kernel applies the umask
    try:
        with os.fdopen(fd, "wb") as handle:
            if callable(content):
                content(handle)
            else:
                handle.write(content)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise OptionError(f"{path} already exists; remove it or choose another name") from None
            except OSError:  # a file system without hard links (FAT on an SD card): check, then rename
                if os.path.lexists(path):
                    raise OptionError(f"{path} already exists; remove it or choose another name") from None
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
