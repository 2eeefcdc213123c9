"""Image layouts for LLaVA and LLaVA-NeXT: tokens -> patches -> pixels of the original image.

LLaVA puts one token per patch of the selected features (row-major; CLS first under "full").
LLaVA-NeXT puts the base view's patches, then the high-resolution view stitched from its crops,
unpadded as the model does it, with a newline token after each row (`pack_image_features`).
Pixel boxes invert what the image processor did to the original image: pad to square
(`LlavaImageProcessor`'s `do_pad`), resize, centre crop; for NeXT's crops: resize to the best
grid resolution keeping the aspect ratio, centre the result on the canvas, cut into crops.

Other plugins reuse it (`Tower` says what differs): towers without a CLS token
(``class_tokens=0``, SigLIP), tokens that pool ``merge x merge`` patches (Gemma-3), and
LLaVA-OneVision's rules for tiled images (`Tower.max_crops`: a high-resolution view larger than
that many crops is interpolated down; rows with several images are not tiled). `TileSpec`,
`ImageSpec` and `place` build layouts of other shapes (Idefics3's tiles).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
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
        self,
        rows: torch.Tensor,
        cols: torch.Tensor,
        cell: float | tuple[float, float],
        size: Size,
    ) -> torch.Tensor:
        """``[..., 4]`` boxes in original pixels of frame cells (`rows`, `cols`) of side `cell`
        (or of (height, width) `cell`)."""
        cell_y, cell_x = cell if isinstance(cell, tuple) else (cell, cell)
        y0 = (rows * cell_y - self.oy) / self.sy
        x0 = (cols * cell_x - self.ox) / self.sx
        y1 = ((rows + 1) * cell_y - self.oy) / self.sy
        x1 = ((cols + 1) * cell_x - self.ox) / self.sx
        height, width = size
        return torch.stack(
            [x0.clamp(0, width), y0.clamp(0, height), x1.clamp(0, width), y1.clamp(0, height)],
            dim=-1,
        )


@dataclass(frozen=True)
class Tower:
    """What the layout needs to know about the vision tower and how the model feeds it.

    Attributes:
        class_tokens: tokens in front of the patches in the tower's sequence (CLIP's CLS: 1).
        merge: patches per side that one language-model token pools (1: a token per patch).
        max_crops: LLaVA-OneVision's ``anyres_max_N``: a high-resolution view of more than
            N crops' worth of tokens is interpolated down to about N; None never.
    """

    image_size: int
    patch_size: int
    image_token_id: int
    strategy: str
    anyres: bool
    route: VisionRoute
    class_tokens: int = 1
    merge: int = 1
    max_crops: int | None = None

    @property
    def side(self) -> int:
        """Tokens per side of one tile (patches, or pooled groups of patches)."""
        return self.image_size // self.patch_size // self.merge

    @property
    def cell(self) -> int:
        """Side of the pixels one token shows, in the tower's input frame."""
        return self.patch_size * self.merge

    @property
    def with_cls(self) -> bool:
        """Whether the features fed include the tower's CLS token ("full" on CLIP)."""
        return self.strategy == "full" and self.class_tokens > 0


def original_sizes(images: Any) -> list[Size]:
    """(height, width) of each image the user gave (PIL images, arrays, nested lists)."""
    flatten: Any = make_flat_list_of_images  # typed as returning one image or a list
    flat: list[Any] = flatten(images)
    return [(int(h), int(w)) for h, w in (get_image_size(to_numpy_array(im)) for im in flat)]


@dataclass(frozen=True)
class LayoutInputs:
    """What a layout is made from: the run's ids and pixels, the images' original sizes."""

    ids: torch.Tensor  # [batch, pos], on the CPU
    pixels: torch.Tensor  # pixel_values as the model got them
    sizes: list[Size] | None  # original (height, width) of each image, if known
    image_processor: Any  # the processor's image processor, or None
    request: LayoutRequest


SpecBuilder = Callable[[LayoutInputs], list["ImageSpec"]]
"""Makes the `ImageSpec`s of a run's images, in the order the model consumes them."""


def build_layout(
    tower: Tower, request: LayoutRequest, specs: SpecBuilder | None = None
) -> ImageLayout | None:
    """The layout of the request's inputs, or None without ``input_ids`` (nowhere to place
    images).

    Args:
        specs: makes the images' specs (default: LLaVA's plain or any-resolution images, as
            `tower` says); each image then takes the next of its row's image tokens.
    """
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
    seen = LayoutInputs(
        ids.cpu(), pixels, None if sizes is None else list(sizes), image_processor, request
    )
    made = (specs or (lambda s: _llava_specs(tower, s)))(seen)
    rows = place(made, seen.ids, tower.image_token_id)
    return ImageLayout(rows, pad.cpu(), tower.route)


def _llava_specs(tower: Tower, seen: LayoutInputs) -> list[ImageSpec]:
    if tower.anyres:
        sizes = _anyres_sizes(seen.sizes)
        tiled = _tiled(seen.request.inputs.get("batch_num_images"), len(sizes))
        hf_config = seen.request.hf_config
        return _anyres_specs(tower, sizes, seen.image_processor, hf_config, tiled)
    return plain_specs(tower, seen.pixels.shape[0], seen.sizes, seen.image_processor)


