"""A bounded queue in front of a fixed pool of worker threads.

At most ``workers`` requests run and ``queue_size`` wait; one more is refused at once (the caller answers 429
with the wait this pool expects), so a burst never grows memory without bound. A request whose client left or
whose deadline passed while it waited is dropped before it runs; one already running is stopped through its
cancel event, which Pipeline.generate checks between decode steps.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the queue is full; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Dropped(Exception):
    """A queued request was cancelled (client gone, deadline passed) before a worker took it."""


class WorkerPool:
    def __init__(self, workers: int, queue_size: int) -> None:
        self.workers, self.queue_size = workers, queue_size
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rsedge-worker")
        self._lock = threading.Lock()
        self._admitted = 0  # running + waiting
        self._running = 0
        self._service_s = 1.0  # moving average of one request's run time, for Retry-After
        self._closed = False

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return self._admitted - self._running

    def admit(self) -> None:
        """Take a place (running or waiting) for a request before its body is read, or raise QueueFull: a
        burst of large requests then costs no memory beyond the places there are."""
        with self._lock:
            if self._closed or self._admitted >= self.workers + self.queue_size:
                raise QueueFull(self.retry_after())
            self._admitted += 1

    def release(self) -> None:
        """Give back an admitted place whose request will not run (it was refused, or its client left)."""
        with self._lock:
            self._admitted -= 1

    def submit(self, fn: Callable[[], T], cancel: threading.Event, deadline: float) -> Future[T]:
        """Run ``fn`` on an admitted place (released when it ends). ``deadline`` is a time.monotonic() instant.
        Raises QueueFull, its place still taken, if the pool is shutting down."""
        try:
            return self._executor.submit(self._run, fn, cancel, deadline)
        except RuntimeError:  # shut down since the request was admitted
            raise QueueFull(self.retry_after()) from None

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the queue ahead drained at the pool's recent pace."""
        ahead = self._admitted - self.workers + 1
        return max(1, min(60, math.ceil(max(ahead, 1) * self._service_s / self.workers)))

    def _run(self, fn: Callable[[], T], cancel: threading.Event, deadline: float) -> T:
        with self._lock:
            self._running += 1
        t0 = time.monotonic()
        try:
            if cancel.is_set() or t0 > deadline:
                raise Dropped("cancelled while queued")
            return fn()
        finally:
            took = time.monotonic() - t0
            with self._lock:
                self._running -= 1
                self._admitted -= 1
                if took > 0.001:
                    self._service_s = 0.8 * self._service_s + 0.2 * took

    def shutdown(self) -> None:
        """Refuse new requests and wait for every accepted one to finish."""
        with self._lock:
            self._closed = True
        self._executor.shutdown(wait=True)
