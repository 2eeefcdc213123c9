"""Views: a tap's tensor seen through invertible steps (split, reshape, select, ...).

A `ViewTap` wraps another tap. When the inner tap hands over a tensor, each `Step` takes its
part (``q`` out of a fused ``qkv``, heads out of ``[..., n_heads * d_head]``); the hooks see
the last part. If a hook returns a new tensor, the steps put it back in reverse order, so the
model goes on with the fused tensor edited in just that part. The steps take views that
share storage with the tensor (`narrow`, `unflatten`, `select`), so an in-place edit of the
part is an in-place edit of the tensor, and no copy is made while hooks only read.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from bridge_core.errors import BridgeError
from bridge_core.hooks import (
    Handle,
    Run,
    Tap,
    changed_since,
    snapshot,
)
from bridge_core.torch_hooks import forward_pre_hook


class Step(Protocol):
    """One invertible step: `take` the part, `put` an edited part back into the whole."""

    def take(self, x: torch.Tensor) -> torch.Tensor: ...

    def put(self, x: torch.Tensor, part: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Split:
    """Part `index` of the last dimension split into `sizes`."""

    sizes: tuple[int, ...]
    index: int

    def __post_init__(self) -> None:
        if not -len(self.sizes) <= self.index < len(self.sizes):
            raise ValueError(f"split index {self.index} is out of range for sizes {self.sizes}")

    def take(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != sum(self.sizes):
            raise BridgeError(
                f"cannot split a last dimension of {x.shape[-1]} into {list(self.sizes)} "
                f"(they add up to {sum(self.sizes)}); check the spec's split sizes"
            )
        index = self.index % len(self.sizes)
        return x.narrow(-1, sum(self.sizes[:index]), self.sizes[index])

    def put(self, x: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        index = self.index % len(self.sizes)
        parts = list(torch.split(x, list(self.sizes), dim=-1))
        parts[index] = part
        return torch.cat(parts, dim=-1)


@dataclass(frozen=True)
class Reshape:
    """The last dimension as `sizes` (one of them may be -1)."""

    sizes: tuple[int, ...]

    def take(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return torch.unflatten(x, -1, self.sizes)
        except RuntimeError as exc:
            raise BridgeError(
                f"cannot view a last dimension of {x.shape[-1]} as {list(self.sizes)}: {exc}"
            ) from None

    def put(self, x: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        return part.flatten(-len(self.sizes))


@dataclass(frozen=True)
class Flatten:
    """The last `n` dimensions as one."""

    n: int

    def take(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(-self.n)

    def put(self, x: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        return torch.unflatten(part, -1, x.shape[-self.n :])


@dataclass(frozen=True)
class Select:
    """Index `index` of dimension `dim` (the dimension goes)."""

    dim: int
    index: int

    def take(self, x: torch.Tensor) -> torch.Tensor:
        return x.select(self.dim, self.index)

    def put(self, x: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        return torch.select_scatter(x, part, self.dim, self.index)


@dataclass(frozen=True)
class Transpose:
    """Dimensions `dims` swapped."""

    dims: tuple[int, int]

    def take(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(*self.dims)

    def put(self, x: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        return part.transpose(*self.dims)


@dataclass(frozen=True)
class Tokens:
    """A flattened ``[batch * pos, ...]`` as ``[batch, pos, ...]``.

    Batch and pos are the first two dimensions of the input (``input_ids``, else
    ``inputs_embeds``, else the first positional tensor) of `source`, the model or one of
    its modules, recorded by a pre-hook that `ViewTap` attaches together with its inner tap.
    """

    source: nn.Module
    seen: list[tuple[int, int]] = field(default_factory=list, compare=False)

    def record(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        candidates = [kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args[:1]]
        tensor = next((t for t in candidates if isinstance(t, torch.Tensor)), None)
        if tensor is not None and tensor.dim() >= 2:
            self.seen[:] = [(int(tensor.shape[0]), int(tensor.shape[1]))]

    def take(self, x: torch.Tensor) -> torch.Tensor:
        if not self.seen:
            raise BridgeError(
                f"the tokens view needs the batch and position sizes from the input of "
                f"{type(self.source).__name__}, which has not run"
            )
        batch, pos = self.seen[0]
        if x.shape[0] != batch * pos:
            raise BridgeError(
                f"the tokens view expects {batch} * {pos} = {batch * pos} rows "
                f"(batch * pos), got {x.shape[0]}"
            )
        return torch.unflatten(x, 0, (batch, pos))

    def put(self, x: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        return part.flatten(0, 1)


@dataclass(frozen=True)
class _Handles:
    handles: tuple[Handle, ...]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass(frozen=True)
class ViewTap:
    """The tensor of `inner` seen through `steps`; edits are written back through them."""

    inner: Tap
    steps: tuple[Step, ...]

    @functools.cached_property
    def _may_copy(self) -> bool:
        """Whether a step's part may be a copy rather than a view of the whole."""
        return not all(isinstance(step, _VIEWING) for step in self.steps)

    def attach(self, run: Run) -> Handle:
        steps = self.steps
        may_copy = self._may_copy

        def run_view(x: torch.Tensor) -> torch.Tensor:
            chain = [x]
            for step in steps:
                chain.append(step.take(chain[-1]))
            part = chain[-1]
            copied = may_copy and not _shares_storage(part, x)  # flattened non-contiguous
            before = snapshot(part) if copied else None
            new = run(part)
            if new is part and (not copied or not changed_since(part, before)):
                return x  # read, or edited in place through a view of x's storage
            for step, whole in zip(reversed(steps), reversed(chain[:-1]), strict=True):
                new = step.put(whole, new)
            return new

        recorders = [forward_pre_hook(s.source, s.record) for s in steps if isinstance(s, Tokens)]
        try:
            inner = self.inner.attach(run_view)
        except BaseException:
            _Handles(tuple(recorders)).remove()
            raise
        return _Handles((*recorders, inner)) if recorders else inner


# steps whose part is always a view of the whole (narrow, unflatten, select, transpose)
_VIEWING = (Split, Reshape, Select, Transpose, Tokens)


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())


def HeadsView(inner: Tap, d_head: int) -> ViewTap:  # kept as the v1 tap name
    """Show a ``[..., n_heads * d_head]`` activation as ``[..., n_heads, d_head]``."""
    return ViewTap(inner, (Reshape((-1, d_head)),))


def SliceView(inner: Tap, sizes: Sequence[int], index: int) -> ViewTap:
    """One part of a joint activation split on its last dimension (e.g. q of a fused qkv)."""
    return ViewTap(inner, (Split(tuple(sizes), index),))


__all__ = [
    "Flatten",
    "HeadsView",
    "Reshape",
    "Select",
    "SliceView",
    "Split",
    "Step",
    "Tokens",
    "Transpose",
    "ViewTap",
]
