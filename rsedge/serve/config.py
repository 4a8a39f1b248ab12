"""What a running service is allowed to do: its address, key, queue, deadline and input limits."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from rsedge.errors import OptionError
from rsedge.runtime.images import MAX_PIXELS

MAX_BODY_BYTES = 32 * 1024 * 1024  # two 10 MB photos as base64 data URIs, with room to spare


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    allow_no_key: bool = False  # serve a non-loopback address without a key (a closed network, a proxy in front)
    image_root: Path | None = None  # server-side image paths are read only under this folder; None: refused
    workers: int = 1  # threads running requests at once, sharing each model's Pipeline
    queue_size: int = 16  # requests waiting beyond the running ones; more get 429 with Retry-After
    deadline_s: float = 300.0  # from arrival to the last token; past it a request is cancelled (504)
    max_body_bytes: int = MAX_BODY_BYTES
    max_pixels: int = MAX_PIXELS
    max_new_tokens: int = 1024  # a client may ask for fewer, never more

    def __post_init__(self) -> None:
        for name in ("workers", "max_body_bytes", "max_pixels", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise OptionError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.queue_size < 0:
            raise OptionError(f"queue-size must be at least 0, got {self.queue_size}")
        if not self.deadline_s > 0:
            raise OptionError(f"deadline must be positive, got {self.deadline_s}")
        if self.api_key is not None and not self.api_key.strip():
            raise OptionError("the API key is empty")

    def check_bind(self) -> None:
        """Refuse to listen beyond this machine without a key, unless told the network is closed."""
        if self.api_key is None and not self.allow_no_key and not is_loopback(self.host):
            raise OptionError(
                f"--host {self.host} is reachable from other machines and no --api-key-file was given; "
                "give a key, or pass --allow-no-key if the network in front is closed"
            )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False


def read_api_key(path: Path) -> str:
    """The key is the file's first line; a file not found or empty is an error, never a key-less service."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise OptionError(f"{path}: API key file not found") from None
    key = lines[0].strip() if lines else ""
    if not key:
        raise OptionError(f"{path}: the API key file is empty")
    return key
