"""Image layouts: token -> patch -> pixels, checked against what the model itself computed.

Three checks tie a language-model position to its image: the residual stream there is the
projected feature of the (crop, token) the layout names; the patch embedding of that token is
the tower's convolution of the pixel block the layout names; and that pixel block shows the
part of the original image that `pixel_box` names.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from bridge_core import InputError, TransformerBridge
from bridge_core.multimodal import ImagePlacement, Tile
from bridge_llava.tiny import tiny_image, tiny_llava, tiny_llava_next


def ramp(width: int, height: int) -> Image.Image:
    """Red grows with x, green with y: a pixel's colour says where it is."""
    red, green = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    blue = np.full_like(red, 128)
    return Image.fromarray(np.stack([red, green, blue], -1).round().astype(np.uint8))


@pytest.fixture(scope="module")
def next_bridge(llava_next: tuple[Any, Any]) -> TransformerBridge:
    model, processor = llava_next
    return TransformerBridge.wrap(model, processor=processor)


def patch_embeddings(bridge: TransformerBridge, pixels: torch.Tensor, tile: Tile) -> torch.Tensor:
    """conv(pixel block) + position embedding for each cell of `tile`, from the pixels alone."""
    embeddings = bridge.vision_encoder.embeddings.original_component
    p = bridge.vision_encoder.patch_size
    g = bridge.vision_encoder.image_size // p
    crops, tokens = tile.vision_index.flatten(0, 1).unbind(-1)
    rows, cols = (tokens - 1) // g, (tokens - 1) % g
    blocks = torch.stack(
        [
            pixels[k, :, r * p : (r + 1) * p, c * p : (c + 1) * p]
            for k, r, c in zip(crops.tolist(), rows.tolist(), cols.tolist(), strict=True)
        ]
    )
    with torch.no_grad():
        conv = embeddings.patch_embedding(blocks).flatten(1)  # one patch per block: [n, hidden]
        return conv + embeddings.position_embedding.weight[tokens]


def check_against_the_run(bridge: TransformerBridge, cache: Any, image: ImagePlacement) -> None:
    resid = cache["blocks.0.hook_resid_pre"][image.row]
    projected = cache["vision_projector.hook_out"]
    pixels = cache["vision_encoder.hook_in"]  # what the tower saw: every crop, [n, 3, h, w]
    skip = cache.image_layout.vision.skip_tokens
    for tile in image.tiles:
        crops, tokens = tile.vision_index.unbind(-1)
        assert torch.equal(resid[tile.positions], projected[crops, tokens - skip])
        expected = cache["hook_vision_embed"][crops.flatten(), tokens.flatten()]
        assert torch.allclose(patch_embeddings(bridge, pixels, tile), expected, atol=1e-5)
        for t, (row, col) in enumerate([(0, 0), (tile.grid[0] - 1, tile.grid[1] - 1)]):
            pos = int(tile.positions[row, col])
            assert image.token_patch(pos) == (image.tiles.index(tile), row, col), t


def test_llava_tokens_patches_and_embeddings(bridge: TransformerBridge, image: Any) -> None:
    texts = ["USER: <image>\nWhat is this? ASSISTANT:", "<image> and <image>"]
    for side in ("left", "right"):
        _, cache = bridge.run_with_cache(texts, images=[image] * 3, padding_side=side)
        layout = cache.image_layout
        assert [len(images) for images in layout] == [1, 2]
        assert [im.index for im in layout.images] == [0, 1, 2]
        ids = bridge.processor(
            text=texts, images=[image] * 3, padding=True, padding_side=side, return_tensors="pt"
        )["input_ids"]
        assert torch.equal(layout.image_mask, ids == bridge.vision_encoder.image_token_id)
        assert torch.equal(layout.pad_mask, ids == bridge.tokenizer.pad_token_id)
        assert not (layout.text_mask & (layout.image_mask | layout.pad_mask)).any()
        for im in layout.images:
            assert im.grid == (4, 4) and len(im.tiles) == 1 and im.size == (64, 64)
            check_against_the_run(bridge, cache, im)


def test_llava_next_tokens_patches_and_embeddings(next_bridge: TransformerBridge) -> None:
    images = [tiny_image(48), ramp(50, 30), ramp(30, 64)]
    texts = ["<image> What? <image>", "Two: <image> and this"]
    _, cache = next_bridge.run_with_cache(texts, images=images, padding_side="left")
    layout = cache.image_layout
    newline = next_bridge.original_model.model.image_newline
    resid = cache["blocks.0.hook_resid_pre"]
    for im, size in zip(layout.images, [(48, 48), (30, 50), (64, 30)], strict=True):
        assert im.size == size and len(im.tiles) == 2 and im.grid == (4, 4)
        check_against_the_run(next_bridge, cache, im)
        base, high = im.tiles
        assert len(high.newline_positions) == high.grid[0] and not len(base.newline_positions)
        assert torch.equal(resid[im.row, high.newline_positions], newline.expand(high.grid[0], -1))
        assert len(im.positions) == 16 + high.grid[0] * (high.grid[1] + 1)
    assert [im.tiles[1].crops for im in layout.images] == [(2, 2), (1, 2), (2, 1)]
    assert layout.images[1].tiles[1].grid == (4, 6)  # 30x50 on a 32x64 canvas: 2 columns unpadded


