"""One lookup for every name → entry registry (datasets, strategies, distillers, arrival processes, presets, studies).

timm's ``get_act_layer(name)`` pattern: a registry is a plain dict, and a name that is not in it gets one
``ValueError`` that says what kind of thing was asked for and lists the known names, so a typo in a config field
or a flag is answered the same way everywhere.
"""
from __future__ import annotations

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
