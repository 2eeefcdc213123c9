"""Generation with images: batches, padding, and hooks that know the step and positions."""

from __future__ import annotations

from typing import Any

import pytest

from bridge_core import TransformerBridge
from bridge_llava.tiny import tiny_image

TEXTS = ["USER: <image>\nWhat is this? ASSISTANT:", "<image> Hi"]


@pytest.fixture(scope="module")
def images(image: Any) -> list[Any]:
    return [image, tiny_image(64, "checkerboard", seed=3)]


def test_batched_generation_with_images_equals_one_by_one(
    bridge: TransformerBridge, images: list[Any]
) -> None:
    batched = bridge.generate(TEXTS, images=images, max_new_tokens=8)
    alone = [
        bridge.generate(text, images=[im], max_new_tokens=8)
        for text, im in zip(TEXTS, images, strict=True)
    ]
    assert batched == alone
    tokens = bridge.generate(TEXTS, images=images, max_new_tokens=8, return_type="tokens")
    assert (tokens[:, 0] == bridge.tokenizer.pad_token_id).any()  # left-padded
    # padding_side is honoured with images: right padding is what broke the short prompt
    right = bridge.generate(TEXTS, images=images, max_new_tokens=8, padding_side="right")
    assert right[0] == alone[0] and right[1] != alone[1]
