"""Weights in TransformerLens's shapes, as views of the HF model's parameters.

A component knows which HF modules are its projections (its spec options: ``q``/``k``/``v``
/``o``, a fused ``qkv`` with its layout, the MLP's ``in``/``gate``/``up``/``out``); a
`Projection` names one of them, or one part of a fused one, and shows its weight as
``[d_in, d_out]`` (``nn.Linear`` stores ``[out, in]``, transformers' ``Conv1D`` ``[in, out]``)
and per head. These are views: editing them (under ``torch.no_grad()``, as for any
parameter) edits the model.

What cannot be a view is a `LinkedWeight`: a tensor computed from the parameters that writes
an in-place edit back to them. That is the bridge-level ``[n_layers, ...]`` stacks, the key
and value weights of grouped-query attention repeated to every query head (an edit must keep
the heads of a group equal), and the zero bias of a projection that has none (an edit must
leave it zero). An edit that cannot be written back is an error, never a silently lost one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from bridge_core.errors import BridgeError

WriteBack = Callable[[torch.Tensor], None]
_IN_PLACE_DUNDERS = frozenset(
    f"__i{op}__" for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or")
)
_NOT_DATA = frozenset(("requires_grad_", "retain_grad", "share_memory_", "detach_"))


class LinkedWeight(torch.Tensor):
    """A tensor computed from parameters; in-place edits of it (or of views of it) are
    written back to them through its `write_back` function."""

    _write_back: WriteBack | None
    _root: LinkedWeight | None

    @staticmethod
    def of(value: torch.Tensor, write_back: WriteBack) -> LinkedWeight:
        """`value` as a linked weight whose edits `write_back` stores."""
        linked = value.as_subclass(LinkedWeight)
        linked._write_back, linked._root = write_back, None
        return linked

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        with _plain():
            result = func(*args, **kwargs)
        first = args[0] if args else None
        if not isinstance(first, LinkedWeight):
            return result
        parent = getattr(first, "_root", None)
        root: LinkedWeight = parent if isinstance(parent, LinkedWeight) else first
        name = getattr(func, "__name__", "")
        in_place = name in _IN_PLACE_DUNDERS or name == "__setitem__" or name == "copy_"
        if in_place or (name.endswith("_") and not name.endswith("__") and name not in _NOT_DATA):
            root.sync()
        if (
            isinstance(result, torch.Tensor)
            and not isinstance(result, LinkedWeight)
            and result._base is not None
            and _same_storage(result, root)
        ):
            view = result.as_subclass(LinkedWeight)
            view._write_back, view._root = None, root
            return view
        return result

    def sync(self) -> None:
        """Write this weight's values back to the parameters it was computed from."""
        if getattr(self, "_write_back", None) is not None:
            with torch.no_grad(), _plain():
                assert self._write_back is not None
                self._write_back(self.detach())


def _plain() -> AbstractContextManager[None]:
    """A block in which torch functions treat linked weights as plain tensors."""
    disable: Callable[[], AbstractContextManager[None]] = torch._C.DisableTorchFunctionSubclass
    return disable()  # typed here: torch before 2.13 leaves the class untyped


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    with _plain():
        return bool(a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())


def assign(target: torch.Tensor, value: torch.Tensor) -> None:
    """Store `value` into `target`: a view of parameters, or a `LinkedWeight`."""
    with torch.no_grad():
        if isinstance(target, LinkedWeight):
            if target._write_back is None:
                raise BridgeError("cannot assign to a view of a linked weight")
            target._write_back(value)
        else:
            target.copy_(value)


def stacked(parts: Sequence[torch.Tensor]) -> LinkedWeight:
    """Per-layer weights stacked to ``[n_layers, ...]``; edits go back to each layer."""

    def write_back(value: torch.Tensor) -> None:
        for part, layer in zip(parts, value.unbind(0), strict=True):
            assign(part, layer)

    with _plain():
        value = torch.stack([p.as_subclass(torch.Tensor) for p in parts])
    return LinkedWeight.of(value, write_back)


def zeros_bias(shape: tuple[int, ...], like: torch.Tensor, what: str) -> LinkedWeight:
    """The zero bias of a projection without one (TransformerLens shows zeros); an edit that
    makes it nonzero is refused."""

    def write_back(value: torch.Tensor) -> None:
        if bool(value.ne(0).any()):
            raise BridgeError(
                f"{what} has no bias in this model (HF's module has bias=None), so a nonzero "
                "value cannot be stored; its zeros are shown for TransformerLens's shapes"
            )

    return LinkedWeight.of(torch.zeros(shape, dtype=like.dtype, device=like.device), write_back)


