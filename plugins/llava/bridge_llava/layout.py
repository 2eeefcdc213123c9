"""Image layouts for LLaVA and LLaVA-NeXT: tokens -> patches -> pixels of the original image.

LLaVA puts one token per patch of the selected features (row-major; CLS first under "full").
LLaVA-NeXT puts the base view's patches, then the high-resolution view stitched from its crops,
unpadded as the model does it, with a newline token after each row (`pack_image_features`).
Pixel boxes invert what the image processor did to the original image: pad to square
(`LlavaImageProcessor`'s `do_pad`), resize, centre crop; for NeXT's crops: resize to the best
grid resolution keeping the aspect ratio, centre the result on the canvas, cut into crops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.image_processing_utils import select_best_resolution
from transformers.image_utils import get_image_size, make_flat_list_of_images, to_numpy_array
from transformers.models.llava_next import modeling_llava_next as hf_next

from bridge_core.errors import InputError
from bridge_core.multimodal import ImageLayout, ImagePlacement, LayoutRequest, Tile, VisionRoute

Size = tuple[int, int]  # (height, width)


@dataclass(frozen=True)
class Affine:
    """Original-image pixels -> processed-frame pixels, per axis: ``frame = orig * s + o``."""

    sy: float = 1.0
    oy: float = 0.0
    sx: float = 1.0
    ox: float = 0.0

    def then(self, sy: float, oy: float, sx: float, ox: float) -> Affine:
        """This map followed by ``frame' = frame * s + o``."""
        return Affine(self.sy * sy, self.oy * sy + oy, self.sx * sx, self.ox * sx + ox)

    def boxes(
        self, rows: torch.Tensor, cols: torch.Tensor, cell: float, size: Size
    ) -> torch.Tensor:
        """``[..., 4]`` boxes in original pixels of frame cells (`rows`, `cols`) of side `cell`."""
        y0 = (rows * cell - self.oy) / self.sy
        x0 = (cols * cell - self.ox) / self.sx
        y1 = ((rows + 1) * cell - self.oy) / self.sy
        x1 = ((cols + 1) * cell - self.ox) / self.sx
        height, width = size
        return torch.stack(
            [x0.clamp(0, width), y0.clamp(0, height), x1.clamp(0, width), y1.clamp(0, height)],
            dim=-1,
        )


@dataclass(frozen=True)
class Tower:
    """What the layout needs to know about the vision tower and how LLaVA feeds it."""

    image_size: int
    patch_size: int
    image_token_id: int
    strategy: str
    anyres: bool
    route: VisionRoute

    @property
    def side(self) -> int:
        """Patches per side of one tile."""
        return self.image_size // self.patch_size


def original_sizes(images: Any) -> list[Size]:
    """(height, width) of each image the user gave (PIL images, arrays, nested lists)."""
    flatten: Any = make_flat_list_of_images  # typed as returning one image or a list
    flat: list[Any] = flatten(images)
    return [(int(h), int(w)) for h, w in (get_image_size(to_numpy_array(im)) for im in flat)]


def build_layout(tower: Tower, request: LayoutRequest) -> ImageLayout | None:
    """The layout of the request's inputs, or None without ``input_ids`` (nowhere to place
    images)."""
    inputs, sizes = request.inputs, request.image_sizes
    if sizes is None and request.images is not None:
        sizes = original_sizes(request.images)
    ids = inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        return None
    ids = ids if ids.dim() == 2 else ids.unsqueeze(0)
    mask = inputs.get("attention_mask")
    pad = mask == 0 if isinstance(mask, torch.Tensor) else torch.zeros_like(ids, dtype=torch.bool)
    pixels = inputs.get("pixel_values")
    if not isinstance(pixels, torch.Tensor):
        return ImageLayout([[] for _ in range(ids.shape[0])], pad.cpu(), tower.route)
    image_processor = getattr(request.processor, "image_processor", None)
    if tower.anyres:
        sizes = _anyres_sizes(sizes)
        specs = _anyres_specs(tower, sizes, image_processor, request.hf_config)
    else:
        specs = _plain_specs(tower, pixels.shape[0], sizes, image_processor)
    rows = _place(specs, ids.cpu(), tower.image_token_id)
    return ImageLayout(rows, pad.cpu(), tower.route)


# -- what each image looks like, before it is placed ------------------------------------


@dataclass(frozen=True)
class _TileSpec:
    cells: torch.Tensor  # [rows, cols]: index of each patch among the image's tokens
    vision: torch.Tensor  # [rows, cols, 2]
    boxes: torch.Tensor | None
    newlines: torch.Tensor  # indices among the image's tokens
    crops: Size


@dataclass(frozen=True)
class _ImageSpec:
    n_tokens: int
    tiles: tuple[_TileSpec, ...]
    size: Size | None
    cls: int | None  # index of the CLS token among the image's tokens


