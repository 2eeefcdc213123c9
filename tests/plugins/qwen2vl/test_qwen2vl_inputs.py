"""Qwen2-VL's own prompt format through the processor, generation, and inputs refused clearly."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bridge_core import InputError, TransformerBridge
from bridge_qwen2vl.tiny import IMAGE_PROMPT


def test_the_chat_format_through_the_processor(
    bridge: TransformerBridge, model: Any, processor: Any, images: list[Any]
) -> None:
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    inputs = processor(text=prompt, images=images[:1], return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits
    assert torch.equal(bridge(prompt, images=images[:1]), expected)
    tokens = bridge.generate(**inputs, max_new_tokens=4)
    with torch.no_grad():
        reference = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(tokens, reference)
    assert isinstance(bridge.generate(prompt, images=images[:1], max_new_tokens=2), str)


def test_inputs_that_cannot_work_are_refused(
    qwen_bridges: dict[str, TransformerBridge], images: list[Any]
) -> None:
    bridge = qwen_bridges["qwen2_vl"]
    two = bridge.processor(
        text=f"{IMAGE_PROMPT} and {IMAGE_PROMPT}", images=images, return_tensors="pt"
    )
    one = bridge.processor(text=f"{IMAGE_PROMPT} Hi", images=images[:1], return_tensors="pt")
    cases = {
        r"\[patches, 96\] \(channels x temporal patch x patch x patch\); got \(124, 48\)": dict(
            **{**two, "pixel_values": two["pixel_values"][:, :48]}
        ),
        "image_grid_thw": {k: v for k, v in two.items() if k != "image_grid_thw"},
        "makes 124 patches, but pixel_values has 60": dict(
            **{**two, "pixel_values": one["pixel_values"]}
        ),
        "but the 1 image": dict(
            **{
                **one,
                "input_ids": two["input_ids"],
                "attention_mask": two["attention_mask"],
                "mm_token_type_ids": two["mm_token_type_ids"],
            }
        ),
        "but no pixel_values were given": {
            k: v for k, v in two.items() if k not in ("pixel_values", "image_grid_thw")
        },
    }
    for message, kwargs in cases.items():
        with pytest.raises(InputError, match=message):
            bridge.run_with_cache(**kwargs)
    assert not any(point.has_hooks for point in bridge.hook_dict.values())
