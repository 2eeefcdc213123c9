"""The plugin module behind the ``transformer_bridge`` entry point ``qwen2vl``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from bridge_core.components import GeneralizedComponent
from bridge_core.hookspecs import hookimpl
from bridge_core.spec import AdapterSpec, spec_files
from bridge_qwen2vl.components import KINDS


@hookimpl
def register_components() -> Mapping[str, type[GeneralizedComponent]]:
    """The vision transformer, block and attention kinds, and the patch merger."""
    return KINDS


@hookimpl
def register_adapters() -> Iterable[AdapterSpec]:
    """Qwen2-VL and Qwen2.5-VL, one TOML spec each."""
    return [AdapterSpec.from_file(path) for path in spec_files("bridge_qwen2vl")]
