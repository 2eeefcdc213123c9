"""Image layouts: token -> merged block -> tower tokens -> pixels, checked against the model.

Three checks tie a language-model position to its image: the residual stream there is the
merger's output for the block the layout names; the tower tokens the layout names are the
patch embeddings (the 3-D convolution) of exactly the pixel rows that block came from (found
independently, with HF's own window order for Qwen2.5-VL); and those pixels show the part of
the original image that `pixel_box` names.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.vision_utils import get_vision_window_index

from bridge_core import InputError, TransformerBridge
from bridge_core.multimodal import ImagePlacement
from bridge_qwen2vl.tiny import IMAGE_PROMPT

TEXTS = [f"{IMAGE_PROMPT} Compare this with {IMAGE_PROMPT} that.", f"Hi {IMAGE_PROMPT}"]


def ramp(width: int, height: int) -> Image.Image:
    red, green = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    blue = np.full_like(red, 128)
    return Image.fromarray(np.stack([red, green, blue], -1).round().astype(np.uint8))


def pixel_rows(family: str, tokens: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """The rows of pixel_values that tower tokens come from, by HF's own functions."""
    if family == "qwen2_vl":
        return tokens  # the tower keeps the processor's order
    window_index, _ = get_vision_window_index(grid_thw, 2, 16, 4)  # blocks in window order
    return window_index[tokens // 4] * 4 + tokens % 4


def check_against_the_run(
    bridge: TransformerBridge, family: str, cache: Any, inputs: Any, image: ImagePlacement
) -> None:
    (tile,) = image.tiles
    assert tile.vision_index.shape == (*tile.grid, 4, 1)
    tokens = tile.vision_index[..., 0]  # [rows, cols, 4]: the block's four patches
    resid = cache["blocks.0.hook_resid_pre"][image.row, tile.positions]
    assert torch.equal(resid, cache["vision_projector.hook_out"][tokens[..., 0] // 4])
    assert torch.equal(tokens % 4, torch.arange(4).expand_as(tokens))  # a block's four, in order
    rows = pixel_rows(family, tokens.flatten(), inputs["image_grid_thw"])
    embed = bridge.original_model.model.visual.patch_embed
    with torch.no_grad():
        conv = embed(inputs["pixel_values"][rows])  # Conv3d of each patch's pixels
    assert torch.equal(conv, cache["vision_encoder.layers.0.hook_resid_pre"][tokens.flatten()])
    for row, col in [(0, 0), (tile.grid[0] - 1, tile.grid[1] - 1)]:
        assert image.token_patch(int(tile.positions[row, col])) == (0, row, col)


@pytest.mark.parametrize("side", ["left", "right"])
def test_tokens_blocks_tower_and_patch_embeddings(
    bridge: TransformerBridge, family: str, images: list[Any], side: str
) -> None:
    pictures = [*images, ramp(64, 40)]
    _, cache = bridge.run_with_cache(TEXTS, images=pictures, padding_side=side)
    inputs = bridge.processor(
        text=TEXTS, images=pictures, padding=True, padding_side=side, return_tensors="pt"
    )
    layout = cache.image_layout
    assert [len(row) for row in layout] == [2, 1]
    assert [im.index for im in layout.images] == [0, 1, 2]
    assert [im.grid for im in layout.images] == [(3, 5), (4, 4), (3, 5)]
    assert [im.size for im in layout.images] == [(24, 40), (32, 32), (40, 64)]
    ids = inputs["input_ids"]
    assert torch.equal(layout.image_mask, ids == bridge.vision_encoder.image_token_id)
    assert torch.equal(layout.pad_mask, inputs["attention_mask"] == 0)
    assert layout.vision is not None
    assert layout.vision.feature_hooks == ("vision_encoder.layers.1.hook_resid_post",)
    for im in layout.images:
        check_against_the_run(bridge, family, cache, inputs, im)


def test_pixel_boxes_show_the_pixels_of_the_block(bridge: TransformerBridge, family: str) -> None:
    for width, height in [(40, 24), (64, 40), (30, 50)]:
        picture = ramp(width, height)
        inputs = bridge.processor(text=f"{IMAGE_PROMPT} Hi", images=[picture], return_tensors="pt")
        (im,) = bridge.image_layout(f"{IMAGE_PROMPT} Hi", images=[picture])[0]
        ip = bridge.processor.image_processor
        mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1, 1)
        std = torch.tensor(ip.image_std).view(1, 3, 1, 1, 1)
        patches = inputs["pixel_values"].view(-1, 3, 2, 4, 4) * std + mean  # 0..1 again
        (tile,) = im.tiles
        rows = pixel_rows(family, tile.vision_index[..., 0].flatten(), inputs["image_grid_thw"])
        colour = patches[rows].view(-1, 4, 3, 32).mean((1, 3))  # each block's mean colour
        said = torch.stack(
            [colour[:, 0] * (width - 1) + 0.5, colour[:, 1] * (height - 1) + 0.5], -1
        )  # where a ramp has that colour
        assert tile.boxes is not None
        boxes = tile.boxes.flatten(0, 1)
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        assert (said - centres).abs().max() < 0.25, (width, height)  # in original pixels
        x0, y0, x1, y1 = im.pixel_box(int(tile.positions[0, 0]))
        assert x0 == 0 and y0 == 0 and x1 == pytest.approx(8 * width / (tile.grid[1] * 8))
        assert y1 == pytest.approx(8 * height / (tile.grid[0] * 8))


def test_layout_helpers_and_refusals(bridge: TransformerBridge, images: list[Any]) -> None:
    layout = bridge.image_layout(f"{IMAGE_PROMPT} What?", images=images[:1])
    im = layout.image(0)
    pos = int(im.positions[6])
    assert im.token_patch(pos) == (0, 1, 1)  # 3x5 blocks: the 7th token is row 1, column 1
    assert im.pixel_box(pos) == (8.0, 8.0, 16.0, 16.0)
    assert im.vision_tokens(pos).shape == (4, 1)  # the four patches merged into it
    with pytest.raises(InputError, match="merged from 4 tokens of the vision tower"):
        im.vision_token(pos)
    seq = torch.arange(layout.pad_mask.shape[1]).float()
    assert torch.equal(im.to_grid(seq), im.tiles[0].positions.float())
    assert im.to_grid(torch.arange(15.0)).shape == (3, 5)
    with pytest.raises(InputError, match="is not a token of image 0"):
        im.token_patch(0)  # <|vision_start|>
    no_sizes = bridge.image_layout(
        **bridge.processor(text=IMAGE_PROMPT, images=images[:1], return_tensors="pt")
    )
    with pytest.raises(InputError, match="original size of image 0 is unknown"):
        no_sizes[0][0].pixel_box(pos)
    assert bridge.image_layout("no image")[0] == []
    _, cache = bridge.run_with_cache("no image")
    assert cache.image_layout is None
