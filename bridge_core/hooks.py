"""Hook points and the taps that connect them to the unchanged HF modules.

A `HookPoint` is a named place in the forward pass. It costs nothing until a hook is
added: only then does its *tap* register a PyTorch hook on the HF module it observes,
and when its last hook is removed the PyTorch hook goes too. Taps are registered with
``prepend=True`` so they run before any hook HF itself keeps on the module (transformers
5 records ``output_hidden_states`` with forward hooks; an edit must be what it records).

Hooks are per call and per bridge. A hook added inside `scope()` (what ``run_with_hooks``,
``hooks()`` and ``run_with_cache`` use) runs only in forwards of the same thread or context
while that scope is open; permanent and plain ``add_hook`` hooks run in every forward. A
point belongs to one bridge (`owner`): while a bridge runs its forward (`running`), the
points of other bridges over the same HF model stay silent.
"""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from bridge_core.errors import BridgeError, HookReturnError, InputError
from bridge_core.module_state import LazyModule, init_lazy_module, lazy_containers, lazy_state
from bridge_core.taps import (
    Handle,
    InputTap,
    OutputTap,
    Run,
    Tap,
    changed_since,
    first_tensor,
    replace_first,
    snapshot,
)
from bridge_core.torch_hooks import TorchHook, is_tap, mark_tap, strip_taps

HookFn = Callable[..., torch.Tensor | None]
"""A TransformerLens hook: ``fn(tensor, hook) -> tensor | None``."""

Direction = Literal["fwd", "bwd"]
Collect = Literal["list", "stack", "cat"]

_LAYER = re.compile(r"\.(\d+)\.")
# the owner of the bridge whose forward runs here (`running`), and the open scopes (`scope`):
# one variable, read once per hook point per forward
_CONTEXT: ContextVar[tuple[Owner | None, tuple[object, ...]]] = ContextVar(
    "transformer_bridge_context", default=(None, ())
)


def scope() -> AbstractContextManager[object]:
    """Open a hook scope in this thread/context: hooks added with it run only inside it."""
    return _Scope()


def running(owner: Owner) -> AbstractContextManager[None]:
    """Mark the forwards inside as those of the bridge whose points `owner` owns: other
    bridges' points stay silent."""
    return _Running(owner)


class _Scope:
    # a class rather than a generator: entered on every hooked call
    __slots__ = ("_reset",)

    def __enter__(self) -> object:
        token = object()
        owner, scopes = _CONTEXT.get()
        self._reset = _CONTEXT.set((owner, (*scopes, token)))
        return token

    def __exit__(self, *exc: object) -> None:
        _CONTEXT.reset(self._reset)


class _Running:
    __slots__ = ("_owner", "_reset")

    def __init__(self, owner: Owner) -> None:
        self._owner = owner

    def __enter__(self) -> None:
        self._reset = _CONTEXT.set((self._owner, _CONTEXT.get()[1]))

    def __exit__(self, *exc: object) -> None:
        _CONTEXT.reset(self._reset)


_ATTACHING = threading.RLock()
"""Held while a hook point's hook lists change and its tap is attached or detached (each is
check-then-act, and any thread may add hooks). One lock for every point: `insert_all` and
`discard_all` take it once for the hundreds of points of one call."""


def insert_all(
    pairs: Iterable[tuple[HookPoint, HookFn]],
    direction: Direction,
    scope: object | None,
    level: int | None,
    added: list[tuple[HookPoint, Hook, Direction]],
) -> None:
    """Add each (point, fn) of `pairs` in order as a temporary hook in `scope` at `level`
    (`HookPoint.insert`; consecutive pairs of one function share one `Hook`), appending
    (point, hook, direction) to `added` once it is in, so that after an error the caller can
    discard exactly those (`discard_all`)."""
    fn: HookFn | None = None
    hook: Hook | None = None
    with _ATTACHING:
        for point, function in pairs:
            if function is not fn or hook is None:
                fn, hook = function, Hook(function, False, scope, level)
            point._insert(hook, direction)
            added.append((point, hook, direction))