def _plain_specs(
    tower: Tower, n_images: int, sizes: Sequence[Size] | None, image_processor: Any
) -> list[_ImageSpec]:
    if sizes is not None and len(sizes) != n_images:
        raise InputError(f"{len(sizes)} image sizes for {n_images} images")
    g = tower.side
    full = tower.strategy == "full"
    rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    specs = []
    for k in range(n_images):
        size = sizes[k] if sizes is not None else None
        frame = _frame(size, image_processor) if size is not None else None
        boxes = (
            None
            if frame is None or size is None
            else frame.boxes(rows, cols, tower.patch_size, size)
        )
        vision = torch.stack([torch.full_like(rows, k), 1 + rows * g + cols], dim=-1)
        cells = rows * g + cols + int(full)
        tile = _TileSpec(cells, vision, boxes, torch.empty(0, dtype=torch.long), (1, 1))
        specs.append(_ImageSpec(g * g + int(full), (tile,), size, 0 if full else None))
    return specs


def _anyres_sizes(sizes: Sequence[Size] | None) -> list[Size]:
    if sizes is not None:
        return list(sizes)
    raise InputError(
        "an any-resolution model's layout needs each image's original size: pass "
        "image_sizes (the processor makes it) or the images"
    )


def _anyres_specs(
    tower: Tower, sizes: Sequence[Size], image_processor: Any, hf_config: Any
) -> list[_ImageSpec]:
    if tower.strategy == "full":
        raise InputError(
            "LLaVA-NeXT cannot pack 'full' features (with CLS) of tiled images: HF's "
            "pack_image_features fails on them too; use vision_feature_select_strategy='default'"
        )
    pinpoints = [list(p) for p in hf_config.image_grid_pinpoints]
    specs, first_crop = [], 0
    for size in sizes:
        n_crops = hf_next.image_size_to_num_patches(size, pinpoints, tower.image_size)
        specs.append(_anyres_spec(tower, size, first_crop, n_crops, pinpoints, image_processor))
        first_crop += n_crops
    return specs


