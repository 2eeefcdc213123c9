"""Image layouts of the SigLIP families, checked against what the model itself computed.

As for LLaVA (tests/plugins/llava/test_llava_layout.py), three checks tie a language-model
position to its image: the residual stream there is the projected feature of the (view,
token) the layout names; the patch embeddings of the patches that token pools are the
tower's convolution of the pixel blocks, plus their position embeddings; and those pixels show
the part of the original image that `pixel_box` names (a colour ramp says where a pixel was).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from bridge_core import TransformerBridge
from bridge_core.multimodal import ImagePlacement, Tile, attention_to_image
from bridge_core.patching import patch_image_patches
from bridge_llava.tiny import tiny_image
from bridge_siglip.tiny import tiny_gemma3, tiny_llava_onevision


def ramp(width: int, height: int) -> Image.Image:
    """Red grows with x, green with y: a pixel's colour says where it is."""
    red, green = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    blue = np.full_like(red, 128)
    return Image.fromarray(np.stack([red, green, blue], -1).round().astype(np.uint8))


def merge_of(bridge: TransformerBridge) -> int:
    """Patches per side one language-model token pools."""
    return {"gemma3": 2, "idefics3": 2}.get(bridge.adapter.name, 1)


def cells(tile: Tile, bridge: TransformerBridge) -> list[tuple[int, int, int, int]]:
    """(view, patch row, patch col, token) of every patch the tile's tokens pool."""
    merge = merge_of(bridge)
    side = bridge.vision_encoder.image_size // bridge.vision_encoder.patch_size // merge
    found = []
    for view, token in tile.vision_index.flatten(0, 1).tolist():
        row, col = divmod(token, side)
        for i in range(merge):
            for j in range(merge):
                found.append((view, row * merge + i, col * merge + j, token))
    return found


def check_against_the_run(bridge: TransformerBridge, cache: Any, image: ImagePlacement) -> None:
    resid = cache["blocks.0.hook_resid_pre"][image.row]
    projected = cache["vision_projector.hook_out"]  # [views, tokens, d_model]
    pixels = cache["vision_encoder.hook_in"]  # every view the tower saw
    embedded = cache["hook_vision_embed"]  # [views, patches, hidden]
    embeddings = bridge.vision_encoder.embeddings.original_component
    p = bridge.vision_encoder.patch_size
    side = bridge.vision_encoder.image_size // p
    for t, tile in enumerate(image.tiles):
        views, tokens = tile.vision_index.unbind(-1)
        assert torch.equal(resid[tile.positions], projected[views, tokens])
        for view, row, col, _ in cells(tile, bridge):
            block = pixels[view, :, row * p : (row + 1) * p, col * p : (col + 1) * p]
            with torch.no_grad():
                conv = embeddings.patch_embedding(block[None]).flatten()
                conv = conv + embeddings.position_embedding.weight[row * side + col]
            assert torch.allclose(conv, embedded[view, row * side + col], atol=1e-5)
        corner = (tile.grid[0] - 1, tile.grid[1] - 1)
        assert image.token_patch(int(tile.positions[corner])) == (t, *corner)


def test_tokens_patches_and_embeddings(
    bridge: TransformerBridge, inputs: dict[str, Any], name: str
) -> None:
    with torch.no_grad():
        _, cache = bridge.run_with_cache(**inputs)
    layout = cache.image_layout
    assert [len(images) for images in layout] == [1, 2]
    assert [im.index for im in layout.images] == [0, 1, 2]
    token = bridge.vision_encoder.image_token_id
    assert torch.equal(layout.image_mask, inputs["input_ids"] == token)
    assert torch.equal(layout.pad_mask, inputs["attention_mask"] == 0)
    for image in layout.images:
        check_against_the_run(bridge, cache, image)
    expected_grid = {"gemma3": (2, 2), "idefics3": (2, 2)}.get(name, (4, 4))
    assert all(im.grid == expected_grid for im in layout.images)


def test_layout_without_images_and_from_pixel_values(
    bridge: TransformerBridge, inputs: dict[str, Any]
) -> None:
    assert bridge.image_layout("no image here")[0] == []
    given = bridge.image_layout(**inputs)  # no original sizes: positions, no pixel boxes
    assert [len(im.positions) for im in given.images] == [
        len(im.positions) for im in bridge.image_layout(**inputs).images
    ]


