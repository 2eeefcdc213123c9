"""Inputs as HF takes them, text with images through the processor, generation, bad input."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bridge_core import InputError, TransformerBridge


def test_text_with_images_goes_through_the_processor(
    bridge: TransformerBridge, image: Any, hf_out: Any, prompt: str
) -> None:
    with torch.no_grad():
        assert torch.equal(bridge(prompt, images=[image]), hf_out.logits)
        logits, cache = bridge.run_with_cache(prompt, images=[image])
    assert torch.equal(logits, hf_out.logits)
    assert cache["vision_encoder.layers.0.hook_resid_pre"].shape == (1, 17, 32)
    assert cache["blocks.1.hook_resid_post"].shape == (1, hf_out.logits.shape[1], 64)


def test_hf_keywords_pass_through(
    bridge: TransformerBridge, inputs: dict[str, torch.Tensor], hf_out: Any
) -> None:
    with torch.no_grad():
        logits = bridge(
            input_ids=inputs["input_ids"],
            pixel_values=inputs["pixel_values"],
            attention_mask=inputs["attention_mask"],
        )
        raw = bridge(**inputs, return_type="raw")
    assert torch.equal(logits, hf_out.logits)
    assert type(raw) is type(hf_out)  # return_type="raw" is the HF ModelOutput itself
    assert torch.equal(raw.logits, hf_out.logits)


def test_generate_with_images_matches_hf_greedy(
    bridge: TransformerBridge, llava: tuple[Any, Any], image: Any
) -> None:
    model, processor = llava
    texts = ["USER: <image>\nWhat is this? ASSISTANT:", "<image> Hi"]
    inputs = processor(
        text=texts, images=[image, image], padding=True, padding_side="left", return_tensors="pt"
    )
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    ours = bridge.generate(**inputs, max_new_tokens=6)
    assert torch.equal(ours, expected)
    text = bridge.generate(texts[0], images=[image], max_new_tokens=6)
    assert isinstance(text, str) and text.startswith("USER:")


def test_generate_with_a_vision_hook_runs_it_on_the_image_step_only(
    bridge: TransformerBridge, inputs: dict[str, torch.Tensor]
) -> None:
    calls: list[tuple[int, ...]] = []

    def record(x: torch.Tensor, hook: Any) -> None:
        calls.append(tuple(x.shape))

    bridge.generate(
        **inputs, max_new_tokens=3, fwd_hooks=[("vision_encoder.layers.1.hook_resid_post", record)]
    )
    assert calls == [(1, 17, 32)]  # the image is encoded once, on the prompt


BAD_PIXELS = [
    (torch.rand(1, 1, 32, 32), r"3 channels in dimension 1 \[num_images, 3, 32, 32\]"),
    (torch.rand(3, 32, 32), r"4 dimensions \[num_images, 3, 32, 32\]; got shape \(3, 32, 32\)"),
    (torch.rand(1, 3, 40, 40), r"32x32 images .*got shape \(1, 3, 40, 40\)"),
    ([[0.0]], r"must be a tensor \[num_images, 3, height, width\] \(got list\)"),
]


@pytest.mark.parametrize(("pixels", "message"), BAD_PIXELS)
def test_bad_pixel_values_name_the_expected_shape(
    bridge: TransformerBridge, inputs: dict[str, torch.Tensor], pixels: Any, message: str
) -> None:
    with pytest.raises(InputError, match=message):
        bridge.run_with_cache(input_ids=inputs["input_ids"], pixel_values=pixels)


def test_image_token_count_must_match_the_images(
    bridge: TransformerBridge, inputs: dict[str, torch.Tensor]
) -> None:
    two_images = inputs["pixel_values"].repeat(2, 1, 1, 1)
    with pytest.raises(InputError, match=r"16 image tokens .* 2 image\(s\) need 2 x 16 = 32"):
        bridge.run_with_hooks(
            input_ids=inputs["input_ids"],
            pixel_values=two_images,
            fwd_hooks=[("vision_encoder.layers.0.attn.hook_pattern", lambda x, hook: None)],
        )
    with pytest.raises(InputError, match=r"16 image tokens .* but no pixel_values"):
        bridge(input_ids=inputs["input_ids"])
    assert bridge.vision_encoder.layers[0].attn.original_component.config._attn_implementation == (
        "sdpa"
    )


def test_image_tokens_of_another_strategy_are_refused(
    bridge: TransformerBridge, inputs: dict[str, torch.Tensor]
) -> None:
    with pytest.raises(InputError, match=r"1 image\(s\) need 1 x 17 = 17"):
        bridge(**inputs, vision_feature_select_strategy="full")
    with pytest.raises(InputError, match=r"'default'.*'full'"):
        bridge(**inputs, vision_feature_select_strategy="cls_patch")


@pytest.mark.parametrize("layer", [2 + 1, -4, [-2, 5]])
def test_vision_feature_layer_out_of_range(
    bridge: TransformerBridge, inputs: dict[str, torch.Tensor], layer: Any
) -> None:
    with pytest.raises(InputError, match=r"out of range: the vision tower has 2 layers.*-3\.\.2"):
        bridge.run_with_cache(**inputs, vision_feature_layer=layer)


def test_images_and_pixel_values_together_are_refused(
    bridge: TransformerBridge, image: Any, inputs: dict[str, torch.Tensor], prompt: str
) -> None:
    with pytest.raises(InputError, match="pixel_values given twice"):
        bridge.run_with_cache(prompt, images=[image], pixel_values=inputs["pixel_values"])
    with pytest.raises(InputError, match="images= needs text"):
        bridge(images=[image], input_ids=inputs["input_ids"])
