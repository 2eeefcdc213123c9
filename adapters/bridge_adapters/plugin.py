"""Registers the built-in specs (and the kinds they need) through the same hooks as any plugin."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from bridge_adapters.falcon import FalconAttentionBridge
from bridge_core.components.base import GeneralizedComponent
from bridge_core.hookspecs import hookimpl
from bridge_core.spec import AdapterSpec, spec_files


@hookimpl
def register_adapters() -> Iterable[AdapterSpec]:
    """Every ``specs/*.toml`` of this package: adding an architecture is adding a file."""
    return [AdapterSpec.from_file(path) for path in spec_files("bridge_adapters")]


@hookimpl
def register_components() -> Mapping[str, type[GeneralizedComponent]]:
    """Kinds for kernels the spec language cannot express (Falcon computes attention inline)."""
    return {"falcon_attention": FalconAttentionBridge}
