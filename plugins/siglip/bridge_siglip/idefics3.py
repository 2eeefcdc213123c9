"""Idefics3's (and SmolVLM's) image layout: tiles plus a global view, pixel-shuffled tokens.

The image processor scales an image's longest edge to ``size["longest_edge"]``, then (with
``do_image_splitting``) up to multiples of ``max_image_size`` on both sides, cuts that into
tiles of ``max_image_size`` and adds the whole image squeezed to one tile (the global view).
Each view runs through the tower; the connector's pixel shuffle turns each ``s x s`` block of
patches (``s = scale_factor``) into one token. In the text, each view is a run of image tokens
after a tag: ``<row_r_col_c>`` for tile (r, c), ``<global-img>`` for the global view, which
closes the image. The layout reads the tags, so it follows the tokens the model got.

Tiles of an `ImagePlacement`: the global view first (the image's base grid), then the tiles
stitched into one high-resolution grid (``crops`` = (rows, cols) of tiles), as LLaVA-NeXT's.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from transformers.models.idefics3 import image_processing_pil_idefics3 as hf_idefics3

from bridge_core.errors import InputError
from bridge_core.multimodal import ImageLayout, LayoutRequest, VisionRoute
from bridge_llava import layout
from bridge_llava.layout import Affine, ImageSpec, LayoutInputs, Size, TileSpec
from bridge_llava.tower import VisionTowerBridge

_TILE = re.compile(r"<row_(\d+)_col_(\d+)>")
GLOBAL_TAG = "<global-img>"


@dataclass(frozen=True)
class Views:
    """The views of one image as its tags say: its tile grid (0 x 0 for none)."""

    rows: int
    cols: int

    @property
    def count(self) -> int:
        """Views through the tower: the tiles, then the global view."""
        return self.rows * self.cols + 1


def build_layout(
    tower: VisionTowerBridge, token: int, route: VisionRoute, request: LayoutRequest
) -> ImageLayout | None:
    """Idefics3's layout of the request (see the module doc)."""
    scale = int(getattr(request.hf_config, "scale_factor", 2) or 2)
    spec = layout.Tower(
        tower.image_size,
        tower.patch_size,
        token,
        "full",
        False,
        route,
        class_tokens=0,
        merge=scale,
    )
    return layout.build_layout(spec, request, lambda seen: _specs(spec, seen))


def _specs(tower: layout.Tower, seen: LayoutInputs) -> list[ImageSpec]:
    tokenizer = getattr(seen.request.processor, "tokenizer", None)
    if tokenizer is None:
        raise InputError(
            "Idefics3's image layout reads the tile tags of the text (<row_1_col_1>, "
            "<global-img>): it needs the model's processor; wrap(model, processor=...)"
        )
    views = [v for row in seen.ids for v in image_views(row, tower.image_token_id, tokenizer)]
    if seen.sizes is not None and len(seen.sizes) != len(views):
        raise InputError(f"{len(seen.sizes)} image sizes for the {len(views)} images in the text")
    specs, first = [], 0
    for k, image in enumerate(views):
        size = None if seen.sizes is None else seen.sizes[k]
        specs.append(_image(tower, image, size, first, seen.image_processor))
        first += image.count
    return specs


def image_views(ids: torch.Tensor, image_token: int, tokenizer: Any) -> list[Views]:
    """The images of one row of ``input_ids``, from the tags before their runs of tokens.

    Raises:
        InputError: a run of image tokens without a tag, or tiles without a global view.
    """
    is_image = (ids == image_token).tolist()
    tiles: list[tuple[int, int]] = []
    found = []
    for pos, image in enumerate(is_image):
        if not image or (pos > 0 and is_image[pos - 1]):
            continue  # only the first token of a run
        tag = str(tokenizer.convert_ids_to_tokens(int(ids[pos - 1]))) if pos else ""
        match = _TILE.fullmatch(tag)
        if match:
            tiles.append((int(match[1]), int(match[2])))
        elif tag == GLOBAL_TAG:
            rows = max((r for r, _ in tiles), default=0)
            cols = max((c for _, c in tiles), default=0)
            if len(tiles) != rows * cols:
                raise InputError(f"the tile tags {tiles} of an image do not make a grid")
            found.append(Views(rows, cols))
            tiles = []
        else:
            raise InputError(
                f"image tokens at position {pos} follow {tag!r}, not a tile tag "
                f"(<row_r_col_c>) or {GLOBAL_TAG}: put <image> in the text and let the "
                "processor expand it"
            )
    if tiles:
        raise InputError(f"tiles {tiles} of an image have no {GLOBAL_TAG} view after them")
    return found


def _image(
    tower: layout.Tower, views: Views, size: Size | None, first: int, processor: Any
) -> ImageSpec:
    """The global view (tile 0), then the tiles stitched (tile 1), as the tokens come:
    the tiles' runs first, the global view's last."""
    g = tower.side
    per_view = g * g
    rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    frames = _frames(size, processor, tower.image_size) if size is not None else None
    last = views.count - 1
    whole = TileSpec(
        last * per_view + rows * g + cols,
        torch.stack([torch.full_like(rows, first + last), rows * g + cols], dim=-1),
        None if frames is None else frames[0].boxes(rows, cols, tower.cell, _known(size)),
        torch.empty(0, dtype=torch.long),
        (1, 1),
    )
    if not last:
        return ImageSpec(per_view, (whole,), size, None)
    big_r, big_c = torch.meshgrid(
        torch.arange(views.rows * g), torch.arange(views.cols * g), indexing="ij"
    )
    tile = (big_r // g) * views.cols + big_c // g
    token = (big_r % g) * g + big_c % g
    stitched = TileSpec(
        tile * per_view + token,
        torch.stack([first + tile, token], dim=-1),
        None if frames is None else frames[1].boxes(big_r, big_c, tower.cell, _known(size)),
        torch.empty(0, dtype=torch.long),
        (views.rows, views.cols),
    )
    return ImageSpec(views.count * per_view, (whole, stitched), size, None)


def _known(size: Size | None) -> Size:
    if size is None:
        raise InputError("no original size")
    return size


def _frames(size: Size, processor: Any, image_size: int) -> tuple[Affine, Affine] | None:
    """Original pixels -> the global view's pixels, and -> the stitched tiles' pixels."""
    tile = _longest(getattr(processor, "max_image_size", None)) or image_size
    longest = _longest(getattr(processor, "size", None))
    if processor is None or longest is None:
        return None
    height, width = size
    # HF's own resize rules (untyped): longest edge to `longest`, then below 4096
    to_max: Any = hf_idefics3._resize_output_size_rescale_to_max_len
    below: Any = hf_idefics3._resize_output_size_scale_below_upper_bound
    h1, w1 = below(*to_max(height, width, max_len=longest), max_len=hf_idefics3.MAX_IMAGE_SIZE)
    h2, w2 = _multiples_of(h1, w1, tile)  # resize_for_vision_encoder
    # frames are tile-sized squares the tower sees at image_size (max_image_size is it)
    px = image_size / tile
    whole = Affine(tile * px / height, 0.0, tile * px / width, 0.0)
    stitched = Affine(h2 * px / height, 0.0, w2 * px / width, 0.0)
    return whole, stitched


def _multiples_of(height: int, width: int, tile: int) -> Size:
    """Idefics3ImageProcessor.resize_for_vision_encoder's size: both sides up to multiples of
    `tile`, the aspect ratio kept as well as that allows."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def _longest(size: Any) -> int | None:
    value = (
        size.get("longest_edge") if isinstance(size, dict) else getattr(size, "longest_edge", None)
    )
    return None if value is None else int(value)
