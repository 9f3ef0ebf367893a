"""Package namespaces that load on first use: a package lists its public names, and importing it imports none of
their modules, so the decomposition library does not pull in Lightning, pandas or Hydra through a package."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_exports(package: str, modules: Mapping[str, Sequence[str]]
                 ) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``__all__``, ``__getattr__`` and ``__dir__`` for ``package`` whose public names live in ``modules``
    (module -> names); a name's module is imported when the name is first read."""
    where = {name: module for module, names in modules.items() for name in names}
    namespace = sys.modules[package]

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name]), name)
        setattr(namespace, name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(namespace)) | set(where))

    return sorted(where), __getattr__, __dir__
