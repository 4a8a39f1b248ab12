"""Answers on this machine: a pool of processes, each loading its own Pipeline once.

Processes rather than threads: a Pipeline is thread-safe, but its Python side (tokenizing, sampling, the per-token
loop) holds the GIL, and an onnxruntime session's threads scale sub-linearly on a small decoder; several
processes with a few threads each keep every core busy. Processes are spawned, not forked, so none inherits a
half-initialised onnxruntime thread pool.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rsedge.batch.answer import Job, PipelineSpec, answer_item
from rsedge.batch.items import Item
from rsedge.errors import OptionError, RsedgeError

# Threads per worker when the pool is sized for the machine: a 0.5B decoder step gains little past ~4 threads,
# so more processes of 4 use a big CPU better than one of many.
THREADS_PER_WORKER = 4
# Headroom over a worker's graph and array bytes for onnxruntime's arena and the KV cache.
MEMORY_OVERHEAD = 1.3


@dataclass(frozen=True)
class PoolPlan:
    workers: int
    threads: int
    why: str


def usable_cpus() -> int:
    """CPUs this process may run on (a container's or taskset's limit, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def available_memory() -> int | None:
    """Bytes the kernel says new processes can use without swapping (MemAvailable); None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def worker_bytes(manifest: dict[str, Any], expert: int) -> int:
    """Bundle bytes one worker loads for ``expert``: every file but the other experts' own decoder files."""
    experts = manifest["graphs"]["decoder"]["experts"]
    others = {Path(v["file"]).stem for k, v in experts.items() if int(k) != expert}
    return sum(
        int(meta["bytes"]) for rel, meta in manifest["files"].items() if Path(rel).name.split(".")[0] not in others
    )


def plan_pool(workers: int | None, threads: int | None, cpus: int, per_worker: int, memory: int | None) -> PoolPlan:
    """Workers and threads each: as asked, else ``cpus / THREADS_PER_WORKER`` workers, no more than memory holds."""
    if workers is not None and workers < 1:
        raise OptionError(f"--workers must be at least 1, got {workers}")
    if threads is not None and threads < 1:
        raise OptionError(f"--threads must be at least 1, got {threads}")
    if workers is None:
        workers = max(1, cpus // (threads or THREADS_PER_WORKER))
        why = f"{cpus} CPUs"
        if memory is not None and per_worker > 0:
            fit = max(1, int(memory // (per_worker * MEMORY_OVERHEAD)))
            if fit < workers:
                workers, why = fit, f"{memory / 2**30:.1f} GiB available, ~{per_worker / 2**30:.2f} GiB a worker"
    else:
        why = "--workers"
    return PoolPlan(workers, threads or max(1, cpus // workers), why)


# -- the worker side ------------------------------------------------------------------------------------------

_spec: PipelineSpec | None = None
_job: Job | None = None
_pipe = None


def _init_worker(spec: PipelineSpec, job: Job) -> None:
    global _spec, _job
    _spec, _job = spec, job
    threading.Thread(target=_exit_with_driver, args=(os.getppid(),), daemon=True).start()


def _exit_with_driver(driver: int) -> None:
    """End this worker once the driver is gone: a driver killed outright (SIGKILL, the OOM killer) cannot shut its
    pool down, and its workers would otherwise wait on their queue for ever, each holding a loaded model."""
    while os.getppid() == driver:
        time.sleep(1.0)
    os._exit(1)


def _answer(item: Item) -> dict[str, Any]:
    global _pipe
    if _pipe is None:  # loaded on the first item, not in the initializer, so a load error reaches the driver
        _pipe = _spec.load()
    return answer_item(_pipe, item, _job)


# -- the driver side ------------------------------------------------------------------------------------------


class LocalPool:
    """``with LocalPool(spec, job, plan) as pool: for record in pool.answers(items): ...``; the plan's threads
    replace the spec's."""

    def __init__(self, spec: PipelineSpec, job: Job, plan: PoolPlan, log: Callable[[str], None] | None = None) -> None:
        self.spec, self.job, self.plan, self.log = dataclasses.replace(spec, threads=plan.threads), job, plan, log
        self.workers = plan.workers
        self._executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> LocalPool:
        if self.log is not None:
            self.log(f"{self.plan.workers} workers x {self.plan.threads} threads ({self.plan.why})")
        self._executor = ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self.spec, self.job),
        )
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._executor is not None
        self._executor.shutdown(wait=True, cancel_futures=True)

    def answers(self, items: Iterable[Item]) -> Iterator[dict[str, Any]]:
        """Records in the order they finish; at most two items per worker are queued, so an archive of a million
        files costs no more memory than one of ten."""
        assert self._executor is not None
        todo = iter(items)
        pending: set[Future] = set()
        window = 2 * self.workers
        while True:
            while len(pending) < window and (item := next(todo, None)) is not None:
                pending.add(self._executor.submit(_answer, item))
            if not pending:
                return
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                yield _result(fut)


def _result(fut: Future) -> dict[str, Any]:
    try:
        return fut.result()
    except BrokenProcessPool:
        raise RsedgeError(
            "a batch worker process died (killed, or out of memory: try fewer --workers); every answer so far is "
            "in the output, run the same command again to resume"
        ) from None
    except RsedgeError:
        raise  # a worker could not load the bundle: the same one-line error as rsedge run's
    except Exception as e:
        raise RsedgeError(f"a batch worker failed to start: {type(e).__name__}: {e}") from None
