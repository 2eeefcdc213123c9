"""Image layouts for Qwen2-VL and Qwen2.5-VL: tokens -> merged patches -> tower -> pixels.

Each image (dynamic resolution: resized to ``h x w`` patches, multiples of the merge size)
takes one ``<|image_pad|>`` token per 2x2 block of patches, row by row over its
``(h / 2, w / 2)`` grid of blocks; the tokens of the images of a batch row follow each other
in the order of ``image_grid_thw``. A token's feature is the merger's output for the four
patches of its block: the tower lists them one after the other, so `Tile.vision_index` holds
for each token the four places ``[4, 1]`` of its patches in the tower's sequence (which has
no batch dimension). In Qwen2.5-VL the tower's sequence is in window order
(`vision.Grid.block_order`). A block covers ``2 * patch`` pixels of the resized image each
way; the processor only resized the original (no crop, no padding), so its box in the original
is that square scaled back. Videos are not placed, but their tokens count as image tokens in
the layout's masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bridge_core.errors import InputError
from bridge_core.multimodal import ImageLayout, ImagePlacement, LayoutRequest, Tile, VisionRoute
from bridge_llava.layout import Affine, original_sizes
from bridge_qwen2vl.vision import Grid

Size = tuple[int, int]  # (height, width)


def build_layout(
    grid: Grid, image_token_id: int, route: VisionRoute, request: LayoutRequest
) -> ImageLayout | None:
    """The layout of the request's inputs, or None without ``input_ids``.

    Raises:
        InputError: image tokens that do not match ``image_grid_thw``.
    """
    inputs = request.inputs
    ids = inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        return None
    ids = (ids if ids.dim() == 2 else ids.unsqueeze(0)).cpu()
    mask = inputs.get("attention_mask")
    pad = (
        mask.cpu() == 0
        if isinstance(mask, torch.Tensor)
        else torch.zeros_like(ids, dtype=torch.bool)
    )
    grid_thw = inputs.get("image_grid_thw")
    if inputs.get("pixel_values") is None or not isinstance(grid_thw, torch.Tensor):
        layout = ImageLayout([[] for _ in range(ids.shape[0])], pad, route)
        _mark_videos(layout, ids, request)
        return layout
    grid_thw = grid_thw.cpu()
    sizes = request.image_sizes
    if sizes is None and request.images is not None:
        sizes = original_sizes(request.images)
    if sizes is not None and len(sizes) != grid_thw.shape[0]:
        raise InputError(f"{len(sizes)} image sizes for {grid_thw.shape[0]} images")
    tiles = _tiles(grid, grid_thw, sizes)
    layout = ImageLayout(_place(tiles, ids, image_token_id, sizes), pad, route)
    _mark_videos(layout, ids, request)
    return layout


def _mark_videos(layout: ImageLayout, ids: torch.Tensor, request: LayoutRequest) -> None:
    """Count video tokens as image tokens in the masks: the model writes features there too
    (so `decompose_resid` puts them in its image term). The layout places images only."""
    token = getattr(request.hf_config, "video_token_id", None)
    if token is None or request.inputs.get("pixel_values_videos") is None:
        return
    videos = ids == int(token)
    layout.image_mask |= videos
    layout.text_mask &= ~videos


def _tiles(grid: Grid, grid_thw: torch.Tensor, sizes: Sequence[Size] | None) -> list[Tile]:
    """Each image's grid of blocks, positions not yet known (indices among its own tokens)."""
    order, _ = grid.block_order(grid_thw)
    place = torch.argsort(order)  # the tower's place of each block, in the processor's order
    within = torch.arange(grid.unit).view(1, 1, grid.unit, 1)
    tiles, first = [], 0
    for k, (t, h, w) in enumerate(grid_thw.tolist()):
        if t != 1:
            raise InputError(f"image {k} has {t} frames in image_grid_thw; an image has one")
        rows, cols = int(h) // grid.merge, int(w) // grid.merge
        blocks = place[first : first + rows * cols].view(rows, cols, 1, 1)
        first += rows * cols
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        boxes = None
        if sizes is not None:
            height, width = sizes[k]
            resized = (int(h) * grid.patch, int(w) * grid.patch)
            frame = Affine(resized[0] / height, 0.0, resized[1] / width, 0.0)
            boxes = frame.boxes(r, c, grid.patch * grid.merge, (height, width))
        tiles.append(Tile(r * cols + c, blocks * grid.unit + within, boxes))
    return tiles


def _place(
    tiles: list[Tile], ids: torch.Tensor, token_id: int, sizes: Sequence[Size] | None
) -> list[list[ImagePlacement]]:
    """Give each image the next run of image tokens, row by row, as the model fills them in."""
    queues = [(ids[row] == token_id).nonzero().flatten() for row in range(ids.shape[0])]
    rows: list[list[ImagePlacement]] = [[] for _ in queues]
    row, used = 0, 0
    for k, tile in enumerate(tiles):
        n = tile.positions.numel()
        while row < len(queues) and used == len(queues[row]):
            row, used = row + 1, 0
        left = len(queues[row]) - used if row < len(queues) else 0
        if left < n:
            raise InputError(
                f"image {k} takes {n} image tokens, but row {min(row, len(queues) - 1)} of "
                f"input_ids has {left} left (id {token_id}); put one <|vision_start|>"
                "<|image_pad|><|vision_end|> per image in the text and let the processor "
                "expand it"
            )
        positions = queues[row][used : used + n]
        used += n
        placed = Tile(positions[tile.positions], tile.vision_index, tile.boxes)
        size = None if sizes is None else sizes[k]
        rows[row].append(ImagePlacement(k, row, positions, (placed,), size))
    extra = sum(len(q) for q in queues) - sum(t.positions.numel() for t in tiles)
    if extra > 0:
        raise InputError(
            f"input_ids has {extra} image tokens (id {token_id}) more than the {len(tiles)} "
            "image(s) of image_grid_thw take"
        )
    return rows
