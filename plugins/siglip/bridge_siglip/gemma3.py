"""Gemma-3's image layout: pooled tokens, and pan-and-scan crops as further tiles.

Each view of an image (the image itself, then its pan-and-scan crops, if the processor was
called with ``do_pan_and_scan=True``) is resized to the tower's size and becomes
``mm_tokens_per_image`` tokens, each the average of ``merge x merge`` patches. In the sequence
every view is its own run of image tokens (``<start_of_image>`` ... ``<end_of_image>``); the
layout keeps them as the tiles of one image: tile 0 the whole image, tile k crop k. Which crops
an image has follows from its size and the processor's pan-and-scan settings, so the layout
needs the original sizes (``images=`` or ``image_sizes=``) to tell crops from images.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from bridge_core.errors import InputError
from bridge_core.multimodal import ImageLayout, LayoutRequest
from bridge_llava import layout
from bridge_llava.layout import Affine, ImageSpec, LayoutInputs, Size, TileSpec

Box = tuple[int, int, int, int]  # (top, left, height, width) of a crop in the original image


def build_layout(tower: layout.Tower, request: LayoutRequest) -> ImageLayout | None:
    """Gemma-3's layout of the request (see the module doc)."""
    return layout.build_layout(tower, request, lambda seen: _specs(tower, seen))


def _specs(tower: layout.Tower, seen: LayoutInputs) -> list[ImageSpec]:
    views, sizes = seen.pixels.shape[0], seen.sizes
    if sizes is None or len(sizes) == views:  # no crops (or no sizes to tell them by)
        return layout.plain_specs(tower, views, sizes, seen.image_processor)
    settings = pan_and_scan_settings(seen.request.processor)
    crops = [pan_and_scan_crops(size, settings) for size in sizes]
    if sum(1 + len(c) for c in crops) != views:
        raise InputError(
            f"{len(sizes)} images went through the tower as {views} views, but pan and scan "
            f"with the processor's settings {settings} makes "
            f"{sum(1 + len(c) for c in crops)}: the layout cannot tell which crops an image "
            "has (crops made with other settings than the processor's defaults)"
        )
    specs, first = [], 0
    for size, boxes in zip(sizes, crops, strict=True):
        views_of = [(0, 0, *size), *boxes]
        specs.append(_image(tower, size, views_of, first, seen.image_processor))
        first += len(views_of)
    return specs


def pan_and_scan_settings(processor: Any) -> dict[str, float]:
    """The pan-and-scan settings a call of `processor` uses without keywords: its own
    ``images_kwargs`` defaults, else its image processor's (as transformers merges them)."""
    names = (
        "pan_and_scan_min_crop_size",
        "pan_and_scan_max_num_crops",
        "pan_and_scan_min_ratio_to_activate",
    )
    defaults = getattr(processor, "images_kwargs", None) or {}
    image_processor = getattr(processor, "image_processor", None)
    found = {}
    for name in names:
        value = defaults.get(name, getattr(image_processor, name, None))
        if value is None:
            raise InputError(f"the processor does not say its pan-and-scan setting {name}")
        found[name] = float(value)
    return found


def _image(
    tower: layout.Tower, size: Size, views: list[Box], first: int, processor: Any
) -> ImageSpec:
    g = tower.side
    rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    target = _target(processor, tower.image_size)
    tiles = []
    for v, (top, left, height, width) in enumerate(views):
        sy, sx = target[0] / height, target[1] / width
        frame = Affine(sy, -top * sy, sx, -left * sx)
        tiles.append(
            TileSpec(
                v * g * g + rows * g + cols,
                torch.stack([torch.full_like(rows, first + v), rows * g + cols], dim=-1),
                frame.boxes(rows, cols, tower.cell, size),
                torch.empty(0, dtype=torch.long),
                (1, 1),
            )
        )
    return ImageSpec(len(views) * g * g, tuple(tiles), size, None)


def _target(processor: Any, image_size: int) -> Size:
    size = getattr(processor, "size", None)
    height = size.get("height") if isinstance(size, dict) else getattr(size, "height", None)
    width = size.get("width") if isinstance(size, dict) else getattr(size, "width", None)
    return (int(height or image_size), int(width or image_size))


def pan_and_scan_crops(size: Size, settings: dict[str, float]) -> list[Box]:
    """The crops Gemma-3's image processor cuts from an image of `size` (height, width).

    The rule of ``Gemma3ImageProcessor.pan_and_scan``: an image at least
    ``pan_and_scan_min_ratio_to_activate`` times wider than tall (or taller than wide) is cut
    along its long side into 2 to ``pan_and_scan_max_num_crops`` crops of equal size, unless
    they would be smaller than ``pan_and_scan_min_crop_size``.

    Returns:
        (top, left, height, width) of each crop, in the processor's order; empty for none.
    """
    height, width = size
    min_ratio = settings["pan_and_scan_min_ratio_to_activate"]
    min_crop = int(settings["pan_and_scan_min_crop_size"])
    max_crops = int(settings["pan_and_scan_max_num_crops"])
    if width >= height:
        if width / height < min_ratio:
            return []
        n_w = min(math.floor(width / min_crop), math.floor(width / height + 0.5))
        n_w, n_h = min(max_crops, max(2, n_w)), 1
    else:
        if height / width < min_ratio:
            return []
        n_h = min(math.floor(height / min_crop), math.floor(height / width + 0.5))
        n_h, n_w = min(max_crops, max(2, n_h)), 1
    crop_w, crop_h = math.ceil(width / n_w), math.ceil(height / n_h)
    if min(crop_w, crop_h) < min_crop:
        return []
    return [
        (top, left, min(crop_h, height - top), min(crop_w, width - left))
        for top in range(0, crop_h * n_h, crop_h)
        for left in range(0, crop_w * n_w, crop_w)
    ]
