"""The service's Prometheus metrics, in a registry of its own (one per app, so tests can build several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from rsedge.serve.workers import WorkerPool

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class ServeMetrics:
    def __init__(self, pool: WorkerPool) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("rsedge_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.answers = Counter("rsedge_answers", "answers by what stopped them", ["stopped_by"], registry=r)
        self.rejected = Counter("rsedge_rejected", "requests refused before running", ["reason"], registry=r)
        queue = Gauge("rsedge_queue_depth", "requests waiting for a worker", registry=r)
        queue.set_function(lambda: pool.waiting)
        running = Gauge("rsedge_requests_running", "requests a worker is running", registry=r)
        running.set_function(lambda: pool.running)
        self.latency = Histogram(
            "rsedge_request_seconds",
            "arrival to answer, queue included",
            ["model", "task", "expert"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "rsedge_queue_wait_seconds", "time waiting for a worker", buckets=LATENCY_BUCKETS, registry=r
        )
        self.tokens = Counter("rsedge_generated_tokens", "tokens generated", ["model", "task", "expert"], registry=r)
        self.tokens_per_s = Histogram(
            "rsedge_decode_tokens_per_second",
            "decode speed of each request",
            ["model", "task", "expert"],
            buckets=RATE_BUCKETS,
            registry=r,
        )
        self.tiles = Counter(
            "rsedge_scene_tiles",
            "tiles of GeoTIFF scenes: answered (one generate call each) or nodata (not run)",
            ["model", "task", "status"],
            registry=r,
        )
        self.resident = Gauge(
            "rsedge_resident_bytes", "resident memory added when a model part loaded", ["model", "part"], registry=r
        )
