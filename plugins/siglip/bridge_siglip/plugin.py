"""The plugin module behind the ``transformer_bridge`` entry point ``siglip``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from bridge_core.components import GeneralizedComponent
from bridge_core.hookspecs import hookimpl
from bridge_core.spec import AdapterSpec, spec_files
from bridge_siglip.components import KINDS


@hookimpl
def register_components() -> Mapping[str, type[GeneralizedComponent]]:
    """The SigLIP vision tower kind."""
    return KINDS


@hookimpl
def register_adapters() -> Iterable[AdapterSpec]:
    """PaliGemma (1 and 2), Gemma-3, Idefics3 / SmolVLM and LLaVA-OneVision, a spec each."""
    return [AdapterSpec.from_file(path) for path in spec_files("bridge_siglip")]


@hookimpl
def resolve_adapter(hf_config: Any) -> AdapterSpec | None:
    """PaliGemma 2 (a Gemma-2 language model) gets ``paligemma2``; everything else is left to
    the architecture."""
    text = getattr(hf_config, "text_config", None)
    if getattr(hf_config, "model_type", None) == "paligemma" and (
        getattr(text, "model_type", None) == "gemma2"
    ):
        (path,) = (p for p in spec_files("bridge_siglip") if p.name == "paligemma2.toml")
        return AdapterSpec.from_file(path)
    return None