def _tiled(batch_num_images: Any, n_images: int) -> list[bool]:
    """Which images are tiled: all, unless the processor says a row has several images
    (``batch_num_images``, LLaVA-OneVision), whose images are then not tiled."""
    if batch_num_images is None:
        return [True] * n_images
    counts = [int(n) for n in batch_num_images]
    return [n == 1 for n in counts for _ in range(n)]


# -- what each image looks like, before it is placed ------------------------------------


@dataclass(frozen=True)
class TileSpec:
    """A `Tile` before it is placed: indices among its image's tokens instead of positions.

    Attributes:
        cells: ``[rows, cols]`` index of each cell's token among the image's tokens.
        vision: ``[rows, cols, 2]`` (row of the tower's batch, token index) of each cell.
        boxes: ``[rows, cols, 4]`` pixel boxes in the original image, or None.
        newlines: indices of the row-end tokens among the image's tokens.
        crops: (rows, cols) of crops the tile is stitched from.
    """

    cells: torch.Tensor
    vision: torch.Tensor
    boxes: torch.Tensor | None
    newlines: torch.Tensor
    crops: Size


@dataclass(frozen=True)
class ImageSpec:
    """An image before it is placed: how many image tokens it takes, and its tiles.

    Attributes:
        n_tokens: image tokens it takes (in the order the model fills them in).
        tiles: its tiles, indexing into those tokens.
        size: (height, width) of the original image, or None.
        cls: index of the CLS token among its tokens, if one is fed.
    """

    n_tokens: int
    tiles: tuple[TileSpec, ...]
    size: Size | None
    cls: int | None


def plain_specs(
    tower: Tower, n_images: int, sizes: Sequence[Size] | None, image_processor: Any
) -> list[ImageSpec]:
    """One tile per image, a token per cell of the tower's grid (LLaVA, PaliGemma, Gemma-3).

    Raises:
        InputError: as many sizes as images were not given.
    """
    if sizes is not None and len(sizes) != n_images:
        raise InputError(f"{len(sizes)} image sizes for {n_images} images")
    g = tower.side
    full = int(tower.with_cls)
    rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    specs = []
    for k in range(n_images):
        size = sizes[k] if sizes is not None else None
        frame = processed_frame(size, image_processor) if size is not None else None
        boxes = None if frame is None or size is None else frame.boxes(rows, cols, tower.cell, size)
        token = tower.class_tokens + rows * g + cols
        vision = torch.stack([torch.full_like(rows, k), token], dim=-1)
        cells = rows * g + cols + full
        tile = TileSpec(cells, vision, boxes, torch.empty(0, dtype=torch.long), (1, 1))
        specs.append(ImageSpec(g * g + full, (tile,), size, 0 if full else None))
    return specs


def _anyres_sizes(sizes: Sequence[Size] | None) -> list[Size]:
    if sizes is not None:
        return list(sizes)
    raise InputError(
        "an any-resolution model's layout needs each image's original size: pass "
        "image_sizes (the processor makes it) or the images"
    )


def _anyres_specs(
    tower: Tower,
    sizes: Sequence[Size],
    image_processor: Any,
    hf_config: Any,
    tiled: Sequence[bool],
) -> list[ImageSpec]:
    if tower.with_cls:
        raise InputError(
            "LLaVA-NeXT cannot pack 'full' features (with CLS) of tiled images: HF's "
            "pack_image_features fails on them too; use vision_feature_select_strategy='default'"
        )
    if tower.class_tokens == 0 and tower.strategy == "default":
        raise InputError(
            "this tower has no CLS token, so vision_feature_select_strategy='default' drops "
            "the first patch of every crop and the processor's token count no longer fits; "
            "use 'full' (as the released checkpoints do)"
        )
    if len(tiled) != len(sizes):
        raise InputError(
            f"batch_num_images counts {len(tiled)} images, but {len(sizes)} were given"
        )
    pinpoints = [list(p) for p in hf_config.image_grid_pinpoints]
    specs, first_crop = [], 0
    for size, tile in zip(sizes, tiled, strict=True):
        n_crops = (
            hf_next.image_size_to_num_patches(size, pinpoints, tower.image_size) if tile else 1
        )
        if n_crops == 1:
            specs.append(_lone_spec(tower, size, first_crop, image_processor, tile))
        else:
            specs.append(_anyres_spec(tower, size, first_crop, pinpoints, image_processor))
        first_crop += n_crops
    return specs


def _base_tile(tower: Tower, first_crop: int, frame: Affine | None, size: Size) -> TileSpec:
    g = tower.side
    rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    return TileSpec(
        rows * g + cols,
        torch.stack([torch.full_like(rows, first_crop), tower.class_tokens + rows * g + cols], -1),
        None if frame is None else frame.boxes(rows, cols, tower.cell, size),
        torch.empty(0, dtype=torch.long),
        (1, 1),
    )


