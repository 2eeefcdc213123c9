"""Taps: how a hook point reaches the tensor of an unchanged HF module, and the helpers that
tell whether its hooks edited it.

A tap's `attach` registers what it needs on the module (usually one PyTorch hook, see
`bridge_core.torch_hooks`) and returns a handle that removes it. `OutputTap` and `InputTap`
are the plain ones; views, norms, attention patterns and experts build on them elsewhere.
Everything here is re-exported by `bridge_core.hooks`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from bridge_core.errors import BridgeError
from bridge_core.torch_hooks import forward_hook, forward_pre_hook

Run = Callable[[torch.Tensor], torch.Tensor]
"""What a tap calls with the module's tensor: a hook point's hooks, returning the tensor the
model goes on with."""


class Handle(Protocol):
    """Anything that can be removed (a torch `RemovableHandle` or our own handles)."""

    def remove(self) -> None: ...


class Tap(Protocol):
    """Connects a hook point to the HF forward pass; `attach` returns a removable handle."""

    def attach(self, run: Run) -> Handle: ...


def snapshot(tensor: torch.Tensor) -> Any:
    """What later tells whether `tensor` was changed in place (see `changed_since`).

    Its version counter, which PyTorch bumps on every in-place operation, so this costs
    nothing; inference tensors have no version counter, so for them it is a copy.
    """
    return tensor.clone() if tensor.is_inference() else tensor._version


def changed_since(tensor: torch.Tensor, before: Any) -> bool:
    """Whether `tensor` was changed in place since `before = snapshot(tensor)`."""
    if isinstance(before, torch.Tensor):
        return not torch.equal(tensor, before)
    return bool(tensor._version != before)


def first_tensor(value: Any) -> torch.Tensor:
    """Return the tensor a module output or argument list stands for (its first element)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, tuple | list):
        return first_tensor(value[0])
    if hasattr(value, "to_tuple"):  # transformers ModelOutput
        return first_tensor(value.to_tuple()[0])
    raise TypeError(
        f"expected a tensor, a tuple starting with one, or a ModelOutput; got {type(value)}"
    )


def replace_first(value: Any, new: torch.Tensor) -> Any:
    """Return `value` with its first tensor replaced by `new`."""
    if isinstance(value, torch.Tensor):
        return new
    if isinstance(value, tuple):
        return (replace_first(value[0], new), *value[1:])
    if isinstance(value, list):
        return [replace_first(value[0], new), *value[1:]]
    key = next(iter(value.keys()))  # ModelOutput: its first field is the main output
    value[key] = replace_first(value[key], new)
    return value


@dataclass(frozen=True)
class OutputTap:
    """The (first) output of an HF module."""

    module: nn.Module

    def attach(self, run: Run) -> Handle:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            tensor = output if type(output) is torch.Tensor else first_tensor(output)
            new = run(tensor)
            return None if new is tensor else replace_first(output, new)

        return forward_hook(self.module, hook)


@dataclass(frozen=True)
class InputTap:
    """The first tensor argument of an HF module (positional, or the keyword `arg`)."""

    module: nn.Module
    arg: str = "hidden_states"

    def attach(self, run: Run) -> Handle:
        def hook(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> Any:
            if args and isinstance(args[0], torch.Tensor):
                new = run(args[0])
                return None if new is args[0] else ((new, *args[1:]), kwargs)
            name = self._keyword(kwargs)
            new = run(kwargs[name])
            return None if new is kwargs[name] else (args, {**kwargs, name: new})

        return forward_pre_hook(self.module, hook)

    def _keyword(self, kwargs: dict[str, Any]) -> str:
        if isinstance(kwargs.get(self.arg), torch.Tensor):
            return self.arg
        # guessing another tensor keyword could hook the attention mask instead of the input
        raise BridgeError(
            f"{type(self.module).__name__} was called without a positional tensor or the "
            f"keyword {self.arg!r} (got keywords {sorted(kwargs)}); set the component class's "
            "input_arg to the keyword its input arrives under"
        )


__all__ = [
    "Handle",
    "InputTap",
    "OutputTap",
    "Run",
    "Tap",
    "changed_since",
    "first_tensor",
    "replace_first",
    "snapshot",
]
