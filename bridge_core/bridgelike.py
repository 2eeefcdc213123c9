"""`BridgeLike`: what the modules that work on a bridge need of it, as a Protocol.

`TransformerBridge` delegates to modules that take the bridge as an argument (generation,
multimodal, verify, patching, harvest, compat), and calls them from its methods
(``bridge.generate``, ``bridge.verify`` ...). If those modules imported ``bridge.py``, the
imports would run in a circle. They name the bridge by this Protocol instead, which lists the
part of the bridge's public surface they use; `TransformerBridge` satisfies it structurally
(mypy checks that where a bridge is passed). The cache, lower still, needs less
(`bridge_core.cache.CacheOwner`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from bridge_core.cache import ActivationCache, CacheOwner
from bridge_core.hooked_root import HookSpec
from bridge_core.hooks import HookPoint
from bridge_core.naming import NamesFilter
from bridge_core.tokens import TextInput

if TYPE_CHECKING:
    from bridge_core.registry import Registry
    from bridge_core.spec import AdapterSpec


class BridgeLike(CacheOwner, Protocol):
    """A bridge as generation, multimodal, verify, patching, harvest and compat use it."""

    compatibility_mode: bool
    """Whether the bridge runs on a processed copy of the model (`bridge_core.compat`)."""

    @property
    def adapter(self) -> AdapterSpec:
        """The adapter spec in use."""

    @property
    def original_model(self) -> nn.Module:
        """The HF model."""

    @property
    def tokenizer(self) -> Any:
        """The HF tokenizer, or None."""

    @property
    def processor(self) -> Any:
        """The HF processor of a multimodal model, or None."""

    @property
    def device(self) -> torch.device:
        """Where inputs go."""

    @property
    def dtype(self) -> torch.dtype:
        """The model's floating-point dtype."""

    @property
    def hook_dict(self) -> dict[str, HookPoint]:
        """Every hook point by canonical name, in forward order."""

    def prepend_bos_for(self, prepend_bos: bool | None) -> bool:
        """`prepend_bos`, or the config's default for None."""

    def hook_points(self) -> list[HookPoint]:
        """Every hook point, once, in forward order."""

    def assemble(self, model: nn.Module, registry: Registry | None = None) -> None:
        """Bridge `model`: build the adapter's component tree over it (replacing any before)."""

    def hook_names(self) -> list[str]:
        """Canonical hook names, then aliases."""

    def hook_aliases(self) -> dict[str, str]:
        """Alias -> canonical name."""

    def children(self) -> Iterator[nn.Module]:
        """The top-level components (and other child modules), as nn.Module has them."""

    def modules(self) -> Iterator[nn.Module]:
        """Every module of the bridge tree, as nn.Module has them."""

    def prepare_inputs(
        self,
        input: TextInput | torch.Tensor | None,
        images: Any = None,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """HF forward keywords for `input` (text, ids or None) plus `kwargs`."""

    def hooks(
        self, fwd_hooks: Sequence[HookSpec] = (), bwd_hooks: Sequence[HookSpec] = ()
    ) -> AbstractContextManager[Any]:
        """Attach hooks for the duration of a ``with`` block."""

    def run_with_hooks(
        self,
        *args: Any,
        fwd_hooks: Sequence[HookSpec] = (),
        bwd_hooks: Sequence[HookSpec] = (),
        **kwargs: Any,
    ) -> Any:
        """Run forward with temporary hooks."""

    def run_with_cache(
        self,
        *args: Any,
        names_filter: NamesFilter = None,
        device: str | torch.device | None = None,
        remove_batch_dim: bool = False,
        incl_bwd: bool = False,
        metric: Callable[[Any], torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> tuple[Any, ActivationCache]:
        """Run forward and cache the activations `names_filter` selects."""


__all__ = ["BridgeLike"]
