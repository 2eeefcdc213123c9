"""The built-in component kinds, registered through the same hook as any plugin's."""

from __future__ import annotations

from collections.abc import Mapping

from bridge_core.components.base import GeneralizedComponent
from bridge_core.components.standard import BUILTIN_KINDS
from bridge_core.hookspecs import hookimpl


@hookimpl
def register_components() -> Mapping[str, type[GeneralizedComponent]]:
    """The generic kinds: module, embedding, normalization, block, attention, mlp, ..."""
    return BUILTIN_KINDS
