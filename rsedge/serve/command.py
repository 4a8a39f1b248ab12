"""The body of ``rsedge serve``: load the bundles, check the address and key, run uvicorn until SIGTERM.

uvicorn's graceful shutdown stops accepting connections and lets every accepted request finish (streams
included); the app's lifespan then waits for the worker threads.
"""

from __future__ import annotations

from pathlib import Path

from rsedge.errors import OptionError
from rsedge.runtime.images import pixel_limit
from rsedge.serve.config import ServeConfig


def serve(
    bundles: list[Path],
    cfg: ServeConfig,
    device: str,
    threads: int | None,
    verify: str,
    trust: list[Path],
    warmup: bool = False,
) -> None:
    try:
        import uvicorn

        from rsedge.serve.app import create_app
    except ImportError as e:
        raise OptionError(
            f"rsedge serve needs the serve extra: pip install 'rsedge[serve]' ({e.name} is missing)"
        ) from None
    from rsedge.serve import logs
    from rsedge.serve.models import ModelSet

    cfg.check_bind()  # before minutes of loading, not after
    logger = logs.setup()
    with pixel_limit(cfg.max_pixels):  # the service's cap replaces rsedge's default for its image reader
        models = ModelSet.load(
            bundles, device=device, threads=threads, verify=verify, trust=trust or None, warmup=warmup
        )
        for m in models.by_name.values():
            logger.info("loaded", extra={"fields": {"model": m.name, "path": str(m.path), "resident": m.resident}})
        app = create_app(models, cfg)
        config = uvicorn.Config(
            app, host=cfg.host, port=cfg.port, log_config=None, access_log=False, timeout_graceful_shutdown=None
        )
        uvicorn.Server(config).run()
