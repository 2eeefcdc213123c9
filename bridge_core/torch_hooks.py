"""The PyTorch hooks that taps register on HF modules, marked as theirs.

Taps attach and remove their hooks on every hooked call, hundreds per forward, so they write
to a module's hook tables directly (`forward_hook`, `forward_pre_hook`: what
``register_forward_hook`` / ``register_forward_pre_hook`` do, without a handle of weak
references each time), under keys PyTorch never uses (negative ones). A tap that registers a
hook through PyTorch's own methods marks its function (`mark_tap`). Either way a copy of a
hooked model can tell the taps' hooks from others and drop them (`strip_taps`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn


def mark_tap(function: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a PyTorch hook function as a bridge tap's (a copied model can then drop it)."""
    function.__dict__["transformer_bridge_tap"] = True
    return function


def is_tap(function: object) -> bool:
    """Whether `function` is a PyTorch hook a bridge tap registered (see `mark_tap`)."""
    return bool(getattr(function, "transformer_bridge_tap", False))


def strip_taps(model: nn.Module) -> None:
    """Remove the PyTorch hooks of bridge taps from `model`'s modules (in a copy of a model):
    those under our keys, and those marked with `mark_tap`."""
    for module in model.modules():
        tables = (
            (module._forward_hooks, (module._forward_hooks_with_kwargs,
                                     module._forward_hooks_always_called)),
            (module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
        )  # fmt: skip
        for hooks, flags in tables:
            for key in [k for k, fn in hooks.items() if _ours(k) or is_tap(fn)]:
                del hooks[key]
                for flag in flags:
                    flag.pop(key, None)


_KEYS = itertools.count(-1, -1)  # PyTorch numbers its own hooks from 0 up: ours never collide
# (nor does ``strip_taps`` mistake one of PyTorch's for ours)


def _ours(key: object) -> bool:
    """Whether a hook table's `key` is one `forward_hook` / `forward_pre_hook` gave."""
    return isinstance(key, int) and key < 0


@dataclass(eq=False, slots=True)
class TorchHook:
    """A PyTorch module hook that a tap registered (`forward_hook`, `forward_pre_hook`)."""

    hooks: dict[int, Any]
    key: int
    fn: Callable[..., Any]
    prepend: bool
    flags: dict[int, bool] | None = None

    def remove(self) -> None:
        """Unregister the hook (idempotent)."""
        self.hooks.pop(self.key, None)
        if self.flags is not None:
            self.flags.pop(self.key, None)

    def register(self) -> None:
        """Put the hook in its table (first, if `prepend`): when made, and again after
        `remove` (a hook point whose tap handed out a `TorchHook` re-registers it so on its
        next hooked call)."""
        self.hooks[self.key] = self.fn
        if self.prepend:
            self.hooks.move_to_end(self.key, last=False)  # type: ignore[attr-defined]
        if self.flags is not None:
            self.flags[self.key] = True


def forward_hook(module: nn.Module, fn: Callable[..., Any], prepend: bool = True) -> TorchHook:
    """Register `fn` as a forward hook of `module` (first, unless not `prepend`), under a key
    that marks it as a tap's.

    What ``register_forward_hook(fn, prepend=prepend)`` does, without the handle's weak
    references: taps are attached and removed on every hooked call, hundreds per forward.
    """
    return _registered(TorchHook(module._forward_hooks, next(_KEYS), fn, prepend))


def forward_pre_hook(
    module: nn.Module, fn: Callable[..., Any], with_kwargs: bool = True, prepend: bool = True
) -> TorchHook:
    """Register `fn` as a forward pre-hook of `module` (called with the keyword arguments
    unless not `with_kwargs`; first unless not `prepend`), under a key that marks it as a
    tap's."""
    flags = module._forward_pre_hooks_with_kwargs if with_kwargs else None
    hooks = module._forward_pre_hooks
    return _registered(TorchHook(hooks, next(_KEYS), fn, prepend, flags))


def _registered(hook: TorchHook) -> TorchHook:
    hook.register()
    return hook


__all__ = ["TorchHook", "forward_hook", "forward_pre_hook", "is_tap", "mark_tap", "strip_taps"]
