"""``rsedge serve``: loaded bundles behind an HTTP API (OpenAI-compatible chat, structured RS answers, health,
models and Prometheus metrics), a bounded queue of worker threads sharing each :class:`Pipeline`, and the
operator's console page.

Needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client); the rest of rsedge never imports this package.
"""
