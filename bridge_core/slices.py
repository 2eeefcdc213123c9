"""TransformerLens's slice inputs (``pos_slice``, ``batch_slice``, ``neuron_slice``).

A slice input is None (everything), an int (that index; the dimension goes, as in
TransformerLens), a tuple ``(stop,)``, ``(start, stop)`` or ``(start, stop, step)``, a Python
`slice`, or a list / tensor / array of indices.
"""

from __future__ import annotations

from typing import Any

import torch

from bridge_core.errors import InputError

SliceInput = None | int | tuple[int, ...] | slice | list[int] | torch.Tensor | Any
ACCEPTED = (
    "None, an int, a tuple (stop,) / (start, stop) / (start, stop, step), a slice, "
    "or a list or tensor of indices"
)


def to_index(value: SliceInput) -> Any:
    """The index that `value` stands for along one dimension.

    Raises:
        InputError: a value of another kind.
    """
    if value is None:
        return slice(None)
    if isinstance(value, bool):
        raise InputError(f"a slice input must be {ACCEPTED} (got a bool)")
    if isinstance(value, int | slice):
        return value
    if isinstance(value, tuple):
        if not 1 <= len(value) <= 3 or not all(isinstance(v, int | None) for v in value):
            raise InputError(f"a tuple slice input has 1 to 3 ints (got {value!r})")
        return slice(*value)
    if isinstance(value, list):
        return torch.tensor(value, dtype=torch.long)
    if isinstance(value, torch.Tensor):
        return value if value.dtype == torch.bool else value.long()
    if hasattr(value, "__array__"):  # numpy
        return torch.as_tensor(value).long()
    raise InputError(f"a slice input must be {ACCEPTED} (got {type(value).__name__})")


def apply(tensor: torch.Tensor, value: SliceInput, dim: int) -> torch.Tensor:
    """`tensor` indexed by `value` along `dim` (an int index drops the dimension)."""
    if value is None:
        return tensor
    index = to_index(value)
    if isinstance(index, torch.Tensor):
        index = index.to(tensor.device)
    dim = dim % tensor.dim()
    return tensor[(slice(None),) * dim + (index,)]


def keeps_dim(value: SliceInput) -> bool:
    """Whether slicing with `value` keeps the dimension (everything but an int)."""
    return not isinstance(value, int) or isinstance(value, bool)
