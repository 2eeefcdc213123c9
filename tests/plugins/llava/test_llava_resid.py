"""Residual helpers on a run with images, and on the vision tower (`stack=`)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bridge_core import InputError, TransformerBridge
from bridge_llava.tiny import tiny_image, tiny_llava

VISION = "vision_encoder.layers"


@pytest.fixture(scope="module")
def run(bridge: TransformerBridge, image: Any) -> tuple[torch.Tensor, Any]:
    texts = ["USER: <image>\nWhat is this? ASSISTANT:", "<image> and <image>"]
    with torch.no_grad():
        return bridge.run_with_cache(texts, images=[image] * 3, padding_side="left")


def test_decompose_resid_adds_up_at_image_positions_too(run: tuple) -> None:
    _, cache = run
    parts, labels = cache.decompose_resid(return_labels=True)
    assert labels[:2] == ["embed", "image"]
    torch.testing.assert_close(parts.sum(0), cache["resid_post", -1], rtol=0, atol=1e-5)
    for layer in range(2):
        mid = cache.decompose_resid(layer, mlp_input=True)
        torch.testing.assert_close(mid.sum(0), cache["resid_mid", layer], rtol=0, atol=1e-5)
    mask = cache.image_layout.image_mask
    embed, image = parts[0], parts[1]
    assert not embed[mask].any() and not image[~mask].any()
    assert torch.equal(image[mask], cache["resid_pre", 0][mask])  # the projected features
    assert torch.equal(embed[~mask], cache["hook_embed"][~mask])


def test_decompose_resid_of_llava_next_and_without_resid_pre(
    llava_next: tuple[Any, Any], bridge: TransformerBridge, image: Any
) -> None:
    model, processor = llava_next
    next_bridge = TransformerBridge.wrap(model, processor=processor)
    with torch.no_grad():
        _, cache = next_bridge.run_with_cache("<image> What?", images=[tiny_image(48)])
    parts = cache.decompose_resid()
    torch.testing.assert_close(parts.sum(0), cache["resid_post", -1], rtol=0, atol=1e-5)
    with torch.no_grad():
        _, partial = bridge.run_with_cache(
            "<image> Hi", images=[image], names_filter=lambda n: "attn.hook_out" in n or "mlp" in n
        )
    with pytest.raises(InputError, match=r"needs 'blocks\.0\.hook_resid_pre'"):
        partial.decompose_resid(mode="attn")
    assert partial.decompose_resid(incl_embeds=False, mode="attn").shape[0] == 2


def test_vision_stack_helpers_are_the_towers_hidden_states(
    run: tuple, llava: tuple[Any, Any], image: Any, bridge: TransformerBridge
) -> None:
    _, cache = run
    model, processor = llava
    pixels = processor(text=["<image>"] * 3, images=[image] * 3, return_tensors="pt")
    with torch.no_grad():
        hidden = model.model.vision_tower(pixels["pixel_values"], output_hidden_states=True)
    acc, labels = cache.accumulated_resid(stack=VISION, return_labels=True)
    assert labels == ["0_pre", "1_pre", "final_post"]
    assert torch.equal(acc, torch.stack(hidden.hidden_states))
    parts, labels = cache.decompose_resid(stack=VISION, return_labels=True)
    assert labels == ["embed", "0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]
    torch.testing.assert_close(parts.sum(0), hidden.hidden_states[-1], rtol=0, atol=1e-5)
    mid = cache.accumulated_resid(layer=1, incl_mid=True, stack=VISION)
    assert torch.equal(mid[1], cache["vision_encoder.layers.0.layer_norm2.hook_in"])
    assert cache.stack_activation("pattern", stack=VISION).shape == (2, 3, 4, 17, 17)
    norm = bridge.vision_encoder.layers[1].layer_norm1.original_component
    scaled = cache.apply_ln_to_stack(acc[1:2], layer=1, stack=VISION)[0]
    torch.testing.assert_close(
        scaled * norm.weight + norm.bias, cache["vision_encoder.layers.1.layer_norm1.hook_out"]
    )
    with pytest.raises(InputError, match=r"no norm of 'vision_encoder\.layers' reads the output"):
        cache.accumulated_resid(apply_ln=True, stack=VISION)


def test_vision_logit_lens_goes_through_projector_norm_and_unembed(
    run: tuple, llava: tuple[Any, Any], bridge: TransformerBridge
) -> None:
    _, cache = run
    model, _ = llava
    acc = cache.accumulated_resid(stack=VISION)  # [3, images, 17, 32]
    lens = cache.logit_lens(acc, stack=VISION)
    assert lens.shape == (3, 3, 16, 512)  # CLS dropped ("default"): the 16 patches fed
    with torch.no_grad():
        hf = model.lm_head(
            model.model.language_model.norm(model.model.multi_modal_projector(acc[:, :, 1:]))
        )
    assert torch.equal(lens, hf)
    # the selected layer's lens at an image position is the logit lens of the residual there
    (selected,) = bridge.vision_encoder.selected_hook_names
    assert selected == "vision_encoder.layers.0.hook_resid_post"
    im = cache.image_layout[1][0]
    crop, token = im.vision_token(int(im.positions[3]))
    at_image = cache.logit_lens(cache["resid_pre", 0][im.row, im.positions[3]])
    torch.testing.assert_close(lens[1, crop, token - 1], at_image, rtol=0, atol=1e-5)
    with pytest.raises(InputError, match=r"'blocks' or from 'vision_encoder\.layers'"):
        cache.logit_lens(acc, stack="vision_encoder")


@pytest.mark.parametrize("layer", [-2, -1, [0, 2]])
def test_selected_hook_names_are_what_the_projector_gets(layer: Any, image: Any) -> None:
    model, processor = tiny_llava(vision_feature_layer=layer)
    bridge = TransformerBridge.wrap(model, processor=processor)
    names = bridge.vision_encoder.selected_hook_names
    with torch.no_grad():
        _, cache = bridge.run_with_cache("<image>", images=[image])
    selected = torch.cat([cache[name][:, 1:] for name in names], dim=-1)
    assert torch.equal(selected, cache["vision_projector.hook_in"])
    assert cache.image_layout.vision.feature_hooks == tuple(names)