def mean_position(tile: Tile, pixels: torch.Tensor, image: Image.Image, processor: Any) -> Any:
    """For each cell: the (x, y) its pixel block's colour says, and the centre of its box."""
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean).view(3, 1, 1)
    std = torch.tensor(ip.image_std).view(3, 1, 1)
    colour = (pixels * std + mean) * 255  # back to 0..255
    p = 8
    said, centres = [], []
    assert tile.boxes is not None
    sizes = (tile.boxes[..., 2:] - tile.boxes[..., :2]).flatten(0, 1)
    full = (sizes > sizes.max(0).values - 1e-3).all(-1)  # cells whose box is not clipped
    for (crop, token), box, keep in zip(
        tile.vision_index.flatten(0, 1).tolist(), tile.boxes.flatten(0, 1), full, strict=True
    ):
        if not keep:
            continue
        r, c = divmod(token - 1, 32 // p)
        block = colour[crop, :, r * p : (r + 1) * p, c * p : (c + 1) * p].mean((1, 2))
        said.append(
            [block[0] / 255 * (image.width - 1) + 0.5, block[1] / 255 * (image.height - 1) + 0.5]
        )
        centres.append([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
    return torch.tensor(said), torch.tensor(centres)


@pytest.mark.parametrize("size", [(64, 40), (40, 64), (50, 50)])
def test_pixel_boxes_show_the_pixels_of_the_block(
    size: tuple[int, int], bridge: TransformerBridge, next_bridge: TransformerBridge
) -> None:
    picture = ramp(*size)
    for b in (bridge, next_bridge):
        _, cache = b.run_with_cache(
            "<image> Hi", images=[picture], names_filter="vision_encoder.hook_in"
        )
        (im,) = cache.image_layout[0]
        for tile in im.tiles:
            said, centres = mean_position(
                tile, cache["vision_encoder.hook_in"], picture, b.processor
            )
            assert len(said) >= tile.grid[0] * tile.grid[1] // 2
            assert (said - centres).abs().max() < 0.5, (b.adapter.name, tile.grid)  # in pixels
        x0, y0, x1, y1 = im.pixel_box(int(im.tiles[0].positions[0, 0]))
        assert 0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1]


def test_llava_full_strategy_places_the_cls_token(image: Any) -> None:
    model, processor = tiny_llava(vision_feature_select_strategy="full")
    bridge = TransformerBridge.wrap(model, processor=processor)
    _, cache = bridge.run_with_cache(["<image> Hi", "Hello <image>"], images=[image] * 2)
    for im in cache.image_layout.images:
        assert im.cls_position == int(im.positions[0]) and len(im.positions) == 17
        assert im.vision_token(im.cls_position) == (im.index, 0)
        check_against_the_run(bridge, cache, im)
        with pytest.raises(InputError, match="CLS token"):
            im.token_patch(im.cls_position)


def test_to_grid_and_bad_positions(bridge: TransformerBridge, image: Any) -> None:
    layout = bridge.image_layout("USER: <image>\nWhat?", images=[image])
    im = layout.image(0, batch=0)
    seq = torch.arange(layout.pad_mask.shape[1]).float()
    assert torch.equal(im.to_grid(seq), im.tiles[0].positions.float())
    assert torch.equal(im.to_grid(torch.arange(16.0)), torch.arange(16.0).view(4, 4))
    assert im.to_grid(torch.zeros(layout.pad_mask.shape[1], 5)).shape == (4, 4, 5)
    with pytest.raises(InputError, match="over image 0's 16 tokens; got length 3"):
        im.to_grid(torch.zeros(3))
    with pytest.raises(InputError, match="position 0 of row 0 is not a token of image 0"):
        im.token_patch(0)
    with pytest.raises(InputError, match="batch row 0 has 1 image"):
        layout.image(1)
    no_sizes = bridge.image_layout(
        **bridge.processor(text="<image>", images=[image], return_tensors="pt")
    )
    with pytest.raises(InputError, match="original size of image 0 is unknown"):
        no_sizes[0][0].pixel_box(int(no_sizes[0][0].positions[0]))
    given = bridge.image_layout(
        **bridge.processor(text="<image>", images=[image], return_tensors="pt"),
        image_sizes=[(64, 64)],
    )
    assert given[0][0].pixel_box(int(given[0][0].positions[0])) == (0.0, 0.0, 16.0, 16.0)


def test_layouts_of_text_and_text_models(bridge: TransformerBridge, llama_bridge: Any) -> None:
    layout = bridge.image_layout("no image here")
    assert len(layout) == 1 and layout[0] == [] and not layout.image_mask.any()
    _, cache = bridge.run_with_cache("no image here")
    assert cache.image_layout is None
    with pytest.raises(InputError, match="no component that places images"):
        llama_bridge.image_layout("text")


def test_llava_next_full_strategy_is_refused_clearly() -> None:
    model, processor = tiny_llava_next(vision_feature_select_strategy="full")
    bridge = TransformerBridge.wrap(model, processor=processor)
    with pytest.raises(InputError, match="cannot pack 'full' features"):
        bridge.image_layout("<image>", images=[tiny_image(48)])
