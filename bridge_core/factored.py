"""FactoredMatrix: a low-rank matrix ``A @ B`` kept as its two factors (TransformerLens's
``QK`` and ``OV`` circuits are ones: ``W_Q @ W_K^T`` and ``W_V @ W_O`` per head).

Leading dimensions (layers, heads) broadcast; indexing applies to them, then to the rows and
columns. The SVD is computed from the factors (never from the full product): with
``A = Ua Sa Va^T`` and ``B = Ub Sb Vb^T``, the small ``Sa Va^T Ub Sb`` is decomposed, so
``AB = U diag(S) V^T`` costs about ``mdim``-sized decompositions.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch

from bridge_core.errors import InputError


class FactoredMatrix:
    """The matrix ``A @ B`` (``[..., ldim, mdim] @ [..., mdim, rdim]``) without forming it."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:
        if A.dim() < 2 or B.dim() < 2 or A.shape[-1] != B.shape[-2]:
            raise InputError(
                f"FactoredMatrix needs A [..., ldim, mdim] and B [..., mdim, rdim] "
                f"(got {tuple(A.shape)} and {tuple(B.shape)})"
            )
        lead = _broadcast(A.shape[:-2], B.shape[:-2])
        self.ldim, self.mdim, self.rdim = A.shape[-2], A.shape[-1], B.shape[-1]
        self.A = A.broadcast_to((*lead, self.ldim, self.mdim))
        self.B = B.broadcast_to((*lead, self.mdim, self.rdim))
        self.shape = torch.Size((*lead, self.ldim, self.rdim))

    @property
    def ndim(self) -> int:
        """Number of dimensions, leading ones included."""
        return len(self.shape)

    def size(self, dim: int) -> int:
        """The size of dimension `dim`."""
        return int(self.shape[dim])

    @property
    def AB(self) -> torch.Tensor:
        """The full matrix ``A @ B``."""
        return self.A @ self.B

    @property
    def BA(self) -> torch.Tensor:
        """``B @ A`` (``[..., mdim, mdim]``; needs ``ldim == rdim``)."""
        if self.ldim != self.rdim:
            raise InputError(f"BA needs a square matrix (ldim {self.ldim}, rdim {self.rdim})")
        return self.B @ self.A

    @property
    def T(self) -> FactoredMatrix:
        """The transpose ``B^T A^T``."""
        return FactoredMatrix(self.B.transpose(-2, -1), self.A.transpose(-2, -1))

    @property
    def pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B)."""
        return self.A, self.B

    @cached_property
    def _svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        Ua, Sa, Vha = torch.linalg.svd(self.A, full_matrices=False)
        Ub, Sb, Vhb = torch.linalg.svd(self.B, full_matrices=False)
        middle = Sa[..., :, None] * Vha @ Ub * Sb[..., None, :]
        Um, Sm, Vhm = torch.linalg.svd(middle, full_matrices=False)
        return Ua @ Um, Sm, Vhb.transpose(-2, -1) @ Vhm.transpose(-2, -1)

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U, S, V)`` with ``AB == U @ diag(S) @ V^T`` (V, not V^T, as TransformerLens)."""
        return self._svd

    @property
    def U(self) -> torch.Tensor:
        """Left singular vectors ``[..., ldim, mdim]``."""
        return self._svd[0]

    @property
    def S(self) -> torch.Tensor:
        """Singular values ``[..., mdim]``."""
        return self._svd[1]

    @property
    def V(self) -> torch.Tensor:
        """Right singular vectors ``[..., rdim, mdim]``."""
        return self._svd[2]

    @property
    def Vh(self) -> torch.Tensor:
        """TransformerLens's (mis)name for `V`: the right singular vectors, not transposed."""
        return self._svd[2]

    @property
    def eigenvalues(self) -> torch.Tensor:
        """Eigenvalues of ``AB`` (those of ``BA``: the same, less trailing zeros)."""
        square = self.BA
        if square.dtype in (torch.float16, torch.bfloat16):
            square = square.float()
        values: torch.Tensor = torch.linalg.eigvals(square)
        return values

    def norm(self) -> torch.Tensor:
        """Frobenius norm, over the last two dimensions."""
        return self.S.pow(2).sum(-1).sqrt()

    def collapse_l(self) -> torch.Tensor:
        """``diag(S) V^T``: the matrix without its left orthogonal factor."""
        return self.S[..., :, None] * self.V.transpose(-2, -1)

    def collapse_r(self) -> torch.Tensor:
        """``U diag(S)``: the matrix without its right orthogonal factor."""
        return self.U * self.S[..., None, :]

    def make_even(self) -> FactoredMatrix:
        """The same matrix as ``(U sqrt(S), sqrt(S) V^T)``: each factor has half the singular
        values and orthogonal rows or columns."""
        root = self.S.sqrt()
        return FactoredMatrix(self.U * root[..., None, :], root[..., :, None] * self.V.mT)

    def get_corner(self, k: int = 3) -> torch.Tensor:
        """The top-left ``k x k`` corner of the matrix (of each leading index)."""
        return self.A[..., :k, :] @ self.B[..., :, :k]

    def unsqueeze(self, dim: int) -> FactoredMatrix:
        """A new leading dimension at `dim` (counted among the leading dimensions)."""
        return FactoredMatrix(self.A.unsqueeze(dim), self.B.unsqueeze(dim))

    def __getitem__(self, index: Any) -> FactoredMatrix:
        """Index the leading dimensions, then rows, then columns (an int keeps its dim)."""
        index = index if isinstance(index, tuple) else (index,)
        n_lead = self.ndim - 2
        if len(index) > self.ndim:
            raise InputError(f"index {index} is too long for a FactoredMatrix of {self.shape}")
        lead, rest = index[:n_lead], [_keep(i) for i in index[n_lead:]]
        rows = rest[0] if rest else slice(None)
        cols = rest[1] if len(rest) > 1 else slice(None)
        return FactoredMatrix(
            self.A[(*lead, rows, slice(None))], self.B[(*lead, slice(None), cols)]
        )

    def __matmul__(self, other: torch.Tensor | FactoredMatrix) -> FactoredMatrix | torch.Tensor:
        if isinstance(other, FactoredMatrix):
            return FactoredMatrix(self.A, (self.B @ other.A) @ other.B)
        if other.dim() == 1:
            return self.A @ (self.B @ other)
        return FactoredMatrix(self.A, self.B @ other)

    def __rmatmul__(self, other: torch.Tensor) -> FactoredMatrix | torch.Tensor:
        if other.dim() == 1:
            return (other @ self.A) @ self.B
        return FactoredMatrix(other @ self.A, self.B)

    def __mul__(self, scalar: float | torch.Tensor) -> FactoredMatrix:
        if isinstance(scalar, torch.Tensor) and scalar.dim() > 0:
            scalar = scalar[..., None, None]
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return f"FactoredMatrix(shape={tuple(self.shape)}, mdim={self.mdim})"


def _broadcast(a: torch.Size, b: torch.Size) -> torch.Size:
    """The broadcast of two leading shapes."""
    try:
        shape: torch.Size = torch.broadcast_shapes(a, b)  # type: ignore[no-untyped-call]  # untyped in torch
    except RuntimeError as exc:
        raise InputError(f"leading dimensions {tuple(a)} and {tuple(b)} do not broadcast") from exc
    return shape


def _keep(index: Any) -> Any:
    """An int index as a length-one slice (rows and columns keep their dimension)."""
    if isinstance(index, int) and not isinstance(index, bool):
        return slice(index, index + 1 if index != -1 else None)
    return index
