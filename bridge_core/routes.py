"""Shared taps: one HF module serving several hook points, bridges and threads.

A tap that needs more than a plain forward hook (attention patterns through a router, MoE
experts, a norm's scale, a router's outputs) keeps, per HF module, a `Route`: the runs of every
attached hook point (`Runs`, by key, each bridge's own) and the PyTorch hooks its first attach
registered. `Routes` is the table of one kind of tap: the first attach of a module makes its
route, the last detach releases it, so two bridges over one model never overwrite or silence
each other, and nothing stays registered once nothing is hooked. A released route that can be
put back as it was (`Route.restore`) stays in the table while its module lives, and the
module's next first attach restores it instead of making it again: a cache of every point
attaches and detaches every norm's and attention's route on each call.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import nn

from bridge_core.hooks import Handle, Run
from bridge_core.torch_hooks import TorchHook

K = TypeVar("K")


class Runs(Generic[K]):
    """The runs attached to a shared tap, by key (``"pattern"``, ``(expert, "pre")`` ...).

    One module can serve several hook points (a router's three outputs) and several bridges
    (each its own point for the same key). Every attached run is kept: ``runs[key]`` runs them
    in the order they were attached, and removing one leaves the others. So two bridges over
    one model never overwrite or silence each other's hooks.
    """

    def __init__(self) -> None:
        self._by: dict[K, list[Run]] = {}

    def add(self, key: K, run: Run) -> None:
        """Attach `run` under `key`."""
        self._by.setdefault(key, []).append(run)

    def discard(self, key: K, run: Run) -> None:
        """Remove one attachment of `run` under `key` (if it is there)."""
        runs = self._by.get(key)
        if runs is not None and run in runs:
            runs.remove(run)
            if not runs:
                del self._by[key]

    def __contains__(self, key: object) -> bool:
        return key in self._by

    def __bool__(self) -> bool:
        return bool(self._by)

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._by))

    def __getitem__(self, key: K) -> Run:
        runs = self._by[key]
        if len(runs) == 1:
            return runs[0]
        return functools.partial(_chain, list(runs))

    def get(self, key: K) -> Run | None:
        """The runs under `key` as one, or None."""
        return self[key] if key in self._by else None

    def items(self) -> list[tuple[K, Run]]:
        """(key, its runs as one) pairs."""
        return [(key, self[key]) for key in list(self._by)]


@dataclass
class Route(Generic[K]):
    """What one HF module's shared tap holds: the attached runs, and the PyTorch hooks
    (`handles`) the first attach registered; `release` undoes that first attach."""

    runs: Runs[K] = field(default_factory=Runs)
    handles: tuple[Handle, ...] = ()
    kept: ClassVar[bool] = True
    """Whether a released route stays in its table for `restore`: not for a kind whose route
    refers to its module (it would keep the module alive)."""

    def through(self, key: K, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` through every run attached under `key`."""
        return self.runs[key](tensor) if key in self.runs else tensor

    def release(self, module: nn.Module) -> None:
        """The module's last run is gone: remove its PyTorch hooks (kinds that switched its
        kernel switch it back too)."""
        for handle in self.handles:
            handle.remove()

    def restore(self, module: nn.Module) -> bool:
        """Undo `release` for the module's next first attach: True when done, False when the
        kind makes its route anew instead. By default the PyTorch hooks go back, where they
        are all `TorchHook`s (first in their tables, as when made)."""
        hooks = [handle for handle in self.handles if isinstance(handle, TorchHook)]
        if len(hooks) != len(self.handles):
            return False
        for hook in hooks:
            hook.register()
        return True


R = TypeVar("R", bound=Route[Any])


class Routes(Generic[R]):
    """The routes of one kind of shared tap, by HF module, shared by every bridge and thread:
    the first attach of a module makes its route, the last detach releases it."""

    def __init__(self) -> None:
        # by id(module): (a weak reference to it, its route). Not a WeakKeyDictionary, whose
        # every lookup makes a weak reference: the router looks its module up on every call.
        self._by: dict[int, tuple[weakref.ref[nn.Module], R]] = {}
        self._lock = threading.RLock()

    def get(self, module: nn.Module) -> R | None:
        """The module's route while any of its taps is attached."""
        route = self._entry(module)
        return route if route is not None and route.runs else None

    def _entry(self, module: nn.Module) -> R | None:
        """The module's route, attached or released."""
        entry = self._by.get(id(module))
        return entry[1] if entry is not None and entry[0]() is module else None

    def attach(self, module: nn.Module, key: Any, run: Run, first: Callable[[], R]) -> Handle:
        """Attach `run` under `key`. The module's first attach restores its released route,
        or has `first()` make one (checks, hooks, switches); if that raises, nothing is left
        behind."""
        with self._lock:
            route = self._entry(module)
            if route is None or (not route.runs and not route.restore(module)):
                route = first()
                self._by[id(module)] = (weakref.ref(module, self._forget(id(module))), route)
            route.runs.add(key, run)
        return _Detach(self, module, key, run)

    def detach(self, module: nn.Module, key: Any, run: Run) -> None:
        """Remove one attachment; the module's last releases its route (kept to be
        restored, if its kind is `Route.kept`)."""
        with self._lock:
            route = self.get(module)
            if route is None:
                return
            route.runs.discard(key, run)
            if not route.runs:
                if not route.kept:
                    del self._by[id(module)]
                route.release(module)

    def _forget(self, key: int) -> Callable[[weakref.ref[nn.Module]], None]:
        """Drop the entry of a module that is gone while hooked (its id may be reused)."""

        def gone(ref: weakref.ref[nn.Module]) -> None:
            with self._lock:
                entry = self._by.get(key)
                if entry is not None and entry[0] is ref:
                    del self._by[key]

        return gone


@dataclass(slots=True, eq=False)  # made for every attach: not frozen (set one by one)
class _Detach:
    routes: Routes[Any]
    module: nn.Module
    key: Any
    run: Run

    def remove(self) -> None:
        self.routes.detach(self.module, self.key, self.run)


def _chain(runs: list[Run], tensor: torch.Tensor) -> torch.Tensor:
    for run in runs:
        tensor = run(tensor)
    return tensor
