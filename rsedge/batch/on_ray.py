"""Answers on a Ray cluster: one actor per worker slot, each holding a loaded Pipeline; the driver (the machine
running ``rsedge batch``) hands out items and writes every record to its own output file.

Actors open the items' files and the bundle by the paths the driver gives, so every node must see them at the
same path (a shared mount, or the bundle copied to the same folder on each node). Ray is an optional extra, imported
here only.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from rsedge.batch.answer import Job, PipelineSpec, answer_item
from rsedge.batch.items import Item
from rsedge.batch.local import THREADS_PER_WORKER, PoolPlan, usable_cpus
from rsedge.errors import OptionError, RsedgeError


def import_ray():
    try:
        import ray
    except ImportError:
        raise OptionError("--ray needs Ray on this machine and every node: pip install 'rsedge[ray]'") from None
    return ray


class BatchActor:
    """A Ray actor's state: one Pipeline, loaded when the actor starts."""

    def __init__(self, spec: PipelineSpec, job: Job) -> None:
        self.pipe, self.job = spec.load(), job

    def answer(self, item: Item) -> dict[str, Any]:
        return answer_item(self.pipe, item, self.job)

    def where(self) -> str:
        return socket.gethostname()


def plan_actors(workers: int | None, threads: int | None, node_cpus: list[int]) -> PoolPlan:
    """Actors and threads each over the cluster's nodes: ``threads`` (default THREADS_PER_WORKER, at most a node's
    CPUs) per actor, as many actors as fit, or ``workers`` of them if the nodes can place that many."""
    if workers is not None and workers < 1:
        raise OptionError(f"--workers must be at least 1, got {workers}")
    biggest = max(node_cpus, default=0)
    if biggest < 1:
        raise OptionError("the Ray cluster has no node with a CPU to run an actor on")
    if threads is None:
        threads = min(THREADS_PER_WORKER, biggest) if workers is None else max(1, sum(node_cpus) // workers)
        threads = min(threads, biggest)
    elif threads < 1:
        raise OptionError(f"--threads must be at least 1, got {threads}")
    fit = sum(c // threads for c in node_cpus)
    if workers is None:
        if fit < 1:
            raise OptionError(f"no node of the Ray cluster has {threads} CPUs for an actor of --threads {threads}")
        return PoolPlan(fit, threads, f"{len(node_cpus)} Ray nodes, {sum(node_cpus)} CPUs")
    if fit < workers:  # Ray would leave the others pending for ever
        raise OptionError(
            f"the Ray cluster places {fit} actors of {threads} CPUs, not --workers {workers}; lower --workers or "
            "--threads, or add nodes"
        )
    return PoolPlan(workers, threads, "--workers")


class RayPool:
    """``with RayPool(spec, job, address, workers, threads) as pool: for record in pool.answers(items): ...``

    ``address``: "local" starts a private Ray instance on this machine for the run; "auto" joins the cluster this
    machine belongs to (``ray start``); anything else is a cluster address (``HOST:6379`` or ``ray://HOST:10001``).
    A Ray already initialised in this process (a test, a notebook) is used as it is.
    """

    def __init__(
        self,
        spec: PipelineSpec,
        job: Job,
        address: str,
        workers: int | None = None,
        threads: int | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.spec, self.job, self.address, self.log = spec, job, address, log
        self.asked = (workers, threads)
        self.plan: PoolPlan | None = None
        self._actors: list[Any] = []
        self._owns_ray = False

    def __enter__(self) -> RayPool:
        ray = import_ray()
        if not ray.is_initialized():
            if self.address == "local":
                ray.init(address="local", num_cpus=usable_cpus(), include_dashboard=False, logging_level="WARNING")
            else:
                _probe(self.address)
                try:
                    ray.init(address=self.address, logging_level="WARNING")
                except ConnectionError as e:
                    raise OptionError(f"--ray {self.address}: no Ray cluster there ({e})") from None
            self._owns_ray = True
        try:
            alive = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
            self.plan = plan_actors(*self.asked, [int(r.get("CPU", 0)) for r in alive])
            # Ray hides the GPUs from an actor that asked for none: a GPU device takes one GPU per actor
            gpus = 0 if self.spec.device == "cpu" else 1
            if gpus and self.plan.workers > sum(int(r.get("GPU", 0)) for r in alive):
                raise OptionError(
                    f"--device {self.spec.device} takes a GPU per Ray actor; the cluster has "
                    f"{sum(int(r.get('GPU', 0)) for r in alive)} for {self.plan.workers} actors: set --workers"
                )
            if self.log is not None:
                self.log(f"Ray: {self.plan.workers} actors x {self.plan.threads} threads ({self.plan.why})")
            spec = dataclasses.replace(self.spec, threads=self.plan.threads)
            actor = ray.remote(BatchActor).options(num_cpus=self.plan.threads, num_gpus=gpus)
            self._actors = [actor.remote(spec, self.job) for _ in range(self.plan.workers)]
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        ray = import_ray()
        for a in self._actors:
            ray.kill(a)
        self._actors = []
        if self._owns_ray:
            ray.shutdown()

    def answers(self, items: Iterable[Item]) -> Iterator[dict[str, Any]]:
        """Records in the order they finish, two items in flight per actor (one running, one queued behind it)."""
        ray = import_ray()
        todo = iter(items)
        load = dict.fromkeys(range(len(self._actors)), 0)
        pending: dict[Any, int] = {}  # object ref -> actor index
        while True:
            while min(load.values()) < 2 and (item := next(todo, None)) is not None:
                i = min(load, key=load.__getitem__)
                pending[self._actors[i].answer.remote(item)] = i
                load[i] += 1
            if not pending:
                return
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                load[pending.pop(ref)] -= 1
                yield _get(ray, ref)


def _probe(address: str, timeout: float = 5.0) -> None:
    """Refuse a HOST:PORT no cluster answers on in one line: ray.init retries such an address for minutes."""
    host, sep, port = address.rpartition(":")
    if address == "auto" or "://" in address or not sep or not port.isdigit():
        return  # auto is found by Ray itself; ray:// client addresses speak another protocol
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise OptionError(f"--ray {address}: no Ray cluster answers there ({e.strerror or e})") from None


def _get(ray: Any, ref: Any) -> dict[str, Any]:
    try:
        return ray.get(ref)
    except RsedgeError:
        raise  # an actor could not load the bundle (Ray re-raises it as its own type)
    except ray.exceptions.RayActorError as e:
        cause = getattr(e, "cause", None) or getattr(e, "error_msg", "") or e
        first = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(e).__name__
        raise RsedgeError(
            f"a Ray actor died ({first}); every answer so far is in the output, run the same command to resume"
        ) from None
    except ray.exceptions.RayError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise RsedgeError(f"Ray failed: {first}; run the same command to resume") from None
