"""Hook names: canonical paths, their aliases, and the filters users pass."""

from __future__ import annotations

from collections.abc import Callable, Iterable, KeysView, Mapping
from dataclasses import dataclass, field
from typing import Any

from bridge_core.errors import HookNameError, InputError, did_you_mean
from bridge_core.hooks import HookFn, HookPoint

NamesFilter = None | str | Iterable[str] | Callable[[str], bool]
PAIRS_ACCEPTED = (
    "a list of (hook name or filter, hook function) pairs, e.g. "
    "[('blocks.0.hook_resid_pre', fn)]; a filter is a list of names or a callable name -> bool"
)


class NameKeys(KeysView[str]):
    """Canonical names (iteration, ``len``) whose membership test also accepts aliases."""

    def __init__(self, mapping: Mapping[str, Any], accepts: Callable[[object], bool]) -> None:
        super().__init__(mapping)
        self._accepts = accepts

    def __contains__(self, key: object) -> bool:
        return self._accepts(key)


class HookDict(dict[str, HookPoint]):
    """Hook points by canonical name that also answer to their aliases.

    Iteration, ``keys()``, ``len()`` are the canonical names (each hook point once);
    ``d[alias]``, ``alias in d`` and ``d.get(alias)`` find the aliased hook point, as
    TransformerLens's ``hook_dict`` finds its names.
    """

    def __init__(self, points: dict[str, HookPoint], aliases: dict[str, str]) -> None:
        super().__init__(points)
        self.aliases = aliases

    def __missing__(self, key: str) -> HookPoint:
        target = self.aliases.get(key) if isinstance(key, str) else None
        if target is None:
            known = [*self, *self.aliases]
            raise HookNameError(f"unknown hook name {key!r}.{did_you_mean(str(key), known)}")
        return dict.__getitem__(self, target)

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or (isinstance(key, str) and key in self.aliases)

    def keys(self) -> NameKeys:  # type: ignore[override]  # a KeysView that accepts aliases
        """The canonical names; ``alias in d.keys()`` is true too."""
        return NameKeys(self, self.__contains__)

    def get(self, key: str, default: Any = None) -> Any:
        """The hook point named `key` (canonical or alias), or `default`."""
        if key in self:
            return self[key]
        return default


_ATTN = {"q", "k", "v", "z", "pattern", "attn_scores", "rot_q", "rot_k", "result"}
_MLP = {"pre", "post", "pre_linear"}
_NORM = {"normalized", "scale"}
_SHORT = {"a": "attn", "m": "mlp", "attention": "attn"}


def act_name(
    name: str, layer: int | None = None, sublayer: str | None = None, stack: str = "blocks"
) -> str:
    """TransformerLens's `get_act_name`: ``("resid_pre", 3)`` -> ``blocks.3.hook_resid_pre``.

    `stack` names the list of layers (``"vision_encoder.layers"`` for a vision tower).
    """
    if "." in name or name.startswith("hook_"):
        return name
    if name in ("embed", "pos_embed"):
        return f"hook_{name}"
    if layer is None:
        if name in _NORM:
            return f"ln_final.hook_{name}"
        raise InputError(f"activation {name!r} needs a layer index, e.g. cache[{name!r}, 0]")
    if name in _ATTN:  # sublayer: another attention of the block, e.g. "cross_attn"
        attention = sublayer or "attn"
        return f"{stack}.{layer}.{_SHORT.get(attention, attention)}.hook_{name}"
    if name in _MLP:
        return f"{stack}.{layer}.mlp.hook_{name}"
    if name in _NORM:
        return f"{stack}.{layer}.{sublayer or 'ln1'}.hook_{name}"
    if sublayer:
        return f"{stack}.{layer}.{_SHORT.get(sublayer, sublayer)}.hook_{name}"
    return f"{stack}.{layer}.hook_{name}"


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
            raise HookNameError(
                f"alias {alias!r} is already a canonical hook name; an alias cannot redirect "
                f"one (here to {target!r}). Accepted: alias names that are no canonical hook "
                "name (bridge.hook_dict lists those)"
            )
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

    def select_hooks(self, hooks: Any, argument: str) -> list[tuple[list[str], HookFn]]:
        """Resolve `hooks` (what a user passed as `argument`, e.g. ``fwd_hooks``) to
        (canonical names, hook function) pairs, checking every pair before any is used.

        Raises:
            InputError: `hooks` is not a list of (name or filter, function) pairs (a bare
                pair is refused with the fix), or a name is None or a function not callable.
            HookNameError: a name is unknown.
        """
        if isinstance(hooks, tuple | list) and len(hooks) == 2 and callable(hooks[1]):
            raise InputError(
                f"{argument} must be a list of (hook name or filter, hook function) pairs; got "
                f"one bare pair {_short(hooks)}: wrap it in a list, "
                f"{argument}=[({_short(hooks[0])}, fn)]"
            )
        if isinstance(hooks, str | bytes | dict) or not isinstance(hooks, Iterable):
            raise InputError(f"{argument} must be {PAIRS_ACCEPTED}; got {_short(hooks)}")
        selected = []
        for i, pair in enumerate(hooks):
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise InputError(
                    f"{argument}[{i}] must be a (hook name or filter, hook function) pair; got "
                    f"{_short(pair)}. Accepted: {PAIRS_ACCEPTED}"
                )
            names, fn = pair
            if names is None:  # select(None) would mean every hook point
                raise InputError(
                    f"{argument}[{i}]: the hook name is None. Accepted: {PAIRS_ACCEPTED}; "
                    "for every hook point use lambda name: True"
                )
            if not callable(fn):
                raise InputError(
                    f"{argument}[{i}]: the hook function for {_short(names)} is "
                    f"{_short(fn)}, not callable. Accepted: fn(tensor, hook) -> tensor | None"
                )
            selected.append((self.select(names), fn))
        return selected


def _short(value: object) -> str:
    """`value`'s repr, cut to 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