def mean_positions(
    bridge: TransformerBridge, tile: Tile, pixels: torch.Tensor, image: Image.Image
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each cell whose box is not clipped: the (x, y) its pixels' colour says, and the
    centre of its box, in the original image's pixels."""
    merge, p = merge_of(bridge), bridge.vision_encoder.patch_size
    side = bridge.vision_encoder.image_size // p // merge
    colour = (pixels * 0.5 + 0.5) * 255  # every family here normalizes with mean = std = 0.5
    assert tile.boxes is not None
    sizes = (tile.boxes[..., 2:] - tile.boxes[..., :2]).flatten(0, 1)
    full = (sizes > sizes.max(0).values - 1e-3).all(-1)
    said, centres = [], []
    for (view, token), box, keep in zip(
        tile.vision_index.flatten(0, 1).tolist(), tile.boxes.flatten(0, 1), full, strict=True
    ):
        if not keep:
            continue
        r, c = divmod(token, side)
        cell = p * merge
        block = colour[view, :, r * cell : (r + 1) * cell, c * cell : (c + 1) * cell]
        red, green = block[0].mean(), block[1].mean()
        said.append([red / 255 * (image.width - 1) + 0.5, green / 255 * (image.height - 1) + 0.5])
        centres.append([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
    return torch.tensor(said), torch.tensor(centres)


@pytest.mark.parametrize("size", [(64, 40), (40, 64), (50, 50)])
def test_pixel_boxes_show_the_pixels_of_the_block(
    size: tuple[int, int], bridge: TransformerBridge, model_and_processor: Any
) -> None:
    picture = ramp(*size)
    _, processor = model_and_processor
    text = getattr(processor, "boi_token", None) or processor.image_token
    _, cache = bridge.run_with_cache(
        f"{text} Hi", images=[[picture]], names_filter="vision_encoder.hook_in"
    )
    (image,) = cache.image_layout[0]
    assert image.size == (size[1], size[0])
    for tile in image.tiles:
        said, centres = mean_positions(bridge, tile, cache["vision_encoder.hook_in"], picture)
        assert len(said) >= tile.grid[0] * tile.grid[1] // 2
        assert (said - centres).abs().max() < 1.0, (bridge.adapter.name, tile.grid)  # pixels
    x0, y0, x1, y1 = image.pixel_box(int(image.tiles[0].positions[0, 0]))
    assert 0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1]


def test_attention_maps_and_patch_sweeps_work_unchanged(
    bridge: TransformerBridge, inputs: dict[str, Any]
) -> None:
    with torch.no_grad():
        _, cache = bridge.run_with_cache(**inputs)
    image = cache.image_layout.image(0, batch=1)
    grids = attention_to_image(cache, layer=-1, image=0, batch=1)
    shapes = [t.grid for t in image.tiles]
    got = [grids] if isinstance(grids, torch.Tensor) else grids
    assert [tuple(g.shape) for g in got] == shapes

    def metric(output: Any) -> torch.Tensor:
        return output[1, -1].logsumexp(-1)

    corrupted = {k: v.clone() for k, v in inputs.items()}
    corrupted["pixel_values"] = inputs["pixel_values"].flip(-1)  # mirrored (Idefics3 drops
    # all-zero views as padding)
    result = patch_image_patches(bridge, corrupted, cache, metric, image=0, batch=1, progress=False)
    assert len(result.values) == sum(r * c for r, c in shapes)


# -- family-specific ------------------------------------------------------------------------


def test_gemma3_pan_and_scan_crops_are_tiles_of_their_image() -> None:
    model, processor = tiny_gemma3()
    bridge = TransformerBridge.wrap(model, processor=processor)
    wide = ramp(600, 256)  # ratio 2.3: two 300 x 256 crops (the processor's defaults)
    inputs = processor(
        text=["<start_of_image> Wide?"], images=[[wide]], return_tensors="pt", do_pan_and_scan=True
    )
    _, cache = bridge.run_with_cache(**inputs)
    assert cache["vision_encoder.hook_in"].shape[0] == 3  # the image, then two crops
    layout = bridge.image_layout(**inputs, image_sizes=[(256, 600)])
    (image,) = layout[0]
    assert len(image.tiles) == 3
    check_against_the_run(bridge, cache, image)
    assert image.pixel_box(int(image.tiles[2].positions[0, 0]))[0] == pytest.approx(300.0)
    assert image.pixel_box(int(image.tiles[0].positions[0, 1]))[0] == pytest.approx(300.0)


def test_llava_onevision_rows_with_several_images_are_not_tiled(
    bridge: TransformerBridge, name: str
) -> None:
    if name != "llava_onevision":
        return
    images = [[tiny_image(64)], [tiny_image(48), tiny_image(40)]]
    _, cache = bridge.run_with_cache(["<image> One", "<image> and <image>"], images=images)
    one, *two = cache.image_layout.images
    assert len(one.tiles) == 2 and [len(im.tiles) for im in two] == [1, 1]
    for image in (one, *two):
        check_against_the_run(bridge, cache, image)
    lone = two[0].tiles[0]
    assert len(lone.newline_positions) == 1 and len(two[0].positions) == 17


def test_llava_onevision_interpolated_views() -> None:
    model, processor = tiny_llava_onevision(vision_aspect_ratio="anyres_max_1")
    bridge = TransformerBridge.wrap(model, processor=processor)
    _, cache = bridge.run_with_cache("<image> Big", images=[tiny_image(64)])
    (image,) = cache.image_layout[0]
    high = image.tiles[1]
    assert high.crops == (2, 2) and high.grid == (4, 4)  # 8 x 8 patches shrunk to 4 x 4
    assert len(image.positions) == 16 + 4 * 5
    newline = model.model.image_newline
    resid = cache["blocks.0.hook_resid_pre"][0]
    assert torch.equal(resid[high.newline_positions], newline.expand(4, -1))
    boxes = high.boxes
    assert boxes is not None and torch.allclose(boxes[0, 0], torch.tensor([0.0, 0.0, 16.0, 16.0]))
