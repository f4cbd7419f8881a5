"""One registry type for methods, datasets and backbones.

Entries are registered with metadata; ``get`` ends unknown names with a "did you mean" hint. Methods are registered
lazily as ``"module:Class"`` strings so that ``cilbench --help`` does not import torch.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

from cilbench.errors import CilbenchError

T = TypeVar("T")


class DuplicateName(ValueError):
    """A name that is already registered (a plugin may never replace a built-in entry)."""

    def __init__(self, kind: str, name: str):
        super().__init__(f"duplicate {kind} name {name!r}")
        self.name = name


@dataclass
class Entry(Generic[T]):
    name: str
    target: T | str  # the object, or "module:attr" to import on first use
    metadata: dict[str, Any] = field(default_factory=dict)

    def load(self) -> T:
        if isinstance(self.target, str):
            module, _, attr = self.target.partition(":")
            self.target = getattr(importlib.import_module(module), attr)
        return self.target  # type: ignore[return-value]


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, target: T | str | None = None, **metadata: Any) -> Callable[[T], T] | T:
        """``registry.register("x", obj, **meta)`` or as a decorator ``@registry.register("x", **meta)``."""

        def add(obj: T | str) -> Any:
            if name in self._entries and self._entries[name].target is not obj:
                existing = self._entries[name]
                # a lazy entry being filled by its own module's decorator is not a duplicate; any other module
                # (a plugin using a built-in's name) is refused, never silently put in its place
                if not (isinstance(existing.target, str) and not isinstance(obj, str)
                        and _same_module(existing.target, obj)):
                    raise DuplicateName(self.kind, name)
                existing.metadata = {**existing.metadata, **metadata}
                existing.target = obj
                return obj
            self._entries[name] = Entry(name, obj, dict(metadata))
            return obj

        if target is None:
            return add
        return add(target)

    def remove(self, name: str) -> None:
        """Forget ``name`` (user catalog entries that were removed or changed, a plugin that failed to import)."""
        self._entries.pop(name, None)

    def entry(self, name: str) -> Entry[T]:
        if name not in self._entries:
            close = difflib.get_close_matches(name, self.names(), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(self.names())}"
            raise CilbenchError(f"unknown {self.kind} {name!r}{hint}")
        return self._entries[name]

    def get(self, name: str) -> T:
        return self.entry(name).load()

    def metadata(self, name: str) -> dict[str, Any]:
        return self.entry(name).metadata

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _same_module(target: str, obj: Any) -> bool:
    """Whether ``obj`` comes from the module (or a module inside the package) named by lazy ``target``."""
    wanted = target.partition(":")[0]
    module = getattr(obj, "__module__", None) or ""
    return module == wanted or module.startswith(wanted + ".")
