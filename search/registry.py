"""Named choices a user picks by flag and a contributor extends: one small registry type for all.

Criteria, methods, samplers, export picks and dtypes are each a `Registry`: the CLI's choices and
help text are read from it, and an unknown name is one error line listing the known ones. Adding
a choice is a function (or value) plus one `register` line beside it; no dispatch chain to edit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from search.errors import SearchError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    value: T
    help: str


class Registry(Generic[T]):
    def __init__(self, what: str) -> None:
        self.what = what  # how an error names a choice: "criterion", "method", ...
        self._entries: dict[str, Entry[T]] = {}

    def add(self, name: str, value: T, help: str) -> T:
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self._entries[name] = Entry(name, value, help)
        return value

    def register(self, name: str, help: str) -> Callable[[T], T]:
        """Decorator form of `add`, for a function that is the choice."""
        return lambda value: self.add(name, value, help)

    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            raise SearchError(f"unknown {self.what} {name!r} (one of: {', '.join(self.names)})")
        return self._entries[name].value

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def describe(self) -> str:
        """`name: help; name: help`, for a flag's help text."""
        return "; ".join(f"{e.name}: {e.help}" for e in self._entries.values())