def _anyres_spec(
    tower: Tower,
    size: Size,
    first_crop: int,
    n_crops: int,
    pinpoints: list[list[int]],
    image_processor: Any,
) -> _ImageSpec:
    g = tower.side
    rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    base_frame = _base_frame(size, image_processor)
    base = _TileSpec(
        rows * g + cols,
        torch.stack([torch.full_like(rows, first_crop), 1 + rows * g + cols], dim=-1),
        None if base_frame is None else base_frame.boxes(rows, cols, tower.patch_size, size),
        torch.empty(0, dtype=torch.long),
        (1, 1),
    )
    if n_crops == 1:  # HF appends one newline token to a lone base view
        lone = _TileSpec(base.cells, base.vision, base.boxes, torch.tensor([g * g]), (1, 1))
        return _ImageSpec(g * g + 1, (lone,), size, None)
    # HF's own functions (untyped), so that the grid and its unpadding are the model's
    grid_shape: Any = hf_next.get_anyres_image_grid_shape
    unpad: Any = hf_next.unpad_image
    crop_rows, crop_cols = grid_shape(size, pinpoints, tower.image_size)
    full = torch.arange(crop_rows * g * crop_cols * g).view(1, crop_rows * g, crop_cols * g)
    kept = unpad(full, size)[0]  # exactly the rows / columns the model keeps
    big_rows, big_cols = kept // (crop_cols * g), kept % (crop_cols * g)
    n_rows, n_cols = kept.shape
    crop = 1 + (big_rows // g) * crop_cols + big_cols // g
    token = 1 + (big_rows % g) * g + big_cols % g
    local_r, local_c = torch.meshgrid(torch.arange(n_rows), torch.arange(n_cols), indexing="ij")
    cells = g * g + local_r * (n_cols + 1) + local_c
    frame = _canvas_frame(size, pinpoints, image_processor)
    cell = tower.patch_size * _crop_pixels(image_processor, tower.image_size) / tower.image_size
    high = _TileSpec(
        cells,
        torch.stack([first_crop + crop, token], dim=-1),
        None if frame is None else frame.boxes(big_rows, big_cols, cell, size),
        g * g + torch.arange(n_rows) * (n_cols + 1) + n_cols,
        (int(crop_rows), int(crop_cols)),
    )
    return _ImageSpec(g * g + n_rows * (n_cols + 1), (base, high), size, None)


# -- placing images in the sequence ------------------------------------------------------


def _place(specs: list[_ImageSpec], ids: torch.Tensor, token_id: int) -> list[list[ImagePlacement]]:
    """Give each image the next run of image tokens, row-major, as HF fills them in."""
    queues = [(ids[row] == token_id).nonzero().flatten() for row in range(ids.shape[0])]
    rows: list[list[ImagePlacement]] = [[] for _ in queues]
    row, used = 0, 0
    for k, spec in enumerate(specs):
        while row < len(queues) and used == len(queues[row]):
            row, used = row + 1, 0
        if row == len(queues) or len(queues[row]) - used < spec.n_tokens:
            left = 0 if row == len(queues) else len(queues[row]) - used
            where = min(row, len(queues) - 1)
            raise InputError(
                f"image {k} takes {spec.n_tokens} image tokens, but row {where} "
                f"of input_ids has {left} left (id {token_id}); put one placeholder per image "
                "in the text and let the processor expand it"
            )
        positions = queues[row][used : used + spec.n_tokens]
        used += spec.n_tokens
        tiles = tuple(
            Tile(positions[t.cells], t.vision, t.boxes, positions[t.newlines], t.crops)
            for t in spec.tiles
        )
        cls = None if spec.cls is None else int(positions[spec.cls])
        rows[row].append(ImagePlacement(k, row, positions, tiles, spec.size, cls))
    left = sum(len(q) for q in queues[row:]) - used if row < len(queues) else 0
    if left:
        raise InputError(
            f"input_ids has {left} image tokens (id {token_id}) more than the {len(specs)} "
            "image(s) take"
        )
    return rows


# -- pixel geometry of the image processor ----------------------------------------------


def _get(size: Any, key: str) -> int | None:
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return None if value is None else int(value)


def _resize_to(size: Size, target: Any) -> Size | None:
    """The (height, width) the processor resizes `size` to, or None for a rule we lack."""
    height, width = size
    shortest, longest = _get(target, "shortest_edge"), _get(target, "longest_edge")
    if _get(target, "height") and _get(target, "width"):
        return _get(target, "height") or 0, _get(target, "width") or 0
    if shortest and not longest:  # transformers' get_resize_output_image_size
        short, long = min(height, width), max(height, width)
        new_long = int(shortest * long / short)
        return (new_long, shortest) if width <= height else (shortest, new_long)
    return None


def _resize_and_crop(frame: Affine, size: Size, image_processor: Any) -> Affine | None:
    """`frame` followed by the processor's resize and centre crop of a `size` image."""
    if getattr(image_processor, "do_resize", False):
        new = _resize_to(size, image_processor.size)
        if new is None:
            return None
        frame = frame.then(new[0] / size[0], 0.0, new[1] / size[1], 0.0)
        size = new
    if getattr(image_processor, "do_center_crop", False):
        crop_h, crop_w = (
            _get(image_processor.crop_size, "height"),
            _get(image_processor.crop_size, "width"),
        )
        if not crop_h or not crop_w:
            return None
        frame = frame.then(1.0, -_crop_start(size[0], crop_h), 1.0, -_crop_start(size[1], crop_w))
    return frame


def _crop_start(length: int, crop: int) -> int:
    """Where transformers' centre crop starts (negative: the image is padded)."""
    return (length - crop) // 2 if length >= crop else -math.ceil((crop - length) / 2)


def _frame(size: Size, image_processor: Any) -> Affine | None:
    """LLaVA: original pixels -> the pixel_values frame."""
    if image_processor is None:
        return None
    frame = Affine()
    height, width = size
    if getattr(image_processor, "do_pad", False) and hasattr(image_processor, "pad_to_square"):
        side = max(height, width)
        frame = frame.then(
            1.0,
            (side - height) // 2 if width > height else 0,
            1.0,
            (side - width) // 2 if height > width else 0,
        )
        size = (side, side)
    return _resize_and_crop(frame, size, image_processor)


def _square_side(image_processor: Any) -> int | None:
    size = image_processor.size
    return _get(size, "height") or _get(size, "shortest_edge")


def _base_frame(size: Size, image_processor: Any) -> Affine | None:
    """LLaVA-NeXT's base view: the whole image resized to a square, then resize and crop."""
    side = None if image_processor is None else _square_side(image_processor)
    if side is None:
        return None
    frame = Affine(side / size[0], 0.0, side / size[1], 0.0)
    return _resize_and_crop(frame, (side, side), image_processor)


def _crop_pixels(image_processor: Any, image_size: int) -> int:
    if image_processor is None:
        return image_size
    return _get(image_processor.crop_size, "height") or _square_side(image_processor) or image_size


def _canvas_frame(size: Size, pinpoints: list[list[int]], image_processor: Any) -> Affine | None:
    """LLaVA-NeXT's crops: resized into the best resolution, centred, padded (a canvas)."""
    if image_processor is None:
        return None
    best_h, best_w = select_best_resolution(size, pinpoints)
    height, width = size
    scale_w, scale_h = best_w / width, best_h / height
    if scale_w < scale_h:  # transformers' get_patch_output_size
        new_h, new_w = min(math.ceil(height * scale_w), best_h), best_w
    else:
        new_h, new_w = best_h, min(math.ceil(width * scale_h), best_w)
    return Affine(new_h / height, (best_h - new_h) // 2, new_w / width, (best_w - new_w) // 2)
