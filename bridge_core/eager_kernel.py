"""Scores and pattern hooks inside a model's own eager attention kernel.

A model that runs eager attention computes the pattern itself. Computing it a second time
beside the kernel (as `bridge_core.attention` must for sdpa, whose fused kernel never shows
it) would double the attention's cost and give a pattern equal to the kernel's only where the
formulas agree to the last operation (GPT-2's eager softmax runs in the model's dtype, Llama's
in float32; each family's kernel has its own order of scale, mask and cast). Instead, the
kernel runs under a `TorchFunctionMode` that watches its torch calls:

- the input of its softmax is the scores (``[batch, head, q_pos, k_pos]``, mask added): the
  scores hooks run on it, and the softmax takes what they return;
- the softmax's output, after any dtype casts, is the pattern: the pattern hooks run on it
  when the next operation that uses it (dropout, the product with the values; not a read of
  its shape or dtype) takes it, and every later operation takes what they return.

So the hooks see the kernel's own tensors bit for bit, an edit is computed by the kernel
itself, and a gradient through the hooked pattern is the kernel's. A kernel whose softmax does
not take a tensor of the scores' shape (attention sinks concatenated to the scores, or no
softmax at all) is not understood: nothing runs inside it, and `EagerTaps.understood` tells the
caller to compute the pattern beside it instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from bridge_core.errors import BridgeError
from bridge_core.hooks import Run

_SOFTMAX: frozenset[Any] = frozenset(
    {torch.nn.functional.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax}
)
_CASTS: frozenset[Any] = frozenset(
    {
        torch.Tensor.to,
        torch.Tensor.type,
        torch.Tensor.type_as,
        torch.Tensor.float,
        torch.Tensor.half,
        torch.Tensor.bfloat16,
        torch.Tensor.double,
    }
)

# what only reads a tensor's metadata: no use of the pattern (``.dtype``, ``.shape`` are getters)
_READS: frozenset[Any] = frozenset(
    {torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.stride}
)

_WAITING, _SOFTMAXED, _HOOKED, _UNKNOWN = range(4)


class EagerTaps(TorchFunctionMode):
    """Run `scores` and `pattern` (each a hook point's run, or None) inside one eager kernel
    call whose scores have `shape`; see the module docstring."""

    def __init__(self, shape: torch.Size, scores: Run | None, pattern: Run | None) -> None:
        super().__init__()
        self.shape = shape
        self.scores_run = scores
        self.pattern_run = pattern
        self.stage = _WAITING
        self.current: torch.Tensor | None = None  # the pattern as the kernel has it
        self.pattern: torch.Tensor | None = None  # ... and as the hooks returned it

    @property
    def understood(self) -> bool:
        """Whether the kernel's scores and pattern went through the hooks."""
        return self.stage == _HOOKED

    def check(self, module: torch.nn.Module) -> None:
        """After the call: a kernel that took the scores hooks but never used its pattern.

        Raises:
            BridgeError: naming the module, as the pattern hooks could not fire.
        """
        if self.stage == _SOFTMAXED:
            raise BridgeError(
                f"the eager attention kernel of {type(module).__name__} never used the output "
                "of its softmax, so its hook_pattern could not fire"
            )

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        stage = self.stage
        if stage == _WAITING and func in _SOFTMAX:
            return self._softmax(func, args, kwargs)
        if stage == _SOFTMAXED and _takes(self.current, args, kwargs):
            if func in _CASTS:  # still the pattern, in another dtype
                self.current = func(*args, **kwargs)
                return self.current
            if func not in _READS and getattr(func, "__name__", "") != "__get__":
                self._hook_pattern()
                stage = self.stage
        if stage == _HOOKED and self.pattern is not self.current:
            args, kwargs = _replaced(self.current, self.pattern, args, kwargs)
        return func(*args, **kwargs)

    def _softmax(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        scores = args[0] if args else kwargs.get("input")
        if not isinstance(scores, torch.Tensor) or scores.shape != self.shape:
            self.stage = _UNKNOWN  # not the softmax of the scores: leave the kernel alone
            return func(*args, **kwargs)
        if self.scores_run is not None:
            hooked = self.scores_run(scores)
            if hooked is not scores:
                args, kwargs = _replaced(scores, hooked, args, kwargs)
        self.current = func(*args, **kwargs)
        self.stage = _SOFTMAXED
        return self.current

    def _hook_pattern(self) -> None:
        current = self.current
        assert current is not None  # set with _SOFTMAXED
        self.pattern = current if self.pattern_run is None else self.pattern_run(current)
        self.stage = _HOOKED


def _takes(tensor: torch.Tensor | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return any(a is tensor for a in args) or any(v is tensor for v in kwargs.values())


def _replaced(
    old: Any, new: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """`args` and `kwargs` with `old` (by identity) replaced by `new`."""
    return (
        tuple(new if a is old else a for a in args),
        {k: new if v is old else v for k, v in kwargs.items()},
    )
