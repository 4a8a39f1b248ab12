"""The ASGI layer every request passes first: a request id, the API key, the body-size cap, and one JSON log
line per request. Plain ASGI rather than Starlette's BaseHTTPMiddleware, which would buffer streamed answers
and hide the client's disconnect from the handler."""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid

from rsedge.errors import RsedgeError
from rsedge.serve.config import ServeConfig
from rsedge.serve.logs import log
from rsedge.serve.metrics import ServeMetrics

OPEN_PATHS = frozenset({"/", "/health"})  # the console page holds no data; health is for probes


class BodyTooLarge(RsedgeError):
    """A request body over the service's --max-body-bytes (HTTP 413)."""


class Guard:
    def __init__(self, app, cfg: ServeConfig, metrics: ServeMetrics) -> None:
        self.app, self.cfg, self.metrics = app, cfg, metrics
        self._key = cfg.api_key.encode() if cfg.api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        rid = given if given and len(given) <= 64 and given.isprintable() else uuid.uuid4().hex[:16]
        state = scope.setdefault("state", {})
        state["request_id"], state["log"] = rid, {}
        t0, status = time.monotonic(), [0]

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        path = scope["path"]
        try:
            if self._key is not None and path not in OPEN_PATHS and not self._authorized(headers):
                await _refuse(
                    send_with_id,
                    401,
                    "missing or wrong API key (Authorization: Bearer KEY)",
                    [(b"www-authenticate", b"Bearer")],
                )
                return
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.cfg.max_body_bytes:
                await _refuse(send_with_id, 413, self._too_large())
                return
            await self.app(scope, self._counted(receive), send_with_id)
        finally:
            self.metrics.requests.labels(_endpoint(path), str(status[0] or 499)).inc()
            log(
                logging.INFO,
                "request",
                request_id=rid,
                method=scope["method"],
                path=path,
                status=status[0] or 499,
                ms=round((time.monotonic() - t0) * 1e3, 1),
                **state["log"],
            )

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._key)

    def _too_large(self) -> str:
        return f"request body is larger than this service's limit of {self.cfg.max_body_bytes} bytes"

    def _counted(self, receive):
        """receive() that refuses a body (chunked, or lying about its length) growing past the cap."""
        seen = [0]

        async def counted():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.cfg.max_body_bytes:
                    raise BodyTooLarge(self._too_large())
            return message

        return counted


def _endpoint(path: str) -> str:
    known = ("/v1/chat/completions", "/v1/rs/answer", "/v1/models", "/metrics", "/health")
    return path if path in known or path == "/" else "other"


async def _refuse(send, status: int, message: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "code": status}}).encode()
    await send(
        {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json"), *headers]}
    )
    await send({"type": "http.response.body", "body": body})
