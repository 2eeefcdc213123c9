"""Tiny random Qwen2-VL / Qwen2.5-VL models (built locally) and their bridges, once per session."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bridge_core import TransformerBridge
from bridge_qwen2vl.tiny import tiny_qwen2_5_vl, tiny_qwen2_vl

BUILDERS: dict[str, Callable[[], tuple[Any, Any]]] = {
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
}


def ramp(width: int, height: int) -> Image.Image:
    """Red grows with x, green with y: a pixel's colour says where it is."""
    red, green = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    blue = np.full_like(red, 128)
    return Image.fromarray(np.stack([red, green, blue], -1).round().astype(np.uint8))


@pytest.fixture(scope="session")
def qwen_models() -> dict[str, tuple[Any, Any]]:
    """(model, processor) of each family: 2 vision blocks (4-pixel patches), 2 Qwen2 layers."""
    return {name: build() for name, build in BUILDERS.items()}


@pytest.fixture(scope="session")
def qwen_bridges(qwen_models: dict[str, tuple[Any, Any]]) -> dict[str, TransformerBridge]:
    """The tiny models bridged through the registry (the plugin's entry point)."""
    return {
        name: TransformerBridge.wrap(model, processor=processor)
        for name, (model, processor) in qwen_models.items()
    }


@pytest.fixture(params=sorted(BUILDERS))
def family(request: pytest.FixtureRequest) -> str:
    """Each family in turn."""
    return str(request.param)


@pytest.fixture
def model(qwen_models: dict[str, tuple[Any, Any]], family: str) -> Any:
    return qwen_models[family][0]


@pytest.fixture
def processor(qwen_models: dict[str, tuple[Any, Any]], family: str) -> Any:
    return qwen_models[family][1]


@pytest.fixture
def bridge(qwen_bridges: dict[str, TransformerBridge], family: str) -> Iterator[TransformerBridge]:
    """The family's bridge; every test leaves it without hooks, whatever it raised."""
    bridge = qwen_bridges[family]
    yield bridge
    assert not any(p.has_hooks for p in bridge.hook_dict.values()), "a hook was left behind"


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    """A wide and a square picture: 3x5 and 4x4 merged blocks once resized (15 and 16 tokens)."""
    return [ramp(40, 24), ramp(32, 32)]