def repeated_heads(heads: torch.Tensor, repeats: int, what: str) -> torch.Tensor:
    """Grouped key/value heads ``[n_kv, ...]`` repeated to every query head ``[n_heads, ...]``
    (TransformerLens's ``W_K`` / ``W_V`` under grouped-query attention)."""
    if repeats == 1:
        return heads

    def write_back(value: torch.Tensor) -> None:
        groups = torch.unflatten(value, 0, (-1, repeats))
        if not bool((groups == groups[:, :1]).all()):
            raise BridgeError(
                f"{what}: the {repeats} query heads that share a key/value head must stay "
                f"equal (grouped-query attention); edit _{what.rpartition('.')[2]} "
                "([n_key_value_heads, ...]) instead"
            )
        assign(heads, groups[:, 0])

    return LinkedWeight.of(heads.repeat_interleave(repeats, dim=0), write_back)


def in_out(module: nn.Module) -> torch.Tensor:
    """A projection's weight as ``[d_in, d_out]`` (a view)."""
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear) and isinstance(weight, torch.Tensor):
        return weight.t()
    if isinstance(weight, torch.Tensor) and getattr(module, "nf", None) == weight.shape[-1]:
        return weight  # transformers' Conv1D stores [in, out]
    raise BridgeError(
        f"weights are shown for nn.Linear and transformers' Conv1D projections; "
        f"{type(module).__name__} is neither"
    )


@dataclass(frozen=True)
class Projection:
    """One projection: a module, or part of a fused one.

    `part` is (offset, width) of the output for a fused ``[q | k | v]``; `blocks` is
    (n_blocks, offset, width) for one laid out in equal blocks, each holding this projection's
    ``width`` outputs at ``offset``: ``[q_h | k_h | v_h]`` head by head (GPT-NeoX), or
    ``[q_g | k_g | v_g]`` per key/value group (Falcon).
    """

    module: nn.Module
    part: tuple[int, int] | None = None
    blocks: tuple[int, int, int] | None = None

    def weight(self) -> torch.Tensor:
        """``[d_in, d_out]`` (in blocks: ``[d_in, n_blocks, width]``)."""
        return self._take(in_out(self.module))

    def bias(self) -> torch.Tensor | None:
        """``[d_out]`` (in blocks: ``[n_blocks, width]``), or None without a bias."""
        bias = getattr(self.module, "bias", None)
        return self._take(bias) if isinstance(bias, torch.Tensor) else None

    def _take(self, x: torch.Tensor) -> torch.Tensor:
        if self.part is not None:
            return x.narrow(-1, self.part[0], self.part[1])
        if self.blocks is not None:
            n_blocks, offset, width = self.blocks
            return torch.unflatten(x, -1, (n_blocks, -1)).narrow(-1, offset, width)
        return x

    def heads(self, d_head: int) -> torch.Tensor:
        """The weight per head, ``[n_heads, d_in, d_head]``."""
        weight = self.weight()
        if self.blocks is None:
            return torch.unflatten(weight, -1, (-1, d_head)).permute(1, 0, 2)
        per_block = torch.unflatten(weight, -1, (-1, d_head)).permute(1, 2, 0, 3)
        return merged(per_block, 2)

    def head_bias(self, d_head: int) -> torch.Tensor | None:
        """The bias per head, ``[n_heads, d_head]``, or None."""
        bias = self.bias()
        if bias is None:
            return None
        heads = torch.unflatten(bias, -1, (-1, d_head))
        return heads if self.blocks is None else merged(heads, 2)


def merged(view: torch.Tensor, dims: int) -> torch.Tensor:
    """`view` with its first `dims` dimensions merged: a view where the strides allow it, else
    a `LinkedWeight` that writes edits back into `view` (heads spread over key/value groups)."""
    shape = (-1, *view.shape[dims:])
    out = view.reshape(shape)
    if _same_storage(out, view):
        return out

    def write_back(value: torch.Tensor) -> None:
        assign(view, value.reshape(view.shape))

    return LinkedWeight.of(out, write_back)


