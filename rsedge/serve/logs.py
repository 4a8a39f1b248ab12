"""JSON log lines, one object a line, each request's carrying its id (also sent back as X-Request-Id)."""

from __future__ import annotations

import json
import logging
import sys
import time

LOGGER = "rsedge.serve"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(level: int = logging.INFO) -> logging.Logger:
    """The service's logger writing JSON to stderr (uvicorn's own loggers too, so nothing else is plain text)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in (LOGGER, "uvicorn", "uvicorn.error"):
        log = logging.getLogger(name)
        log.handlers = [handler]
        log.setLevel(level)
        log.propagate = False
    return logging.getLogger(LOGGER)


def log(level: int, msg: str, exc_info: bool = False, **fields) -> None:
    logging.getLogger(LOGGER).log(level, msg, exc_info=exc_info, extra={"fields": fields})
