"""The batch output: a JSONL file that is also the batch's memory.

Line 1 is a header naming the job (the bundle's manifest sha256, the prompt and the generation settings); each
further line is one item's record, written whole with one ``write`` on an append-only descriptor, so a line is
in the file (in the kernel's hands) as soon as its item is done. A run that finds the file already there reads it
back: items it holds are skipped; a last line without its newline is what a kill mid-write leaves, and is cut
off and redone; a header of another job is refused, so two jobs never mix in one file. An advisory lock keeps
two batches from appending to one file at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rsedge.batch.answer import Job
from rsedge.errors import OptionError, OutputError

FORMAT = "rsedge-batch"
FORMAT_VERSION = 1


def job_header(bundle: str | Path, manifest_bytes: bytes, job: Job) -> dict[str, Any]:
    """The first line: the bundle by its manifest's sha256 (which lists every file's sha256), the job's settings."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "bundle": str(bundle),
        "bundle_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        # through JSON, so tuples are the lists a resume reads back from the file
        "job": json.loads(json.dumps(job.to_header())),
    }


def _same_job(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """What differs between two headers' jobs, in words; None when a resume may continue (the bundle may have
    moved: its path is not compared, its content is)."""
    if a.get("bundle_sha256") != b.get("bundle_sha256"):
        return f"bundle {a.get('bundle')} (manifest sha256 {str(a.get('bundle_sha256'))[:12]}), not this one"
    ja, jb = a.get("job") or {}, b.get("job") or {}
    for key in sorted(ja.keys() | jb.keys()):
        if ja.get(key) != jb.get(key):
            return f"{key} {ja.get(key)!r}, not {jb.get(key)!r}"
    return None


@dataclass
class Journal:
    """An open batch output, locked for this process; append records with :meth:`append`."""

    path: Path
    fd: int
    header: dict[str, Any]
    done: dict[str, bool] = field(default_factory=dict)  # id -> ok, by the last record of each id
    torn: int = 0  # torn last lines cut off on opening (0 or 1)
    created: bool = False  # this open wrote the header: the file holds nothing of an earlier run

    @classmethod
    def open(cls, path: Path, header: dict[str, Any]) -> Journal:
        """Open ``path`` for ``header``'s job: create it with the header, or read back the records of an earlier
        run of the same job. Another job's file, a file that is no batch output, or one another batch is writing
        is refused in one line before any work."""
        path = Path(path)
        if path.is_dir():
            raise OutputError(f"--out {path} is a folder; give a .jsonl file")
        for folder in path.parents:
            if folder.exists():
                if not folder.is_dir():
                    raise OutputError(f"cannot write {path}: {folder} is a file, not a folder")
                break
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OutputError(f"{path} is being written by another rsedge batch; wait for it to finish") from None
            raise
        journal = cls(path, fd, header)
        try:
            journal._read_back()
        except BaseException:
            journal.close()
            raise
        return journal

    def _read_back(self) -> None:
        with open(self.fd, "rb", closefd=False) as f:
            f.seek(0)
            data = f.read()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):  # a kill mid-write: the partial line's item is redone
            self.torn = 1
            os.ftruncate(self.fd, complete)
            data = data[:complete]
        lines = data.splitlines()
        if not lines:
            self._write_line(self.header)
            self.created = True
            return
        first = _parse(lines[0])
        if not isinstance(first, dict) or first.get("format") != FORMAT:
            raise OutputError(f"--out {self.path} exists and is not an rsedge batch output; choose another file")
        if first.get("format_version") != FORMAT_VERSION:
            raise OutputError(
                f"{self.path}: batch output format version {first.get('format_version')}, this rsedge writes "
                f"{FORMAT_VERSION}; choose another --out"
            )
        differs = _same_job(first, self.header)
        if differs is not None:
            raise OptionError(
                f"{self.path} holds another job's answers ({differs}); resume with the same bundle and options, "
                "or choose another --out"
            )
        for n, line in enumerate(lines[1:], 2):
            rec = _parse(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
                raise OutputError(f"{self.path}:{n}: not a batch record; the file was edited or damaged")
            self.done[rec["id"]] = bool(rec.get("ok"))

    def append(self, record: dict[str, Any]) -> None:
        """One record as one line, written whole before this returns."""
        self._write_line(record)
        self.done[record["id"]] = bool(record.get("ok"))

    def _write_line(self, obj: dict[str, Any]) -> None:
        data = memoryview((json.dumps(obj, ensure_ascii=False) + "\n").encode())
        try:
            while data:  # os.write may write less than asked (a signal, a full pipe); O_APPEND keeps it in order
                data = data[os.write(self.fd, data) :]
        except OSError as e:
            raise OutputError(f"cannot write {self.path}: {e.strerror or e}") from None

    def close(self) -> None:
        if self.fd >= 0:
            # a power cut after the run loses nothing it reported; a file system without fsync (some FUSE
            # mounts) raises, and the lines were written all the same
            with contextlib.suppress(OSError):
                os.fsync(self.fd)
            os.close(self.fd)  # closing drops the lock
            self.fd = -1


def _parse(line: bytes) -> Any:
    try:
        return json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
