"""Lazy package exports (PEP 562): a package names its public objects; each loads on first use.

Packages re-export their public API from submodules, but importing torch, scikit-learn or pandas up front
would make `pluribus --help` and every light import pay seconds. Each package lists ``name -> submodule``
once and installs ``lazy_getattr`` as its module ``__getattr__``; static type checkers see the real imports
under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports ``exports[name]`` (a submodule) on first access."""

    def __getattr__(name: str) -> Any:
        home = exports.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{home}"), name)
        setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
        return value

    return __getattr__
