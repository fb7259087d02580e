"""Named things that plugins provide (methods, losses, callbacks, backends), with lookups whose
errors list what exists and suggest the closest name."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Entry:
    """One registered thing: its ``name``, the object, the plugin that registered it, and a
    one-line description for listings."""

    name: str
    obj: Any
    plugin: str
    description: str = ""


def suggestion(name: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Registry:
    """Name -> :class:`Entry` for one kind of thing; names are unique across plugins."""

    def __init__(self, kind: str, plural: str | None = None) -> None:
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self._entries: dict[str, Entry] = {}

    def add(self, entry: Entry) -> None:
        """Adds ``entry``; a name another plugin already registered raises ``ValueError``."""
        existing = self._entries.get(entry.name)
        if existing is not None:
            raise ValueError(f"{self.kind} {entry.name!r} from plugin {entry.plugin!r} clashes with the one "
                             f"registered by plugin {existing.plugin!r}; the first registration stays")
        self._entries[entry.name] = entry

    def remove_plugin(self, plugin: str) -> None:
        """Forgets everything ``plugin`` registered."""
        for name in [name for name, entry in self._entries.items() if entry.plugin == plugin]:
            del self._entries[name]

    def get(self, name: str, caller: str = "kdcore") -> Any:
        """The object registered as ``name``; an unknown name raises ``ValueError`` listing the
        names that exist."""
        if not isinstance(name, str):
            raise TypeError(f"{caller}: a {self.kind} name must be a string, got {type(name).__name__}")
        entry = self._entries.get(name)
        if entry is None:
            known = ", ".join(sorted(self._entries)) or "none"
            raise ValueError(f"{caller}: unknown {self.kind} {name!r}{suggestion(name, self._entries)}; "
                             f"registered {self.plural}: {known} (`kdcore plugins` lists what each plugin adds)")
        return entry.obj

    def entry(self, name: str) -> Entry:
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def by_plugin(self, plugin: str) -> list[str]:
        return sorted(name for name, entry in self._entries.items() if entry.plugin == plugin)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(sorted(self._entries.values(), key=lambda entry: entry.name))

    def __len__(self) -> int:
        return len(self._entries)
