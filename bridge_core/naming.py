"""Hook names: canonical paths, their aliases, and the filters users pass."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from bridge_core.errors import HookNameError, InputError, did_you_mean
from bridge_core.hooks import HookPoint

NamesFilter = None | str | Iterable[str] | Callable[[str], bool]


@dataclass
class HookNames:
    """The canonical hook points of a bridge and the aliases that point at them."""

    points: dict[str, HookPoint] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def add_alias(self, alias: str, target: str) -> None:
        """Let `alias` name the hook point `target` (itself canonical or an alias)."""
        canonical = self.aliases.get(target, target)
        if canonical not in self.points:
            raise HookNameError(f"alias {alias!r} points at {target!r}, which is no hook point")
        if alias in self.points:
            raise HookNameError(f"alias {alias!r} is already a canonical hook name")
        self.aliases[alias] = canonical

    def all_names(self) -> list[str]:
        """Canonical names followed by aliases."""
        return [*self.points, *self.aliases]

    def canonical(self, name: str) -> str:
        """The canonical name for a canonical name or an alias.

        Raises:
            HookNameError: unknown name, with a did-you-mean.
        """
        if name in self.points:
            return name
        if name in self.aliases:
            return self.aliases[name]
        raise HookNameError(
            f"unknown hook name {name!r}.{did_you_mean(name, self.all_names())} "
            "See bridge.hook_names() for every name."
        )

    def select(self, names_filter: NamesFilter) -> list[str]:
        """The canonical names a names_filter selects, in forward order, each once.

        Args:
            names_filter: None (all), a name, a list of names, or a predicate called with
                canonical names and aliases (an alias that matches selects its target).
                None and predicates skip opt-in points that are off (``attn.hook_result``);
                naming one explicitly is an error that says how to switch it on.

        Raises:
            HookNameError: a given name is unknown.
            InputError: the filter has the wrong type.
        """
        if names_filter is None:
            return [n for n, p in self.points.items() if p.enabled]
        if isinstance(names_filter, str):
            return [self.canonical(names_filter)]
        if callable(names_filter):
            chosen = {n for n in self.points if names_filter(n)}
            chosen |= {t for a, t in self.aliases.items() if t not in chosen and names_filter(a)}
            return [n for n, p in self.points.items() if n in chosen and p.enabled]
        if isinstance(names_filter, Iterable):
            names = list(names_filter)
            if all(isinstance(n, str) for n in names):
                chosen = {self.canonical(n) for n in names}
                return [n for n in self.points if n in chosen]
        raise InputError(
            f"names_filter must be None, a hook name, a list of hook names or a callable "
            f"name -> bool; got {type(names_filter).__name__}"
        )
