"""Image patching presets equal the same patches written by hand as hooks."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bridge_core import TransformerBridge
from bridge_core.patching import patch_image_patches, patch_image_positions, patch_vision_layers
from bridge_llava.tiny import tiny_image

TEXTS = ["USER: <image>\nWhat is this? ASSISTANT:", "<image> and <image>"]


def metric(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, -1, 42] - logits[:, -1, 7]).sum()


@pytest.fixture(scope="module")
def runs(bridge: TransformerBridge, image: Any) -> tuple[dict[str, Any], Any]:
    other = tiny_image(64, "checkerboard", seed=4)
    clean = dict(
        bridge.processor(text=TEXTS, images=[image] * 3, padding=True, return_tensors="pt")
    )
    corrupted = {"input": TEXTS, "images": [other, image, other]}
    with torch.no_grad():
        _, cache = bridge.run_with_cache(**clean)
    return corrupted, cache


def by_hand(
    bridge: TransformerBridge, corrupted: dict[str, Any], cache: Any, hook: str, index: Any
) -> float:
    def patch(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        activation = activation.clone()
        activation[index] = cache[hook.name][index]
        return activation

    with torch.no_grad():
        logits = bridge.run_with_hooks(
            corrupted["input"], images=corrupted["images"], fwd_hooks=[(hook, patch)]
        )
    return float(metric(logits))


def test_image_positions_of_the_language_model(bridge: TransformerBridge, runs: tuple) -> None:
    corrupted, cache = runs
    result = patch_image_positions(bridge, corrupted, cache, metric, progress=False)
    im = cache.image_layout[0][0]
    assert result.axes == ("layer", "pos") and result.values.shape == (2, 16)
    assert result.coords["pos"] == im.positions.tolist()
    for layer, k in [(0, 0), (1, 9)]:
        pos = int(im.positions[k])
        expected = by_hand(bridge, corrupted, cache, f"blocks.{layer}.hook_resid_pre", (0, pos))
        assert result.values[layer, k] == expected
    grid = result.grid()
    assert grid.shape == (2, 4, 4)
    r, c = divmod(9, 4)
    assert grid[1, r, c] == result.values[1, 9]


def test_each_vision_layer(bridge: TransformerBridge, runs: tuple) -> None:
    corrupted, cache = runs
    result = patch_vision_layers(bridge, corrupted, cache, metric, image=1, batch=1, progress=False)
    assert result.axes == ("layer",) and result.values.shape == (2,)
    rows = torch.tensor([2])  # the third image of the batch: row 2 of the tower's batch
    expected = by_hand(bridge, corrupted, cache, "vision_encoder.layers.0.hook_resid_post", (rows,))
    assert result.values[0] == expected and result.values[0] != result.values[1]


def test_each_patch_of_the_selected_layer(bridge: TransformerBridge, runs: tuple) -> None:
    corrupted, cache = runs
    result = patch_image_patches(bridge, corrupted, cache, metric, progress=False)
    assert result.axes == ("patch",) and result.values.shape == (16,)
    assert result.coords["patch"][5] == (0, 1, 1)
    (selected,) = bridge.vision_encoder.selected_hook_names
    expected = by_hand(bridge, corrupted, cache, selected, (0, 1 + 5))  # CLS is token 0
    assert result.values[5] == expected
    assert torch.equal(result.grid(), result.values.view(4, 4))


def test_llava_next_patch_grid_per_tile(llava_next: tuple[Any, Any]) -> None:
    model, processor = llava_next
    bridge = TransformerBridge.wrap(model, processor=processor)
    clean = {"input": "<image> What?", "images": [tiny_image(40)]}
    with torch.no_grad():
        _, cache = bridge.run_with_cache(clean["input"], images=clean["images"])
    corrupted = {"input": "<image> What?", "images": [tiny_image(40, "checkerboard")]}
    result = patch_image_patches(bridge, corrupted, cache, metric, progress=False)
    base, high = result.grid()
    assert base.shape == (4, 4) and high.shape == cache.image_layout[0][0].tiles[1].grid