def _lone_spec(
    tower: Tower, size: Size, first_crop: int, image_processor: Any, tiled: bool
) -> ImageSpec:
    """The base view alone, with the one newline token HF appends to it. An image that is not
    tiled (a row with several images, LLaVA-OneVision) was padded to a square first."""
    frame = _base_frame(size, image_processor) if tiled else processed_frame(size, image_processor)
    base = _base_tile(tower, first_crop, frame, size)
    g = tower.side
    lone = TileSpec(base.cells, base.vision, base.boxes, torch.tensor([g * g]), (1, 1))
    return ImageSpec(g * g + 1, (lone,), size, None)


def _anyres_spec(
    tower: Tower,
    size: Size,
    first_crop: int,
    pinpoints: list[list[int]],
    image_processor: Any,
) -> ImageSpec:
    g = tower.side
    base = _base_tile(tower, first_crop, _base_frame(size, image_processor), size)
    # HF's own functions (untyped), so that the grid and its unpadding are the model's
    grid_shape: Any = hf_next.get_anyres_image_grid_shape
    unpad: Any = hf_next.unpad_image
    crop_rows, crop_cols = grid_shape(size, pinpoints, tower.image_size)
    full = torch.arange(crop_rows * g * crop_cols * g).view(1, crop_rows * g, crop_cols * g)
    kept = unpad(full, size)[0]  # exactly the rows / columns the model keeps
    grid = _HighGrid.of(kept, crop_cols * g, tower.max_crops, g)
    n_rows, n_cols = grid.shape
    crop = 1 + (grid.big_rows // g) * crop_cols + grid.big_cols // g
    token = tower.class_tokens + (grid.big_rows % g) * g + grid.big_cols % g
    local_r, local_c = torch.meshgrid(torch.arange(n_rows), torch.arange(n_cols), indexing="ij")
    cells = g * g + local_r * (n_cols + 1) + local_c
    frame = _canvas_frame(size, pinpoints, image_processor)
    cell = tower.cell * _crop_pixels(image_processor, tower.image_size) / tower.image_size
    high = TileSpec(
        cells,
        torch.stack([first_crop + crop, token], dim=-1),
        None if frame is None else frame.boxes(*grid.box_cells(), grid.cell(cell), size),
        g * g + torch.arange(n_rows) * (n_cols + 1) + n_cols,
        (int(crop_rows), int(crop_cols)),
    )
    return ImageSpec(g * g + n_rows * (n_cols + 1), (base, high), size, None)


@dataclass(frozen=True)
class _HighGrid:
    """The high-resolution view's token grid on the stitched crops ("big" grid).

    Without interpolation each token is one cell of the big grid. LLaVA-OneVision shrinks a
    view larger than ``max_crops`` crops by bilinear interpolation: each token then mixes the
    cells around its centre; `big_rows` / `big_cols` name the nearest one, and its box covers
    ``scale`` big cells per side.
    """

    big_rows: torch.Tensor  # [rows, cols]: the big-grid cell each token comes from
    big_cols: torch.Tensor
    origin: tuple[int, int]  # the first kept big-grid cell
    scale: tuple[float, float]  # big cells per token, per side

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.big_rows.shape
        return int(rows), int(cols)

    @classmethod
    def of(cls, kept: torch.Tensor, width: int, max_crops: int | None, g: int) -> _HighGrid:
        big_rows, big_cols = kept // width, kept % width
        origin = (int(big_rows[0, 0]), int(big_cols[0, 0]))
        n_rows, n_cols = kept.shape
        ratio = math.sqrt(n_rows * n_cols / (max_crops * g * g)) if max_crops else 0.0
        if ratio <= 1.1:  # as LLaVA-OneVision's pack_image_features decides
            return cls(big_rows, big_cols, origin, (1.0, 1.0))
        rows, cols = int(n_rows // ratio), int(n_cols // ratio)
        scale = (n_rows / rows, n_cols / cols)
        near_r = ((torch.arange(rows) + 0.5) * scale[0]).long().clamp(max=n_rows - 1)
        near_c = ((torch.arange(cols) + 0.5) * scale[1]).long().clamp(max=n_cols - 1)
        r, c = torch.meshgrid(near_r, near_c, indexing="ij")
        return cls(big_rows[r, c], big_cols[r, c], origin, scale)

    def box_cells(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols) in units of one token's cell, for `Affine.boxes`."""
        rows, cols = self.shape
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        return r + self.origin[0] / self.scale[0], c + self.origin[1] / self.scale[1]

    def cell(self, big_cell: float) -> tuple[float, float]:
        """(height, width) in canvas pixels of one token's cell."""
        return big_cell * self.scale[0], big_cell * self.scale[1]


# -- placing images in the sequence ------------------------------------------------------


def place(specs: list[ImageSpec], ids: torch.Tensor, token_id: int) -> list[list[ImagePlacement]]:
    """Give each image its next `n_tokens` image tokens, row-major, as HF fills them in.

    Raises:
        InputError: the image tokens of `ids` do not fit the images.
    """
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


def processed_frame(size: Size, image_processor: Any) -> Affine | None:
    """Original pixels -> the pixel_values frame: the processor's pad to square (where it
    has one), resize and centre crop; None for an image processor whose rule we lack."""
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