def discard_all(added: list[tuple[HookPoint, Hook, Direction]]) -> None:
    """Discard each (point, hook, direction) of `added`, last first (`HookPoint.discard`)."""
    with _ATTACHING:
        for point, hook, direction in reversed(added):
            point._discard(hook, direction)


_PLAIN_STATE = frozenset(
    {
        "owner",
        "name",
        "ctx",
        "_fwd",
        "_bwd",
        "_tap",
        "_attached",
        "_spare",
        "calls",
        "collect",
        "shape",
        "enabled",
        "copy_on_cache",
    }
)


@dataclass(eq=False, slots=True)  # identity: the same function may be added twice
class Hook:
    """One added hook: its function and how long and where it runs (see `HookPoint.insert`)."""

    fn: HookFn
    permanent: bool
    scope: object | None = None  # runs only while this scope is open in the running context
    level: int | None = None  # the `hooks()` nesting level it was added at


@dataclass(eq=False, slots=True)
class HookHandle:
    """Removes one hook from its hook point."""

    point: HookPoint
    hook: Hook
    direction: Direction
    removed: bool = field(default=False)

    def remove(self) -> None:
        """Remove the hook (idempotent)."""
        if not self.removed:
            self.removed = True
            self.point.discard(self.hook, self.direction)

    @property
    def is_permanent(self) -> bool:
        """Whether `reset_hooks()` keeps this hook (TransformerLens's `LensHandle` field)."""
        return self.hook.permanent

    @property
    def user_hook(self) -> HookFn:
        """The hook function as it was added."""
        return self.hook.fn

    @property
    def context_level(self) -> int | None:
        """The `hooks()` nesting level the hook was added at, or None."""
        return self.hook.level


class _HasHooks:
    """`HookPoint.has_hooks`: TransformerLens's method, still usable as the old property.

    ``point.has_hooks(dir="both", including_permanent=True, level=None)`` is the method;
    ``if point.has_hooks:`` (the property this used to be) still works, with a
    DeprecationWarning.
    """

    __slots__ = ("point",)

    def __init__(self, point: HookPoint) -> None:
        self.point = point

    def __call__(
        self,
        dir: Literal["fwd", "bwd", "both"] = "both",
        including_permanent: bool = True,
        level: int | None = None,
    ) -> bool:
        return bool(self.point._matching(dir, including_permanent, level))

    def __bool__(self) -> bool:
        warnings.warn(
            "HookPoint.has_hooks is a method, as in TransformerLens: call has_hooks()",
            DeprecationWarning,
            stacklevel=2,
        )
        return bool(self.point._fwd or self.point._bwd)

    def __repr__(self) -> str:
        return f"<has_hooks of {self.point.name!r}: {bool(self.point._fwd or self.point._bwd)}>"


