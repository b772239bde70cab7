"""Old public names kept for one release, each use warning (pure, no imports).

A module lists its old names in a table and sets
``__getattr__ = deprecated_names(__name__, {...})``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["deprecated_names"]


def deprecated_names(module: str, table: Mapping[str, tuple[str, object]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving ``table`` (old name -> (new name, value))
    with a :class:`DeprecationWarning` on each use."""

    def __getattr__(name: str) -> Any:
        entry = table.get(name)
        if entry is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        new_name, value = entry
        warnings.warn(
            f"{module}.{name} is deprecated; use {new_name}", DeprecationWarning, stacklevel=2
        )
        return value

    return __getattr__
