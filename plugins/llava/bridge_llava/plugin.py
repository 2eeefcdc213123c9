"""The plugin module behind the ``transformer_bridge`` entry point ``llava``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from bridge_core.components import GeneralizedComponent
from bridge_core.hookspecs import hookimpl
from bridge_core.spec import AdapterSpec, spec_files
from bridge_llava.components import KINDS


@hookimpl
def register_components() -> Mapping[str, type[GeneralizedComponent]]:
    """The CLIP vision tower and layer kinds, and the projector."""
    return KINDS


@hookimpl
def register_adapters() -> Iterable[AdapterSpec]:
    """LLaVA and LLaVA-NeXT, one TOML spec each."""
    return [AdapterSpec.from_file(path) for path in spec_files("bridge_llava")]
