"""Typed name -> factory registries (in the spirit of timm's ``create_model`` / ``list_models``).

Entries register with a decorator (``@METHODS.register("name")``) in the package's own modules, or come from
other installed packages through an entry point group (``metagate.methods``, ``metagate.benchmarks``): an entry
point ``name = package.module:Class`` is loaded the first time a name is looked up that is not registered, or
the names are listed. Loading imports the module (whose decorator may register the class itself); a class that
is not registered by then is registered under the entry point's name.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised for a name that is not registered; the message lists the valid choices."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0])


class PluginError(ValueError):
    """An installed plugin (an entry point) that cannot be loaded; the message names it and what to do."""


def plugin_entry_points(group: str) -> list[importlib.metadata.EntryPoint]:
    """The installed entry points of ``group`` (on the current ``sys.path``), first of each name."""
    seen: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=group):
        seen.setdefault(ep.name, ep)
    return list(seen.values())


class Registry(Generic[T]):
    """A named collection of entries (classes or builders), filled by a decorator and by the entry points of
    ``group`` (other packages' plugins)."""

    def __init__(self, kind: str, group: str | None = None) -> None:
        self.kind = kind
        self.group = group
        self._entries: dict[str, T] = {}
        self._loaded: set[str] = set()  # entry point names already loaded

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def load_plugins(self) -> None:
        """Load the entry points of :attr:`group` not loaded yet (a name already registered is not replaced)."""
        if self.group is None:
            return
        for ep in plugin_entry_points(self.group):
            if ep.name in self._loaded or ep.name in self._entries:
                continue
            self._loaded.add(ep.name)
            try:
                entry = ep.load()
            except Exception as e:  # noqa: BLE001 - whatever a plugin raises, say which one and go on
                raise PluginError(
                    f"the {self.kind} plugin {ep.name!r} ({ep.value}, entry point group {self.group}) cannot be loaded: "
                    f"{type(e).__name__}: {e}; fix or uninstall the package that provides it"
                ) from e
            if ep.name not in self._entries and entry not in self._entries.values():
                self._entries[ep.name] = entry

    def get(self, name: str) -> T:
        if name not in self._entries:
            self.load_plugins()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self, pattern: str = "*") -> list[str]:
        self.load_plugins()
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        if name not in self._entries:
            self.load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
