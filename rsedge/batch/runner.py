"""The batch loop: open the output (resuming what it holds), send the remaining items to a pool, write each
record as it comes back, and count."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rsedge.batch.items import Item
from rsedge.batch.journal import Journal
from rsedge.errors import OptionError


class Pool(Protocol):
    """Where answers run (rsedge.batch.local.LocalPool, rsedge.batch.on_ray.RayPool): entered once, then
    ``answers`` yields one record per item, in any order."""

    def __enter__(self) -> Pool: ...
    def __exit__(self, *exc: object) -> None: ...
    def answers(self, items: Iterable[Item]) -> Iterator[dict[str, Any]]: ...


class RecordFiles(Protocol):
    """Files a record makes beside its line (rsedge.batch.scenes.GeoJsonWriter): ``check`` refuses, before any
    work, what the items to answer would overwrite; calling it writes a record's files and returns the record as
    the output holds it."""

    def check(self, items: Iterable[Item]) -> None: ...
    def __call__(self, record: dict[str, Any]) -> dict[str, Any]: ...


@dataclass
class Summary:
    items: int  # in the archive
    skipped: int  # already in the output from an earlier run
    answered: int  # answered by this run
    errors: int  # of those, error records
    torn: int  # a torn last line found and redone
    left_out: int  # files the task could not use alone (half pairs' partners excepted)
    seconds: float  # this run, pool start-up included
    first_seconds: float | None  # until the first record came back (model loading, process start)

    @property
    def items_per_s(self) -> float:
        return self.answered / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_items_per_s(self) -> float | None:
        """Throughput once the first record is back, i.e. without start-up; None with fewer than two items."""
        if self.first_seconds is None or self.answered < 2 or self.seconds <= self.first_seconds:
            return None
        return (self.answered - 1) / (self.seconds - self.first_seconds)

    def line(self) -> str:
        parts = [f"{self.items} items: {self.answered} answered ({self.errors} errors)"]
        if self.skipped:
            parts.append(f"{self.skipped} already in the output")
        if self.torn:
            parts.append("1 torn line redone")
        if self.left_out:
            parts.append(f"{self.left_out} files left out (not in a pair)")
        rate = f"{self.seconds:.1f} s, {self.items_per_s:.2f} items/s"
        if self.steady_items_per_s is not None:
            rate += f" ({self.steady_items_per_s:.2f} after start-up)"
        return "; ".join(parts) + "; " + rate

    def to_json(self) -> dict[str, Any]:
        return {
            **self.__dict__,
            "items_per_s": round(self.items_per_s, 3),
            "steady_items_per_s": None if self.steady_items_per_s is None else round(self.steady_items_per_s, 3),
        }


def run_batch(
    out: Path,
    header: dict[str, Any],
    items: list[Item],
    pool: Pool,
    left_out: int = 0,
    retry_errors: bool = False,
    progress: bool = False,
    files: RecordFiles | None = None,
) -> Summary:
    """Answer every item ``out`` does not hold yet (with ``retry_errors``, also those it holds as errors: the new
    record supersedes the old), appending one line per item. The pool is started only when there is work.
    ``files`` writes each record's own files (a scene's GeoJSON) before its line: a line is never there without
    them."""
    journal = Journal.open(out, header)  # a wrong --out is refused before any worker starts
    summary = Summary(len(items), 0, 0, 0, journal.torn, left_out, 0.0, None)
    try:
        todo = [it for it in items if it.id not in journal.done or (retry_errors and not journal.done[it.id])]
        summary.skipped = len(items) - len(todo)
        if not todo:
            return summary
        if files is not None:
            files.check(todo)
        t0 = time.perf_counter()
        with _progress_bar(progress, len(todo)) as advance, pool:
            for record in pool.answers(todo):
                journal.append(record if files is None else files(record))
                summary.answered += 1
                summary.errors += not record.get("ok")
                if summary.first_seconds is None:
                    summary.first_seconds = time.perf_counter() - t0
                advance()
        summary.seconds = time.perf_counter() - t0
        return summary
    except BaseException:
        if journal.created and not summary.answered:  # failed before any answer: leave no header-only file
            journal.path.unlink(missing_ok=True)
        raise
    finally:
        journal.close()


@contextmanager
def _progress_bar(show: bool, total: int) -> Iterator[Callable[[], None]]:
    """A rich progress bar on stderr; yields the function to call once per item (a no-op when not ``show``)."""
    if not show:
        yield lambda: None
        return
    try:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
    except ImportError:
        raise OptionError("rsedge batch's progress bar needs rich: pip install 'rsedge[batch]'") from None
    cols = (TextColumn("batch"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*cols, console=Console(stderr=True)) as bar:
        task = bar.add_task("batch", total=total)
        yield lambda: bar.advance(task)
