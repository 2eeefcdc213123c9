"""Tiny random LLaVA / LLaVA-NeXT models (built locally) and their bridges, once per session."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from PIL import Image

from bridge_core import TransformerBridge
from bridge_llava.tiny import tiny_image, tiny_llava, tiny_llava_next

PROMPT = "USER: <image>\nWhat is this? ASSISTANT:"


@pytest.fixture(scope="session")
def llava() -> tuple[Any, Any]:
    """(LlavaForConditionalGeneration, LlavaProcessor): CLIP 2 layers, Llama 2 layers."""
    return tiny_llava()


@pytest.fixture(scope="session")
def bridge(llava: tuple[Any, Any]) -> TransformerBridge:
    """The tiny LLaVA bridged through the registry (the plugin's entry point)."""
    model, processor = llava
    return TransformerBridge.wrap(model, processor=processor)


@pytest.fixture(scope="session")
def image() -> Image.Image:
    return tiny_image(64)


@pytest.fixture(scope="session")
def prompt() -> str:
    """A llava-1.5-style prompt with one image placeholder."""
    return PROMPT


@pytest.fixture(scope="session")
def inputs(llava: tuple[Any, Any], image: Image.Image) -> dict[str, torch.Tensor]:
    """Processor output for one prompt with one image: input_ids, attention_mask, pixel_values."""
    _, processor = llava
    return dict(processor(text=PROMPT, images=[image], return_tensors="pt"))


@pytest.fixture(scope="session")
def hf_out(llava: tuple[Any, Any], inputs: dict[str, torch.Tensor]) -> Any:
    """The plain HF forward on `inputs`, with every hidden state."""
    model, _ = llava
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True)


@pytest.fixture(scope="session")
def hf_vision(llava: tuple[Any, Any], inputs: dict[str, torch.Tensor]) -> Any:
    """The plain HF vision tower on `inputs`' pixels, with every hidden state."""
    model, _ = llava
    with torch.no_grad():
        return model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)


@pytest.fixture(autouse=True)
def no_hook_left_behind(bridge: TransformerBridge) -> Iterator[None]:
    """Every test leaves the session bridge without hooks, whatever it raised."""
    yield
    assert not any(p.has_hooks() for p in bridge.hook_dict.values()), "a hook was left behind"


@pytest.fixture(scope="session")
def llava_next() -> tuple[Any, Any]:
    """(LlavaNextForConditionalGeneration, LlavaNextProcessor)."""
    return tiny_llava_next()
