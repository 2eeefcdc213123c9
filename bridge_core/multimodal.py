"""Images in the language model's sequence: layouts, attention maps and the vision lens.

The layout types (`ImageLayout`, `ImagePlacement`, `Tile`, `LayoutRequest`, `VisionRoute`) live
in `bridge_core.layout` and are re-exported here. This module asks a bridge for the layout of
its inputs (`layout_for`: a top-level component's `image_layout(request)` computes it, in the
plugin that knows the model and its processor), reads it from a cache (`layout_of`), and works
with it: `attention_to_image`, `vision_logit_lens`, and `save_heatmap` to paint the result.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from bridge_core.cache import layout_of, vision_logit_lens
from bridge_core.components.base import GeneralizedComponent
from bridge_core.errors import InputError
from bridge_core.heatmap import save_heatmap
from bridge_core.layout import Box, ImageLayout, ImagePlacement, LayoutRequest, Tile, VisionRoute

if TYPE_CHECKING:
    from bridge_core.bridgelike import BridgeLike
    from bridge_core.cache import ActivationCache


def layout_for(bridge: BridgeLike, inputs: Mapping[str, Any], images: Any) -> ImageLayout:
    """Ask the bridge's top-level components for the layout of `inputs` (forward keywords).

    Raises:
        InputError: no component places images in the sequence.
    """
    sizes = inputs.get("image_sizes")
    if isinstance(sizes, torch.Tensor):
        sizes = sizes.tolist()
    request = LayoutRequest(
        inputs,
        images,
        None if sizes is None else [(int(h), int(w)) for h, w in sizes],
        bridge.processor,
        getattr(bridge.original_model, "config", None),
    )
    for component in bridge.children():
        if isinstance(component, GeneralizedComponent):
            layout = component.image_layout(request)
            if layout is not None:
                return layout
    raise InputError(
        f"this bridge ({bridge.adapter.name}: {type(bridge.original_model).__name__}) has no "
        "component that places images in the sequence, so it has no image layout"
    )


def attention_to_image(
    cache: ActivationCache,
    layer: int,
    head: int | None = None,
    query: int = -1,
    image: int = 0,
    batch: int = 0,
) -> torch.Tensor | list[torch.Tensor]:
    """How much a query token attends to each patch of an image, on the patch grid.

    Args:
        layer: the language-model block (negative counts from the end).
        head: one head, or None for the mean over heads.
        query: the query position (negative counts from the end of the sequence).
        image: which image of the row, in sequence order.
        batch: the batch row.

    Returns:
        ``[rows, cols]`` attention weights; a list with one grid per tile for
        any-resolution models.

    Raises:
        InputError: no layout or pattern in the cache, or an index out of range.
    """
    placement = layout_of(cache).image(image, batch)
    pattern = cache["pattern", layer]
    if cache.has_batch_dim:
        pattern = pattern[batch]
    if head is None:
        weights = pattern.mean(0)
    elif -pattern.shape[0] <= head < pattern.shape[0]:
        weights = pattern[head]
    else:
        raise InputError(f"layer {layer} has {pattern.shape[0]} heads; got head={head}")
    if not -weights.shape[0] <= query < weights.shape[0]:
        raise InputError(f"the sequence has {weights.shape[0]} positions; got query={query}")
    return placement.to_grid(weights[query])


__all__ = [
    "Box",
    "ImageLayout",
    "ImagePlacement",
    "LayoutRequest",
    "Tile",
    "VisionRoute",
    "attention_to_image",
    "layout_for",
    "layout_of",
    "save_heatmap",
    "vision_logit_lens",
]
