"""Each SigLIP family bridged is the HF model: same logits, HF's tensors in the vision hooks,
and edits of the selected features or of the image positions reach the logits.

The bridge gives the model position ids counted over the attention mask, as HF's `generate`
does (`bridge_core.forward_options`); the reference is the HF model called with the very
keywords the bridge called it with, caught by a plain torch pre-hook. (PaliGemma counts its
default positions from 1, the bridge from 0: rotary embeddings are relative, so the logits
then differ from a plain HF call by float rounding only.)"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bridge_core import TransformerBridge, get_registry


def hf_forward(model: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[Any]]:
    """HF's logits, and what its projector received (caught with a plain torch hook)."""
    seen: list[Any] = []
    projector = projector_of(model)
    handle = projector.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        handle.remove()
    return logits, seen


def bridge_call(
    bridge: TransformerBridge, model: Any, *args: Any, **inputs: Any
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The bridge's logits, and the keywords it called the HF model with."""
    seen: dict[str, Any] = {}
    handle = model.register_forward_pre_hook(
        lambda m, a, kw: seen.update(kw), with_kwargs=True, prepend=True
    )
    try:
        with torch.no_grad():
            logits = bridge(*args, **inputs)
    finally:
        handle.remove()
    return logits, seen


def projector_of(model: Any) -> Any:
    inner = model.model
    return getattr(inner, "multi_modal_projector", None) or inner.connector


def tower_of(model: Any) -> Any:
    inner = model.model
    return getattr(inner, "vision_tower", None) or inner.vision_model


def test_the_registry_picks_the_plugin(bridge: TransformerBridge, name: str) -> None:
    assert bridge.adapter.name == name
    assert get_registry().adapter_source(name).distribution == "transformer-bridge-siglip"
    assert type(bridge.vision_encoder).__name__ == "SiglipVisionEncoderBridge"


def test_logits_equal_hfs_without_hooks_and_under_a_full_cache(
    bridge: TransformerBridge, model_and_processor: tuple[Any, Any], inputs: dict[str, Any]
) -> None:
    model, _ = model_and_processor
    logits, called = bridge_call(bridge, model, **inputs)
    assert {k: v for k, v in called.items() if k != "position_ids"}.keys() == inputs.keys()
    expected, _ = hf_forward(model, called)
    assert torch.equal(logits, expected)
    with torch.no_grad():
        cached, cache = bridge.run_with_cache(**inputs)
    assert torch.equal(cached, expected)
    assert len(cache) == len([p for p in bridge.hook_dict.values() if p.enabled])


def test_the_processor_convenience_is_hfs(
    bridge: TransformerBridge, model_and_processor: tuple[Any, Any], case: Any
) -> None:
    model, processor = model_and_processor
    made = dict(processor(text=case.texts, images=case.images, return_tensors="pt", padding=True))
    logits, called = bridge_call(bridge, model, case.texts, images=case.images)
    for key, value in made.items():
        assert torch.equal(called[key], value), key
    expected, _ = hf_forward(model, called)
    assert torch.equal(logits, expected)


def test_vision_hooks_hold_hfs_tensors(
    bridge: TransformerBridge, model_and_processor: tuple[Any, Any], inputs: dict[str, Any]
) -> None:
    model, _ = model_and_processor
    _, fed = hf_forward(model, inputs)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(**inputs)
        pixels = cache["vision_encoder.hook_in"]  # the views the tower ran on
        hf = tower_of(model)(pixels, output_hidden_states=True)
    hidden = hf.hidden_states
    for i in range(len(hidden) - 1):
        assert torch.equal(cache[f"vision_encoder.layers.{i}.hook_resid_pre"], hidden[i])
        assert torch.equal(cache[f"vision_encoder.layers.{i}.hook_resid_post"], hidden[i + 1])
    assert torch.equal(cache["hook_vision_out"], hf.last_hidden_state)
    assert torch.equal(cache["vision_encoder.post_layernorm.hook_out"], hf.last_hidden_state)
    assert torch.equal(cache["vision_projector.hook_in"], fed[0])
    selected = bridge.vision_encoder.selected_hook_names
    assert len(selected) == 1 and torch.equal(cache[selected[0]], fed[0])


def test_selected_features_per_family(bridge: TransformerBridge, name: str) -> None:
    expected = {
        "llava_onevision": ["vision_encoder.layers.1.hook_resid_post"],  # layer -1, pre-norm
    }.get(name, ["vision_encoder.hook_out"])
    assert bridge.vision_encoder.selected_hook_names == expected
    unreachable = bridge.vision_encoder.unreachable_hooks()
    if name == "llava_onevision":
        assert "vision_encoder.post_layernorm.hook_out" in unreachable
        assert "vision_encoder.hook_out" in unreachable
    else:
        assert unreachable == []


def test_edits_at_the_selected_layer_and_image_positions_change_the_logits(
    bridge: TransformerBridge, inputs: dict[str, Any]
) -> None:
    with torch.no_grad():
        clean, cache = bridge.run_with_cache(**inputs, names_filter="blocks.0.hook_resid_pre")
    image = cache.image_layout.image(1, batch=1)  # the second image of the second row
    text = cache.image_layout.text_mask[1]

    def zero_image(resid: torch.Tensor, hook: Any) -> torch.Tensor:
        resid = resid.clone()
        resid[1, image.positions] = 0.0
        return resid

    def scale(x: torch.Tensor, hook: Any) -> torch.Tensor:
        return x * 3.0

    selected = bridge.vision_encoder.selected_hook_names[0]
    with torch.no_grad():
        at_images = bridge.run_with_hooks(
            **inputs, fwd_hooks=[("blocks.0.hook_resid_pre", zero_image)]
        )
        at_vision = bridge.run_with_hooks(**inputs, fwd_hooks=[(selected, scale)])
    last = int(text.nonzero().max())  # the last text token of the row reads the image
    assert not torch.equal(at_images[1, last], clean[1, last])
    assert torch.equal(at_images[0], clean[0])  # the other row is untouched
    assert not torch.equal(at_vision, clean)


def test_gemma3_pooled_and_idefics3_shuffled_features(
    bridge: TransformerBridge, name: str, inputs: dict[str, Any]
) -> None:
    if name not in ("gemma3", "idefics3"):
        return
    with torch.no_grad():
        _, cache = bridge.run_with_cache(**inputs)
    out = cache["vision_encoder.hook_out"]  # [views, 16 patches, 32]
    views = out.shape[0]
    grid = out.view(views, 4, 4, 32)
    if name == "gemma3":
        pooled = grid.view(views, 2, 2, 2, 2, 32).mean((2, 4)).reshape(views, 4, 32)
        assert torch.allclose(cache["vision_projector.hook_pooled"], pooled, atol=1e-6)
        assert cache["vision_projector.pool.hook_out"].shape == (views, 32, 2, 2)
    else:  # token (r, c) = patches (2r + i, 2c + j), concatenated row by row
        blocks = grid.view(views, 2, 2, 2, 2, 32).permute(0, 1, 3, 2, 4, 5)
        assert torch.equal(cache["vision_projector.hook_shuffled"], blocks.reshape(views, 4, 128))


def test_generate_equals_hfs(
    bridge: TransformerBridge, model_and_processor: tuple[Any, Any], case: Any
) -> None:
    model, processor = model_and_processor
    inputs = dict(processor(text=case.texts[:1], images=case.images[:1], return_tensors="pt"))
    inputs.pop("labels", None)
    expected = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(bridge.generate(**inputs, max_new_tokens=3), expected)


def test_bad_inputs_are_named(bridge: TransformerBridge, inputs: dict[str, Any]) -> None:
    from bridge_core import InputError

    no_pixels = {k: v for k, v in inputs.items() if k != "pixel_values"}
    with pytest.raises(InputError, match="image tokens"):
        bridge(**no_pixels)
    small = {**inputs, "pixel_values": inputs["pixel_values"][..., :16, :16]}
    with pytest.raises(InputError, match="32x32"):
        bridge(**small)
