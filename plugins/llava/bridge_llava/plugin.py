"""The plugin module behind the ``transformer_bridge`` entry point ``llava``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from importlib.resources import files
from pathlib import Path

from bridge_core.components import GeneralizedComponent
from bridge_core.hookspecs import hookimpl
from bridge_core.spec import AdapterSpec
from bridge_llava.components import KINDS


def spec_paths() -> list[Path]:
    """The adapter specs shipped with this package (``specs/*.toml``)."""
    specs = files("bridge_llava").joinpath("specs")
    return sorted(Path(str(p)) for p in specs.iterdir() if str(p).endswith(".toml"))


@hookimpl
def register_components() -> Mapping[str, type[GeneralizedComponent]]:
    """The CLIP vision tower and layer kinds, and the projector."""
    return KINDS


@hookimpl
def register_adapters() -> Iterable[AdapterSpec]:
    """LLaVA and LLaVA-NeXT, one TOML spec each."""
    return [AdapterSpec.from_file(path) for path in spec_paths()]
