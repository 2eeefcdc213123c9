"""No hooks, or every hook point cached: the bridge's outputs are HF's, bit for bit.

And what the cache holds is what HF computes: the vision blocks' outputs, the merged features
(in the tower's order), and attention patterns under M-RoPE as HF's eager kernel makes them.
"""

from __future__ import annotations

from typing import Any

import torch

from bridge_core import TransformerBridge
from bridge_qwen2vl.tiny import IMAGE_PROMPT, tiny_qwen2_5_vl, tiny_qwen2_vl

TWO = f"{IMAGE_PROMPT} Compare this with {IMAGE_PROMPT} that."


def hf_logits(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits  # type: ignore[no-any-return]


def test_outputs_equal_hf_without_hooks_and_under_a_full_cache(
    bridge: TransformerBridge, model: Any, processor: Any, images: list[Any]
) -> None:
    cases = [
        (f"{IMAGE_PROMPT} What is this?", images[:1], None),
        (TWO, images, None),
        ([f"{IMAGE_PROMPT} Hi", TWO], [images[1], *images], "left"),
        ([TWO, f"Hello {IMAGE_PROMPT}"], [*images, images[0]], "right"),
    ]
    for text, pictures, side in cases:
        padding = {"padding": True, "padding_side": side} if side else {}
        inputs = processor(text=text, images=pictures, return_tensors="pt", **padding)
        expected = hf_logits(model, dict(inputs))
        assert torch.equal(bridge(text, images=pictures, padding_side=side), expected)
        assert torch.equal(bridge(**inputs), expected)
        logits, cache = bridge.run_with_cache(text, images=pictures, padding_side=side)
        assert torch.equal(logits, expected)
        assert len(cache) > 90  # every hook point of the tower, merger and language model
    text_only = processor(text="no image here", return_tensors="pt")
    assert torch.equal(bridge("no image here"), hf_logits(model, dict(text_only)))


def test_the_cache_holds_what_hf_computes(
    bridge: TransformerBridge, model: Any, processor: Any, images: list[Any]
) -> None:
    inputs = dict(processor(text=TWO, images=images, return_tensors="pt"))
    _, cache = bridge.run_with_cache(**inputs)
    with torch.no_grad():
        hf = model(**inputs, output_hidden_states=True)
        tower = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    assert torch.equal(cache["vision_encoder.layers.1.hook_resid_post"], tower.last_hidden_state)
    assert torch.equal(cache["hook_vision_out"], tower.last_hidden_state)
    order, _ = bridge.vision_encoder.grid().block_order(inputs["image_grid_thw"])
    # the merged features in the tower's order (Qwen2.5-VL: window order, undone by the model)
    assert torch.equal(cache["vision_projector.hook_out"], tower.pooler_output[order])
    for i in range(2):
        assert torch.equal(cache[f"blocks.{i}.hook_resid_pre"], hf.hidden_states[i])
    assert torch.equal(cache["ln_final.hook_out"], hf.hidden_states[2])  # HF records it normed


def test_language_model_patterns_under_m_rope_are_hf_eager_attention(
    bridge: TransformerBridge, family: str, processor: Any, images: list[Any]
) -> None:
    build = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl}[family]
    eager, _ = build()
    eager.set_attn_implementation("eager")
    inputs = dict(processor(text=TWO, images=images, return_tensors="pt"))
    with torch.no_grad():
        hf = eager(**inputs, output_attentions=True)
    _, cache = bridge.run_with_cache(**inputs, names_filter=lambda n: "pattern" in n)
    for i in range(
        2
    ):  # hook_rot_q/k and the pattern are what the kernel saw, 3-D positions and all
        torch.testing.assert_close(cache["pattern", i], hf.attentions[i], rtol=0, atol=1e-6)
    ids = inputs["input_ids"][0]
    image = (ids == model_image_token(bridge)).nonzero().flatten()
    assert image.numel() == 31  # two images: 15 + 16 merged blocks


def model_image_token(bridge: TransformerBridge) -> int:
    token = bridge.vision_encoder.image_token_id
    assert token is not None
    return int(token)
