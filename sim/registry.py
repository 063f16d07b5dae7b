"""One lookup for every name → entry registry (datasets, strategies, distillers, arrival processes, presets, studies).

timm's ``get_act_layer(name)`` pattern: a registry is a plain dict, and a name that is not in it gets one
``ValueError`` that says what kind of thing was asked for and lists the known names, so a typo in a config field
or a flag is answered the same way everywhere.
"""
from __future__ import annotations

import importlib
from typing import Mapping, TypeVar

T = TypeVar("T")


def lookup(registry: Mapping[str, T], name: str, what: str) -> T:
    """``registry[name]``, or ``ValueError("unknown <what> 'name'; known: a, b, …")``.

    Args:
        registry: name → entry.
        name: the name asked for.
        what: what an entry is, in words ("merge strategy", "dataset", …), for the message.
    """
    try:
        return registry[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(registry)}") from None


def check_names(registry: Mapping[str, object], names, what: str, field: str | None = None) -> None:
    """Raise one ``ValueError`` naming the first of ``names`` that is not in ``registry`` (and ``field`` if given)."""
    for name in names:
        if name not in registry:
            where = f"{field}: " if field else ""
            raise ValueError(f"{where}unknown {what} {name!r}; known: {', '.join(registry)}")


def resolve(path: str):
    """``"package.module:attr"`` → that object, importing the module on first use."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def lazy_exports(package: str, exports: Mapping[str, str]):
    """A module ``__getattr__`` (PEP 562) for ``package``: ``exports`` maps a public name to ``"module:attr"``.

    Registries and configs must be readable without torch (institution actors and config validation never import
    it), so a package whose entries need torch exports them through this: ``from sim.merge import merge`` imports
    ``sim.merge.api`` at that moment, while ``import sim.merge.specs`` stays light.
    """
    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = resolve(exports[name])
        setattr(importlib.import_module(package), name, value)   # later lookups skip this hook
        return value

    return __getattr__


class LazyRegistry(Mapping[str, T]):
    """A registry whose names are known without importing anything and whose entries (``"module:attr"`` paths)
    are imported on first lookup — for registries a config validates against (see ``lazy_exports``)."""

    def __init__(self, paths: Mapping[str, str]) -> None:
        self._paths = dict(paths)

    def __getitem__(self, name: str) -> T:
        return resolve(self._paths[name])

    def __iter__(self):
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)
