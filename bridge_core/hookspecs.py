"""The plugin hooks of transformer-bridge (pluggy project ``transformer_bridge``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from bridge_core.components.base import GeneralizedComponent
    from bridge_core.spec import AdapterSpec

PROJECT = "transformer_bridge"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_adapters() -> Iterable[AdapterSpec]:  # type: ignore[empty-body]  # a declaration
    """Return the adapter specs this plugin contributes."""


@hookspec
def register_components() -> Mapping[str, type[GeneralizedComponent]]:  # type: ignore[empty-body]  # a declaration
    """Return the component kinds this plugin contributes, by kind name."""


@hookspec(firstresult=True)
def resolve_adapter(hf_config: Any) -> AdapterSpec | None:
    """Return the adapter for `hf_config` when architecture routing is not enough, else None."""
