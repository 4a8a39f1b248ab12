"""The bundles a service answers with, by name, and what each one's loaded parts cost in resident memory."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from rsedge.errors import OptionError
from rsedge.runtime.pipeline import Pipeline


class UnknownModel(OptionError):
    """A request names a model the service did not load (HTTP 404)."""


def rss_bytes() -> int | None:
    """This process's resident set size now; None where /proc is missing (the figure is then not reported)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class ServedModel:
    name: str
    path: Path
    pipe: Pipeline
    # Resident-memory growth when each part was created: "vision" and "expert<i>". Experts load on a request's
    # first use of them, so a service asked only for [VG] never holds the [SEG] expert.
    resident: dict[str, int | None] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def ensure_vision(self) -> None:
        self._measured("vision", self.pipe.vision)

    def ensure_expert(self, expert: int) -> None:
        self._measured(f"expert{expert}", lambda: self.pipe.decoder(expert))

    def _measured(self, part: str, create) -> None:
        if part in self.resident:
            return
        with self._lock:  # one part loads at a time, so its growth is not mixed with another's
            if part in self.resident:
                return
            before = rss_bytes()
            create()
            after = rss_bytes()
            self.resident[part] = None if before is None or after is None else max(after - before, 0)

    def expert_for(self, prompt: str) -> int:
        return self.pipe.choose_expert(prompt)


class ModelSet:
    """Loaded models by name (a bundle's folder name); the first is the default for requests that name none."""

    def __init__(self, models: list[ServedModel]) -> None:
        if not models:
            raise OptionError("give at least one bundle to serve")
        self.by_name: dict[str, ServedModel] = {}
        for m in models:
            if m.name in self.by_name:
                raise OptionError(f"two bundles are named {m.name!r}; serve them from folders with different names")
            self.by_name[m.name] = m
        self.default = models[0]

    @classmethod
    def load(cls, paths: list[Path], **load_options) -> ModelSet:
        names = [Path(p).resolve().name for p in paths]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:  # before minutes of loading, not after
            raise OptionError(f"two bundles are named {twice[0]!r}; serve them from folders with different names")
        served = []
        for path in paths:
            before = rss_bytes()
            pipe = Pipeline.load(path, **load_options)
            after = rss_bytes()
            model = ServedModel(Path(path).resolve().name, Path(path), pipe)
            model.resident["bundle"] = None if before is None or after is None else max(after - before, 0)
            model.ensure_vision()  # every request needs it: load it now, not inside the first request
            served.append(model)
        return cls(served)

    def get(self, name: str | None) -> ServedModel:
        if name is None or name == "":
            return self.default
        model = self.by_name.get(name)
        if model is None:
            raise UnknownModel(f"unknown model {name!r}; this service has: {', '.join(self.by_name)}")
        return model