# nn.Module's 15 containers and the point's own on first use: a wrap makes hundreds of points
@lazy_containers(ctx=dict, _fwd=list, _bwd=list)
class HookPoint(LazyModule):
    """A named activation that hooks can read, replace, or take the gradient of.

    Hook functions have TransformerLens's signature ``fn(tensor, hook) -> tensor | None``;
    a returned tensor replaces the activation and must have its shape and dtype.
    """

    # The plain state's defaults are the class's (immutable values): a point made by a wrap
    # (hundreds per wrap) holds only what is set on it.
    name: str = ""
    ctx: dict[Any, Any]  # made on first read (`lazy_containers`), as _fwd and _bwd
    _fwd: list[Hook]
    _bwd: list[Hook]
    _tap: Tap | None = None
    _attached: Handle | None = None
    _spare: TorchHook | None = None  # the tap's PyTorch hook, removed: `_insert` restores it
    calls: int | str = 1
    """How often this point fires per forward (`verify` checks it): a number, "any",
    or an expression over counts the bridge's components report (``"n_images"``)."""
    collect: Collect = "list"
    """How a cache keeps the calls of a point that fires more than once."""
    shape: tuple[int | str, ...] | None = None
    """The documented shape, in symbols (``("batch", "pos", "d_model")``), for `verify`."""
    enabled: bool = True
    """False for an opt-in point (``attn.hook_result``) until it is switched on."""
    copy_on_cache: bool | None = None
    """Whether the model changes this tensor in place after the point fires, so a cache
    must copy it (None: not known yet; the first cache of the point copies and finds out)."""
    owner: Owner | None = None
    """The `Owner` of the bridge this point belongs to (its hooks are silent in other
    bridges' forwards)."""

    def __init__(self) -> None:
        # nn.Module's containers, like the point's own, come on first use (`lazy_containers`)
        init_lazy_module(self)

    def __setattr__(self, name: str, value: Any) -> None:
        # Plain state (never a Module, Parameter or Tensor) skips nn.Module.__setattr__'s
        # registration checks: it is set on every hook added or removed, and 200+ times a wrap.
        if name in _PLAIN_STATE:
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)  # LazyModule's: with the containers made first

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_spare", None)  # a hook table of the module this point observes now
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)  # nn.Module's would make the containers `__dict__` lacks

    def bind(self, tap: Tap) -> None:
        """Connect this hook point to the forward pass through `tap`."""
        if self._attached is not None:
            raise RuntimeError(f"hook point {self.name!r} is bound while it has hooks")
        self.__dict__["_tap"] = tap  # plain state (see __setattr__), set ~300 times a wrap
        if "_spare" in self.__dict__:  # the old tap's
            del self.__dict__["_spare"]

    def add_hook(
        self,
        fn: HookFn,
        dir: Direction = "fwd",
        is_permanent: bool = False,
        prepend: bool = False,
        scope: object | None = None,
        level: int | None = None,
    ) -> HookHandle:
        """Add `fn` as a forward (`dir="fwd"`) or backward (`dir="bwd"`) hook.

        A backward hook may return the gradient, ``(gradient,)`` (as PyTorch's module hooks
        do) or None.

        Args:
            scope: a token from `scope()`: the hook then runs only in forwards of a context
                where that scope is open (None: in every forward).
            level: the `hooks()` nesting level (TransformerLens's), for `remove_hooks`.

        Returns:
            A handle whose `remove()` takes this one hook away again.
        """
        if not callable(fn):
            raise InputError(
                f"the hook for {self.name!r} is {fn!r:.60}, not callable; a hook is "
                "fn(tensor, hook) -> tensor | None"
            )
        if dir not in ("fwd", "bwd"):
            raise InputError(f"hook direction must be 'fwd' or 'bwd', got {dir!r}")
        hook = Hook(fn, is_permanent, scope, level)
        self.insert(hook, dir, prepend)
        return HookHandle(self, hook, dir)

    def insert(self, hook: Hook, direction: Direction, prepend: bool = False) -> None:
        """Add a hook whose function and direction are checked (`add_hook`; `insert_all`
        adds many at once); `discard` takes it away again.

        Raises:
            BridgeError: the point is not bound to a module, or is off.
        """
        with _ATTACHING:
            self._insert(hook, direction, prepend)

    def _insert(self, hook: Hook, direction: Direction, prepend: bool = False) -> None:
        """`insert`, with `_ATTACHING` held by the caller."""
        if self._tap is None:
            raise BridgeError(f"hook point {self.name!r} is not bound to a module")
        if not self.enabled:
            raise BridgeError(
                f"hook point {self.name!r} is off (it is opt-in: it costs memory and time on "
                "every forward it is used in); switch it on first, e.g. "
                "bridge.set_use_attn_result(True) for attn.hook_result"
            )
        if self._attached is None:  # attach first: if the tap refuses, nothing is left
            spare = self._spare
            if spare is not None:  # what the tap registered last time, as it was
                spare.register()
                self.__dict__["_attached"] = spare
            else:
                self.__dict__["_attached"] = self._tap.attach(self._run)
            owner = self.owner
            if owner is not None:  # the owner counts points with a tap attached
                owner.attached_points += 1
        hooks = self._fwd if direction == "fwd" else self._bwd
        hooks.insert(0, hook) if prepend else hooks.append(hook)

    def add_perma_hook(self, fn: HookFn, dir: Direction = "fwd") -> HookHandle:
        """Add a hook that `remove_hooks()` keeps unless ``including_permanent=True``."""
        return self.add_hook(fn, dir, is_permanent=True)

    def remove_hooks(
        self,
        dir: Literal["fwd", "bwd", "both"] = "both",
        including_permanent: bool = False,
        level: int | None = None,
    ) -> None:
        """Remove this point's hooks in direction `dir` (permanent ones only if asked; only
        those added at `hooks()` nesting `level`, if given)."""
        for direction, hook in self._matching(dir, including_permanent, level):
            self.discard(hook, direction)

    def _matching(
        self, dir: str, including_permanent: bool, level: int | None
    ) -> list[tuple[Direction, Hook]]:
        if dir not in ("fwd", "bwd", "both"):
            raise InputError(f"hook direction must be 'fwd', 'bwd' or 'both', got {dir!r}")
        found: list[tuple[Direction, Hook]] = []
        directions: tuple[Direction, ...] = ("fwd", "bwd")
        for direction in directions:
            if dir in (direction, "both"):
                for hook in list(self._fwd if direction == "fwd" else self._bwd):
                    if (including_permanent or not hook.permanent) and (
                        level is None or hook.level == level
                    ):
                        found.append((direction, hook))
        return found

    @property
    def fwd_hooks(self) -> list[HookHandle]:
        """Handles of the forward hooks, in the order they run (TransformerLens's attribute)."""
        return [HookHandle(self, hook, "fwd") for hook in self._fwd]

    @property
    def bwd_hooks(self) -> list[HookHandle]:
        """Handles of the backward hooks."""
        return [HookHandle(self, hook, "bwd") for hook in self._bwd]

    def clear_context(self) -> None:
        """Forget what hooks stored in `hook.ctx`."""
        ctx = self.__dict__.get("ctx")  # not made for a point whose hooks never used it
        if ctx:
            ctx.clear()

    @property
    def has_hooks(self) -> _HasHooks:
        """``has_hooks(dir="both", including_permanent=True, level=None)``: whether hooks are
        attached (TransformerLens's method; ``if point.has_hooks:`` still works, deprecated)."""
        return _HasHooks(self)

    def layer(self) -> int:
        """The layer index in this hook point's name (``blocks.3.attn.hook_q`` -> 3)."""
        match = _LAYER.search(f".{self.name}.")
        if match is None:
            raise ValueError(f"hook point {self.name!r} has no layer index in its name")
        return int(match.group(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the hooks on `x` (what the forward pass does through the tap)."""
        return self._run(x)

    def discard(self, hook: Hook, direction: Direction) -> None:
        """Remove `hook` (if it is here); the last hook's removal detaches the tap."""
        with _ATTACHING:
            self._discard(hook, direction)

    def _discard(self, hook: Hook, direction: Direction) -> None:
        """`discard`, with `_ATTACHING` held by the caller."""
        hooks = self._fwd if direction == "fwd" else self._bwd
        if hook in hooks:
            hooks.remove(hook)
        attached = self._attached
        if attached is not None and not (self._fwd or self._bwd):
            attached.remove()
            self.__dict__["_attached"] = None
            if type(attached) is TorchHook:  # one PyTorch hook: kept to be restored
                self.__dict__["_spare"] = attached
            owner = self.owner
            if owner is not None:
                owner.attached_points -= 1

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        owner, scopes = _CONTEXT.get()
        if owner is not None and owner is not self.owner:
            return x  # another bridge's forward over the same HF model
        for hook in self._fwd[:]:
            if hook.scope is not None and hook.scope not in scopes:
                continue  # a scoped hook of another thread or call
            result = hook.fn(x, hook=self)
            if result is not None:
                self._check(result, x, hook.fn)
                x = result
        if not self._bwd:
            return x
        backward = [h for h in self._bwd if h.scope is None or h.scope in scopes]
        if backward and x.requires_grad:
            # a fresh view that the forward goes on with: views the taps make (heads, slices,
            # patterns) are otherwise not part of the graph, and would never see a gradient
            x = x.view_as(x)
            register: Callable[..., Any] = x.register_hook  # untyped in torch
            for hook in backward:
                register(_grad_hook(hook.fn, self))
        return x

    def _check(self, result: Any, x: torch.Tensor, fn: HookFn) -> None:
        name = getattr(fn, "__qualname__", repr(fn))
        if not isinstance(result, torch.Tensor):
            raise HookReturnError(
                f"hook {name} on {self.name!r} returned {type(result).__name__}; "
                "a hook returns None or a tensor that replaces the activation"
            )
        if result.shape != x.shape or result.dtype != x.dtype:
            raise HookReturnError(
                f"hook {name} on {self.name!r} returned a tensor of shape "
                f"{tuple(result.shape)} and dtype {result.dtype}; the activation has shape "
                f"{tuple(x.shape)} and dtype {x.dtype}"
            )
        if result.device != x.device:
            raise HookReturnError(
                f"hook {name} on {self.name!r} returned a tensor on {result.device}; the "
                f"activation is on {x.device}. Accepted: a tensor on the activation's device "
                "(e.g. result.to(tensor.device))"
            )

    def extra_repr(self) -> str:
        return f"name={self.name!r}, fwd={len(self._fwd)}, bwd={len(self._bwd)}"


def new_points(names: Iterable[str]) -> dict[str, HookPoint]:
    """A fresh `HookPoint` for each of `names`, by name (a component's own points: hundreds
    per wrap). ``HookPoint()`` is only `init_lazy_module`'s state, which this gives without
    the two Python calls of ``__init__`` (`lazy_state`)."""
    state = lazy_state(HookPoint)
    if state is None:
        return {name: HookPoint() for name in names}
    new = object.__new__
    points = {}
    for name in names:
        point = new(HookPoint)
        point.__dict__.update(state)
        points[name] = point
    return points


class Owner:
    """What the hook points of one bridge belong to (`HookPoint.owner`, `running`).

    The points refer to this token rather than to the bridge, so that dropping a bridge frees
    it and its hundreds of points at once instead of leaving a reference cycle to the garbage
    collector. It counts the points that have a tap attached (a compiled call guards on it).
    """

    __slots__ = ("attached_points",)

    def __init__(self) -> None:
        self.attached_points = 0


def _grad_hook(fn: HookFn, point: HookPoint) -> Callable[[torch.Tensor], torch.Tensor | None]:
    def on_grad(grad: torch.Tensor) -> torch.Tensor | None:
        result = fn(grad, hook=point)
        if isinstance(result, tuple) and len(result) == 1:  # PyTorch's (grad,) convention
            result = result[0]
        if result is not None:
            point._check(result, grad, fn)
        return result

    return on_grad


__all__ = [
    "Collect",
    "Handle",
    "Hook",
    "HookFn",
    "HookHandle",
    "HookPoint",
    "InputTap",
    "OutputTap",
    "Owner",
    "Run",
    "Tap",
    "changed_since",
    "discard_all",
    "first_tensor",
    "insert_all",
    "is_tap",
    "mark_tap",
    "replace_first",
    "running",
    "scope",
    "snapshot",
    "strip_taps",
]
