"""The multimodal toolkit, unchanged, on Qwen2-VL's merged patches and batchless tower."""

from __future__ import annotations

from typing import Any

import torch

from bridge_core import TransformerBridge
from bridge_core.multimodal import attention_to_image
from bridge_core.patching import (
    patch_image_patches,
    patch_image_positions,
    patch_vision_layers,
)
from bridge_qwen2vl.tiny import IMAGE_PROMPT

PROMPT = f"{IMAGE_PROMPT} Compare this with {IMAGE_PROMPT} that."


def test_attention_to_image_is_the_pattern_on_the_block_grid(
    bridge: TransformerBridge, images: list[Any]
) -> None:
    _, cache = bridge.run_with_cache(PROMPT, images=images)
    grid = attention_to_image(cache, layer=-1, image=1)
    im = cache.image_layout.image(1)
    assert isinstance(grid, torch.Tensor) and grid.shape == (4, 4)
    pattern = cache["pattern", 1][0].mean(0)[-1]
    assert torch.equal(grid, pattern[im.tiles[0].positions])


def test_decompose_resid_adds_up_at_image_positions(
    bridge: TransformerBridge, images: list[Any]
) -> None:
    _, cache = bridge.run_with_cache(PROMPT, images=images)
    parts, labels = cache.decompose_resid(return_labels=True)
    assert labels[:2] == ["embed", "image"]
    torch.testing.assert_close(parts.sum(0), cache["resid_post", -1], rtol=0, atol=1e-5)
    image = cache.image_layout.image_mask[0]
    assert not parts[0][0, image].any()  # the <|image_pad|> embedding is replaced ...
    projected = cache["vision_projector.hook_out"]  # ... by the merged features
    im = cache.image_layout.image(0)
    blocks = im.tiles[0].vision_index[..., 0, 0] // 4
    assert torch.equal(parts[1][0, im.tiles[0].positions], projected[blocks])


def test_the_vision_stack_helpers_and_logit_lens(
    bridge: TransformerBridge, images: list[Any]
) -> None:
    _, cache = bridge.run_with_cache(PROMPT, images=images)
    vision = "vision_encoder.layers"
    resid, labels = cache.accumulated_resid(stack=vision, return_labels=True)
    assert labels == ["0_pre", "1_pre", "final_post"] and resid.shape == (3, 124, 32)
    parts = cache.decompose_resid(stack=vision)
    torch.testing.assert_close(parts.sum(0), resid[-1], rtol=0, atol=1e-5)
    lens = cache.logit_lens(resid, stack=vision)  # each layer's patches through the merger
    assert lens.shape == (3, 31, bridge.cfg.d_vocab)
    final = bridge.unembed(bridge.ln_final(cache["vision_projector.hook_out"]))
    torch.testing.assert_close(lens[-1], final, rtol=0, atol=1e-5)
    scaled = cache.apply_ln_to_stack(resid[:1], layer=0, stack=vision)
    assert scaled.shape == (1, 124, 32)


def test_patching_presets_equal_hand_written_hooks(
    bridge: TransformerBridge, images: list[Any]
) -> None:
    _, clean = bridge.run_with_cache(PROMPT, images=images)
    corrupted = {"input": PROMPT, "images": [i.rotate(180) for i in images]}
    base = bridge(PROMPT, images=corrupted["images"])
    answer = int(bridge(PROMPT, images=images)[0, -1].argmax())

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -1, answer]

    im = clean.image_layout.image(0)
    by_patch = patch_image_patches(bridge, corrupted, clean, metric, progress=False)
    assert by_patch.values.shape == (15,) and by_patch.grid().shape == (3, 5)
    tokens = im.vision_tokens(int(im.tiles[0].positions[1, 2]))[:, 0]  # 4 tower tokens
    name = "vision_encoder.layers.1.hook_resid_post"
    source = clean[name]

    def by_hand(resid: torch.Tensor, hook: Any) -> torch.Tensor:
        resid = resid.clone()
        resid[tokens] = source[tokens]
        return resid

    manual = bridge.run_with_hooks(PROMPT, images=corrupted["images"], fwd_hooks=[(name, by_hand)])
    assert by_patch.grid()[1, 2] == metric(manual)
    assert not torch.equal(manual, base)

    by_layer = patch_vision_layers(bridge, corrupted, clean, metric, progress=False)
    assert by_layer.values.shape == (2,)
    rows = im.vision_rows
    whole = clean["vision_encoder.layers.0.hook_resid_post"]

    def image_by_hand(resid: torch.Tensor, hook: Any) -> torch.Tensor:
        resid = resid.clone()
        resid[rows] = whole[rows]
        return resid

    layer0 = bridge.run_with_hooks(
        PROMPT,
        images=corrupted["images"],
        fwd_hooks=[("vision_encoder.layers.0.hook_resid_post", image_by_hand)],
    )
    assert by_layer.values[0] == metric(layer0)
    by_position = patch_image_positions(bridge, corrupted, clean, metric, progress=False)
    assert by_position.grid().shape == (2, 3, 5)  # [layer, rows, cols]
