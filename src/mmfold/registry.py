"""Name-keyed registries: a model kind is added with a decorator, never an if/elif ladder."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from mmfold.errors import UserError

F = TypeVar("F", bound=Callable[..., Any])


class Registry:
    """A mapping from names to callables, filled by ``@registry.register("name")``."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator adding ``fn`` under ``name``; duplicate names are a bug, so they raise."""

        def deco(fn: F) -> F:
            if name in self._items:
                raise KeyError(f"{self.what} '{name}' registered twice")
            self._items[name] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable[..., Any]:
        """The callable for ``name``, or a clear error listing what exists."""
        if name not in self._items:
            raise UserError(f"unknown {self.what} '{name}'; registered: {sorted(self._items)}")
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