class AttentionWeights(nn.Module):
    """``W_Q``, ``W_K``, ``W_V``, ``W_O``, their biases, ``QK`` and ``OV`` of one attention
    component, in TransformerLens's shapes; a kind supplies `projection`."""

    name: str
    original_component: nn.Module | None
    head_names: ClassVar[tuple[str, str, str]] = ("q", "k", "v")

    def projection(self, which: str) -> Projection:
        """The projection ``"q"``, ``"k"``, ``"v"`` or ``"o"``."""
        raise NotImplementedError

    def head_size(self) -> int:
        """The head size."""
        raise NotImplementedError

    def _heads(self, which: str) -> torch.Tensor:
        return self.projection(which).heads(self.head_size())

    def _bias(self, which: str, n_heads: int) -> torch.Tensor:
        bias = self.projection(which).head_bias(self.head_size())
        if bias is not None:
            return bias
        like = self.projection(which).weight()
        return zeros_bias((n_heads, self.head_size()), like, f"{self.name}.b_{which.upper()}")

    @property
    def n_heads(self) -> int:
        """Query heads."""
        return int(self._heads("q").shape[0])

    @property
    def W_Q(self) -> torch.Tensor:
        """``[n_heads, d_model, d_head]``."""
        return self._heads("q")

    @property
    def _W_K(self) -> torch.Tensor:
        """``[n_key_value_heads, d_model, d_head]``: the model's own key heads."""
        return self._heads("k")

    @property
    def _W_V(self) -> torch.Tensor:
        """``[n_key_value_heads, d_model, d_head]``."""
        return self._heads("v")

    @property
    def W_K(self) -> torch.Tensor:
        """``[n_heads, d_model, d_head]`` (key heads repeated under grouped-query attention)."""
        kv = self._W_K
        return repeated_heads(kv, self.n_heads // kv.shape[0], f"{self.name}.W_K")

    @property
    def W_V(self) -> torch.Tensor:
        """``[n_heads, d_model, d_head]``."""
        kv = self._W_V
        return repeated_heads(kv, self.n_heads // kv.shape[0], f"{self.name}.W_V")

    @property
    def W_O(self) -> torch.Tensor:
        """``[n_heads, d_head, d_model]``."""
        return torch.unflatten(in_out(self.projection("o").module), 0, (-1, self.head_size()))

    @property
    def b_Q(self) -> torch.Tensor:
        """``[n_heads, d_head]`` (zeros, linked, for a projection without bias)."""
        return self._bias("q", self.n_heads)

    @property
    def _b_K(self) -> torch.Tensor:
        """``[n_key_value_heads, d_head]``."""
        return self._bias("k", self._W_K.shape[0])

    @property
    def _b_V(self) -> torch.Tensor:
        """``[n_key_value_heads, d_head]``."""
        return self._bias("v", self._W_V.shape[0])

    @property
    def b_K(self) -> torch.Tensor:
        """``[n_heads, d_head]``."""
        kv = self._b_K
        return repeated_heads(kv, self.n_heads // kv.shape[0], f"{self.name}.b_K")

    @property
    def b_V(self) -> torch.Tensor:
        """``[n_heads, d_head]``."""
        kv = self._b_V
        return repeated_heads(kv, self.n_heads // kv.shape[0], f"{self.name}.b_V")

    @property
    def b_O(self) -> torch.Tensor:
        """``[d_model]``."""
        o = self.projection("o")
        bias = o.bias()
        if bias is not None:
            return bias
        like = in_out(o.module)
        return zeros_bias((like.shape[-1],), like, f"{self.name}.b_O")

    @property
    def QK(self) -> Any:
        """`FactoredMatrix` ``W_Q @ W_K^T``, ``[n_heads, d_model, d_model]``."""
        from bridge_core.factored import FactoredMatrix

        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> Any:
        """`FactoredMatrix` ``W_V @ W_O``, ``[n_heads, d_model, d_model]``."""
        from bridge_core.factored import FactoredMatrix

        return FactoredMatrix(self.W_V, self.W_O)


class MLPWeights(nn.Module):
    """``W_in``, ``W_gate``, ``W_out``, ``b_in``, ``b_out`` of one MLP component; a kind
    supplies `projection` (``"in"`` is the up projection of a gated MLP)."""

    name: str

    def projection(self, which: str) -> Projection | None:
        """The projection ``"in"``, ``"gate"`` or ``"out"`` (None: this MLP has none)."""
        raise NotImplementedError

    def _needed(self, which: str) -> Projection:
        projection = self.projection(which)
        if projection is None:
            raise BridgeError(f"{self.name} has no {which} projection (it is not gated)")
        return projection

    def _bias_of(self, which: str) -> torch.Tensor:
        projection = self._needed(which)
        bias = projection.bias()
        if bias is not None:
            return bias
        like = projection.weight()
        return zeros_bias((like.shape[-1],), like, f"{self.name}.b_{which}")

    @property
    def W_in(self) -> torch.Tensor:
        """``[d_model, d_mlp]`` (the up projection of a gated MLP)."""
        return self._needed("in").weight()

    @property
    def W_gate(self) -> torch.Tensor | None:
        """``[d_model, d_mlp]``, or None for an MLP without gate (as TransformerLens)."""
        gate = self.projection("gate")
        return gate.weight() if gate is not None else None

    @property
    def W_out(self) -> torch.Tensor:
        """``[d_mlp, d_model]``."""
        return self._needed("out").weight()

    @property
    def b_in(self) -> torch.Tensor:
        """``[d_mlp]``."""
        return self._bias_of("in")

    @property
    def b_out(self) -> torch.Tensor:
        """``[d_model]``."""
        return self._bias_of("out")
