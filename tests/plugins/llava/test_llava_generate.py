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


def test_hooks_know_the_step_and_the_positions(
    bridge: TransformerBridge, images: list[Any]
) -> None:
    seen: list[tuple[int, list[int], int]] = []

    def record(resid: Any, hook: Any) -> None:
        seen.append((hook.ctx["step"], hook.ctx["positions"].tolist(), resid.shape[1]))

    tokens = bridge.generate(
        TEXTS,
        images=images,
        max_new_tokens=3,
        return_type="tokens",
        fwd_hooks=[("blocks.0.hook_resid_pre", record)],
    )
    prompt = tokens.shape[1] - 3
    assert seen == [
        (0, list(range(prompt)), prompt),
        (1, [prompt], 1),
        (2, [prompt + 1], 1),
    ]
    assert all("step" not in p.ctx for p in bridge.hook_dict.values())


def test_steering_only_new_tokens_leaves_the_prompt_pass_alone(
    bridge: TransformerBridge, images: list[Any]
) -> None:
    def steer_new(resid: Any, hook: Any) -> Any:
        return resid + 3.0 if hook.ctx["step"] > 0 else None

    plain = bridge.generate(TEXTS[0], images=images[:1], max_new_tokens=4, return_type="tokens")
    steered = bridge.generate(
        TEXTS[0],
        images=images[:1],
        max_new_tokens=4,
        return_type="tokens",
        fwd_hooks=[("blocks.1.hook_resid_pre", steer_new)],
    )
    prompt = plain.shape[1] - 4
    assert plain[0, prompt] == steered[0, prompt]  # the first new token comes from the prompt pass
    assert not (plain == steered).all()
