"""Name → object registries, in the manner of ``torchvision.models.list_models``/``get_model``."""

from __future__ import annotations

import difflib
import fnmatch
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, Iterable, Iterator, TypeVar

from runner.errors import DuplicateNameError, PluginError, RunnerError, UnknownNameError, one_line

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered name and where it came from."""

    name: str
    obj: T
    plugin: str
    distribution: str | None = None
    version: str | None = None
    builtin: bool = False

    @property
    def is_family(self) -> bool:
        """A name ending in ``*`` stands for a family, e.g. ``hub:*`` for every torch.hub model."""
        return self.name.endswith("*")

    def label(self, name: str | None = None) -> str:
        """The name as messages give it: ``Normalize``, or ``acme:GaussianNoise from plugin 'acme'``."""
        return (name or self.name) if self.builtin else f"{name or self.name} from plugin {self.plugin!r}"

    def blamed(self, key: str, name: str | None = None) -> Any:
        """A context running this entry's code for spec key ``key`` (see :func:`blamed`); ``name``: a family's member."""
        return blamed(f"{key} ({self.label(name)})")


@contextmanager
def blamed(where: str) -> Iterator[None]:
    """Run plugin code; an exception it raises names ``where`` (the spec key, the name and the plugin).

    A :class:`RunnerError` is the plugin's own message to the user and passes through unchanged;
    anything else (a bug, or a check that raised ``ValueError``) becomes a :class:`PluginError`,
    e.g. ``transforms.train[2] (acme:GaussianNoise from plugin 'acme'): ZeroDivisionError: …``,
    chained to the original so ``--debug`` shows where it came from.
    """
    try:
        yield
    except RunnerError:
        raise
    except Exception as exc:
        raise PluginError(f"{where}: {one_line(exc)}") from exc


class Registry(Generic[T]):
    """Names of one kind (models, datasets, …) registered by plugins.

    Names are unique: registering one twice raises :class:`DuplicateNameError` naming both plugins,
    and the name is then refused on lookup until one of the plugins is blocked.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self._collisions: dict[str, list[Entry[T]]] = {}
        # names (or name prefixes) of plugins that are not loaded, with why: a lookup says so
        self._unavailable: dict[str, str] = {}
        self._unavailable_prefixes: dict[str, str] = {}

    def register(
        self,
        name: str,
        obj: T,
        *,
        plugin: str,
        distribution: str | None = None,
        version: str | None = None,
        builtin: bool = False,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} names must be non-empty strings, got {name!r}")
        entry = Entry(name, obj, plugin, distribution, version, builtin)
        if name in self._collisions:
            self._collisions[name].append(entry)
            raise DuplicateNameError(self._collision_message(name))
        if name in self._entries:
            self._collisions[name] = [self._entries.pop(name), entry]
            raise DuplicateNameError(self._collision_message(name))
        self._entries[name] = entry

    def mark_unavailable(self, name: str, why: str) -> None:
        """``name`` belongs to a plugin that is not loaded (blocked, disabled or broken); ``why`` says which."""
        self._unavailable.setdefault(name, why)

    def mark_unavailable_prefix(self, prefix: str, why: str) -> None:
        """Every name starting with ``prefix`` (``acme:``) belongs to a plugin that is not loaded."""
        self._unavailable_prefixes.setdefault(prefix, why)

    def unavailable_reason(self, name: str) -> str | None:
        """Why ``name`` cannot be used though a plugin would provide it, or None."""
        if name in self._unavailable:
            return self._unavailable[name]
        families = [n for n in self._unavailable if n.endswith("*") and name.startswith(n[:-1])]
        if families:
            return self._unavailable[max(families, key=len)]
        prefixes = [p for p in self._unavailable_prefixes if name.startswith(p)]
        return self._unavailable_prefixes[max(prefixes, key=len)] if prefixes else None

    def _collision_message(self, name: str) -> str:
        plugins = " and ".join(repr(e.plugin) for e in self._collisions[name])
        return f"{self.kind} {name!r} is registered by both {plugins}; block one of them"

    def list(self, include: str | Iterable[str] | None = None, exclude: str | Iterable[str] | None = None) -> list[str]:
        """Sorted registered names, optionally filtered by fnmatch patterns."""
        names = sorted(self._entries)
        if include is not None:
            patterns = [include] if isinstance(include, str) else list(include)
            names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        if exclude is not None:
            patterns = [exclude] if isinstance(exclude, str) else list(exclude)
            names = [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        return names

    def entries(self) -> list[Entry[T]]:
        return [self._entries[n] for n in sorted(self._entries)]

    def collisions(self) -> dict[str, list[Entry[T]]]:
        return {name: list(entries) for name, entries in sorted(self._collisions.items())}

    def find(self, name: str) -> Entry[T] | None:
        """The entry that provides ``name`` (its own or its family's), or None; collisions are not resolved."""
        return self._entries.get(name) or self._family_for(name)

    def entry(self, name: str) -> Entry[T]:
        if name in self._collisions:
            raise DuplicateNameError(self._collision_message(name))
        if name in self._entries:
            return self._entries[name]
        family = self._family_for(name)
        if family is not None:
            return family
        why = self.unavailable_reason(name)
        if why is not None:
            raise UnknownNameError(f"{self.kind} {name!r} {why}")
        raise UnknownNameError(self._unknown_message(name))

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._entries or self._family_for(name) is not None)

    def __len__(self) -> int:
        return len(self._entries)

    def _family_for(self, name: str) -> Entry[T] | None:
        families = [e for e in self._entries.values() if e.is_family and name.startswith(e.name[:-1])]
        # the longest prefix wins, so "hub-local:*" is not shadowed by a hypothetical "hub*"
        return max(families, key=lambda e: len(e.name), default=None)

    def close_matches(self, name: str, n: int = 3) -> list[str]:
        names = list(self._entries)
        matches = difflib.get_close_matches(name, names, n=n, cutoff=0.6)
        # "resnet18" should point at "torchvision:resnet18": compare against the part after the prefix
        by_suffix = {k.split(":", 1)[-1]: k for k in names if ":" in k}
        for m in difflib.get_close_matches(name.split(":", 1)[-1], list(by_suffix), n=n, cutoff=0.75):
            if by_suffix[m] not in matches:
                matches.append(by_suffix[m])
        return matches[:n]

    def _unknown_message(self, name: str) -> str:
        matches = self.close_matches(name)
        hint = f"; did you mean {' or '.join(repr(m) for m in matches)}?" if matches else ""
        return f"unknown {self.kind} {name!r}{hint} (`runner plugins` lists them)"
