"""Run a patch on a module as soon as it is imported (or now, if it already is).

The uvloop guard and the multiprocessing reducer must act on modules a program may import
before or after ``cosock.enable()``.  An import hook on ``sys.meta_path`` finds the real
spec with the other finders and wraps its loader, so the patch runs right after the
module's own code and before anyone can use it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader, then: Callable[[ModuleType], None]) -> None:
        self._inner = inner
        self._then = then

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        self._then(module)

    def __getattr__(self, name: str) -> Any:  # get_source, is_package, get_resource_reader...
        return getattr(self._inner, name)


class OnImport(importlib.abc.MetaPathFinder):
    """Calls ``patch(module)`` for the module ``name``: at :meth:`install` if it is
    imported already, else right after its import."""

    def __init__(self, name: str, patch: Callable[[ModuleType], None]) -> None:
        self._name = name
        self._patch = patch

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self._name:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader, self._patch)  # type: ignore[assignment]
                return spec
        return None

    def install(self) -> None:
        module = sys.modules.get(self._name)
        if module is not None:
            self._patch(module)
        elif self not in sys.meta_path:
            sys.meta_path.insert(0, self)

    def uninstall(self) -> None:
        """Stop waiting for the import (undoing the patch is the caller's)."""
        if self in sys.meta_path:
            sys.meta_path.remove(self)
