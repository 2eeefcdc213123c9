"""Tiny random SigLIP-family models (built locally) and their bridges, once per session.

`FAMILIES` gives each adapter its builder and an input in the family's own prompt format:
a batch of two rows, the second with two images, so that placement across rows and images is
exercised everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from PIL import Image

from bridge_core import TransformerBridge
from bridge_llava.tiny import tiny_image
from bridge_siglip import tiny


@dataclass(frozen=True)
class Case:
    """A family: how to build it, and a batch in its prompt format."""

    build: Callable[[], tuple[Any, Any]]
    texts: list[str]
    images: list[list[Image.Image]] = field(
        default_factory=lambda: [
            [tiny_image(64)],
            [tiny_image(48, "checkerboard"), tiny_image(60).resize((60, 36))],
        ]
    )


FAMILIES: dict[str, Case] = {
    "paligemma": Case(tiny.tiny_paligemma, ["<image>caption en", "<image><image>what differs?"]),
    "paligemma2": Case(
        lambda: tiny.tiny_paligemma(text="gemma2"), ["<image>caption en", "<image><image>hi"]
    ),
    "gemma3": Case(
        tiny.tiny_gemma3,
        [
            "<start_of_turn>user\n<start_of_image>What is this?<end_of_turn>\n",
            "<start_of_image> and <start_of_image>: which is brighter?",
        ],
    ),
    "idefics3": Case(
        tiny.tiny_idefics3,
        ["User:<image> What is this?<end_of_utterance>\nAssistant:", "<image> and <image>?"],
    ),
    "llava_onevision": Case(
        tiny.tiny_llava_onevision, ["<image> What is this?", "Compare <image> with <image>."]
    ),
}


@pytest.fixture(scope="session")
def built() -> dict[str, tuple[Any, Any]]:
    """Every family's (model, processor), built on first use."""
    return {}


@pytest.fixture(params=sorted(FAMILIES))
def name(request: pytest.FixtureRequest) -> str:
    """Each family's adapter name in turn."""
    return str(request.param)


@pytest.fixture
def case(name: str) -> Case:
    return FAMILIES[name]


@pytest.fixture
def model_and_processor(built: dict[str, tuple[Any, Any]], name: str) -> tuple[Any, Any]:
    if name not in built:
        built[name] = FAMILIES[name].build()
    return built[name]


@pytest.fixture
def bridge(model_and_processor: tuple[Any, Any]) -> Iterator[TransformerBridge]:
    """The family's bridge, through the registry; checks no hook is left behind."""
    model, processor = model_and_processor
    bridge = TransformerBridge.wrap(model, processor=processor)
    yield bridge
    assert not any(p.has_hooks() for p in bridge.hook_dict.values()), "a hook was left behind"


@pytest.fixture
def inputs(model_and_processor: tuple[Any, Any], case: Case) -> dict[str, torch.Tensor]:
    """The processor's output for the family's batch (left-padded)."""
    _, processor = model_and_processor
    encoded = processor(
        text=case.texts, images=case.images, return_tensors="pt", padding=True, padding_side="left"
    )
    encoded = dict(encoded)
    encoded.pop("labels", None)  # PaliGemma's processor adds them for training
    return encoded
