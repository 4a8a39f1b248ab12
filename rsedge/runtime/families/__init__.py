"""The model families the runtime knows, keyed by a bundle manifest's ``architecture``.

A family is one module with one :class:`~rsedge.runtime.families.base.Family` subclass, registered with
``@register("name", ...)``. The built-in ones are listed in ``BUILTIN``; a package outside rsedge adds its own
through the ``rsedge.families`` entry-point group (``name = "module:Class"``), so adding an architecture touches
no other family's module. A bundle of an architecture nobody registered is refused with one line.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from rsedge.errors import BundleError
from rsedge.runtime.families.base import Family

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from rsedge.runtime.bundle import Bundle

BUILTIN = (
    "rsedge.runtime.families.llava_onevision",
    "rsedge.runtime.families.vila",
    "rsedge.runtime.families.qwen2_5_vl",
)
ENTRY_POINT_GROUP = "rsedge.families"
_FAMILIES: dict[str, type[Family]] = {}
_loaded = False


def register(*architectures: str) -> Callable[[type[Family]], type[Family]]:
    """Class decorator: the family runs bundles whose manifest ``architecture`` is one of ``architectures``."""

    def add(cls: type[Family]) -> type[Family]:
        for name in architectures:
            if name in _FAMILIES and _FAMILIES[name] is not cls:
                raise ValueError(f"architecture {name!r} is registered twice ({_FAMILIES[name].__name__})")
            _FAMILIES[name] = cls
        cls.architectures = tuple(architectures)
        return cls

    return add


def _load() -> None:
    global _loaded
    if _loaded:
        return
    for module in BUILTIN:
        importlib.import_module(module)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        cls = ep.load()
        if ep.name not in _FAMILIES:
            register(ep.name)(cls)
    _loaded = True


def known() -> list[str]:
    """Registered architectures, built-in ones first in the order they were added (then plug-ins)."""
    _load()
    return list(_FAMILIES)


def family_class(architecture: str) -> type[Family]:
    _load()
    cls = _FAMILIES.get(architecture)
    if cls is None:
        raise BundleError(
            f"this rsedge cannot run architecture {architecture!r}; it runs: {', '.join(known())} "
            "(a newer rsedge, or the plug-in package for that family, may)"
        )
    return cls


def family_for(bundle: Bundle, tokenizer: Tokenizer) -> Family:
    """The family object that runs ``bundle``'s requests."""
    arch = bundle.manifest.get("architecture")
    if not isinstance(arch, str):
        raise BundleError(f"{bundle.root}/manifest.json: manifest field architecture must be a string")
    return family_class(arch)(bundle, tokenizer)
