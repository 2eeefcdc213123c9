"""LLaVA-NeXT (any-resolution crops) is carried by the same components."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bridge_core import InputError, TransformerBridge
from bridge_llava.tiny import tiny_image


@pytest.fixture(scope="module")
def next_bridge(llava_next: tuple[Any, Any]) -> TransformerBridge:
    model, processor = llava_next
    return TransformerBridge.wrap(model, processor=processor)


@pytest.fixture(scope="module")
def next_inputs(llava_next: tuple[Any, Any]) -> dict[str, torch.Tensor]:
    _, processor = llava_next
    images = [tiny_image(48), tiny_image(64, "checkerboard")]
    texts = ["<image> What?", "Two: <image> and this"]
    return dict(processor(text=texts, images=images, padding=True, return_tensors="pt"))


def test_llava_next_exact_and_hooked(
    next_bridge: TransformerBridge, llava_next: tuple[Any, Any], next_inputs: dict[str, Any]
) -> None:
    model, _ = llava_next
    assert next_bridge.adapter.name == "llava_next"
    with torch.no_grad():
        expected = model(**next_inputs).logits
        logits, cache = next_bridge.run_with_cache(**next_inputs)
    assert torch.equal(next_bridge(**next_inputs), expected)
    assert torch.equal(logits, expected)
    crops = next_inputs["pixel_values"].shape[1]  # padded to the most crops in the batch
    assert cache["vision_encoder.layers.0.hook_resid_pre"].shape[1:] == (17, 32)
    assert cache["vision_projector.hook_in"].shape[1:] == (16, 32)  # every crop, CLS dropped
    assert cache["vision_projector.hook_out"].shape[0] <= 2 * crops
    assert not any(p.has_hooks() for p in next_bridge.hook_dict.values())


def test_llava_next_image_positions_are_runs_of_image_tokens(
    next_bridge: TransformerBridge, next_inputs: dict[str, Any]
) -> None:
    spans = next_bridge.vision_encoder.image_token_positions(next_inputs["input_ids"])
    assert [(s.image, s.batch) for s in spans] == [(0, 0), (1, 1)]
    image_token = next_bridge.vision_encoder.image_token_id
    assert sum(len(s) for s in spans) == int((next_inputs["input_ids"] == image_token).sum())
    assert next_bridge.vision_encoder.num_image_tokens is None  # depends on each image's size


def test_llava_next_bad_pixels(next_bridge: TransformerBridge, next_inputs: dict[str, Any]) -> None:
    pixels = next_inputs["pixel_values"][:, :, :2]
    with pytest.raises(InputError, match="3 channels"):
        next_bridge(**{**next_inputs, "pixel_values": pixels})
