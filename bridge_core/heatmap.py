"""Per-patch values painted over the original image, as a PNG (Pillow, imported lazily).

Pillow is the optional extra ``multimodal`` (``pip install 'transformer-bridge[multimodal]'``);
matplotlib, when installed, adds its colour maps to the built-in ``viridis``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bridge_core.errors import InputError, MissingExtraError

# matplotlib's viridis at 0, 1/8, ..., 1 (interpolated linearly in between)
_VIRIDIS = np.array(
    [
        (68, 1, 84),
        (71, 44, 122),
        (59, 82, 139),
        (44, 113, 142),
        (33, 145, 140),
        (39, 173, 129),
        (92, 200, 99),
        (170, 220, 50),
        (253, 231, 37),
    ],
    dtype=np.float64,
)


def save_heatmap(
    image: Any,
    grid_values: torch.Tensor | np.ndarray | Sequence[Sequence[float]],
    path: str | os.PathLike[str],
    alpha: float = 0.5,
    *,
    boxes: torch.Tensor | None = None,
    cmap: str = "viridis",
    size: int | None = None,
) -> Path:
    """Write a PNG of `image` with `grid_values` painted over it in colour.

    Args:
        image: the original image: a PIL image, a path to one, or an ``[height, width, 3]``
            uint8 array.
        grid_values: ``[rows, cols]`` values (one tile's grid, e.g. `attention_to_image`);
            scaled to the colour map's range (min to max).
        path: where to write the PNG.
        alpha: opacity of the colours (0: only the image, 1: only the colours).
        boxes: ``[rows, cols, 4]`` pixel box of each cell in the original image (a tile's
            `boxes`); by default the grid is stretched over the whole image.
        cmap: "viridis", or any matplotlib colour map name when matplotlib is installed.
        size: the longest side of the written picture in pixels (default: the image's).

    Returns:
        The path written.

    Raises:
        InputError: values that are not one 2-D grid, boxes of another grid, a bad alpha.
        MissingExtraError: Pillow is not installed.
    """
    pil = _pillow()
    values = _grid(grid_values)
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be between 0 and 1 (got {alpha})")
    if boxes is not None and tuple(boxes.shape) != (*values.shape, 4):
        raise InputError(
            f"boxes must be [rows, cols, 4] for the grid {tuple(values.shape)}; got "
            f"{tuple(boxes.shape)}"
        )
    base = _open(pil, image)
    scale = 1.0 if size is None else size / max(base.size)
    if scale != 1.0:
        base = base.resize(
            (round(base.width * scale), round(base.height * scale)), pil.Resampling.BICUBIC
        )
    colours = _colours(values, cmap)
    if boxes is None:
        overlay = pil.fromarray(colours).resize(base.size, pil.Resampling.NEAREST)
    else:
        overlay = _paint(pil, base.copy(), colours, boxes.double().numpy() * scale)
    out = Path(path)
    pil.blend(base, overlay, alpha).save(out, format="PNG")
    return out


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError as exc:
        raise MissingExtraError(
            "save_heatmap needs Pillow: pip install 'transformer-bridge[multimodal]'"
        ) from exc
    return Image


def _grid(grid_values: Any) -> np.ndarray:
    if isinstance(grid_values, list) and grid_values and isinstance(grid_values[0], torch.Tensor):
        raise InputError(
            "save_heatmap draws one grid; an any-resolution image has one per tile: pass "
            "one (grids[t]) with that tile's boxes (image.tiles[t].boxes)"
        )
    values = (
        grid_values.detach().float().cpu().numpy()
        if isinstance(grid_values, torch.Tensor)
        else np.asarray(grid_values, dtype=np.float64)
    )
    if values.ndim != 2 or values.size == 0:
        raise InputError(f"grid_values must be a non-empty [rows, cols] grid; got {values.shape}")
    return values


def _open(pil: Any, image: Any) -> Any:
    if isinstance(image, str | os.PathLike):
        return pil.open(image).convert("RGB")
    if isinstance(image, pil.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise InputError(
            "image must be a PIL image, a path, or a [height, width, 3] uint8 array; got "
            f"{type(image).__name__} of shape {array.shape} and dtype {array.dtype}"
        )
    return pil.fromarray(array)


def _colours(values: np.ndarray, cmap: str) -> np.ndarray:
    """``[rows, cols, 3]`` uint8 colours of values scaled to 0..1."""
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    scaled = (values - low) / (high - low) if high > low else np.full_like(values, 0.5)
    mapped = _matplotlib_cmap(cmap)
    if mapped is not None:
        return (np.asarray(mapped(scaled))[..., :3] * 255).round().astype(np.uint8)
    if cmap != "viridis":
        raise InputError(
            f"colour map {cmap!r} needs matplotlib (pip install matplotlib); without it, "
            "'viridis' is available"
        )
    anchors = np.linspace(0.0, 1.0, len(_VIRIDIS))
    channels = [np.interp(scaled, anchors, _VIRIDIS[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def _matplotlib_cmap(name: str) -> Any:
    try:
        import matplotlib
    except ImportError:
        return None
    try:
        return matplotlib.colormaps[name]
    except KeyError as exc:
        raise InputError(f"matplotlib knows no colour map {name!r}") from exc


def _paint(pil: Any, canvas: Any, colours: np.ndarray, boxes: np.ndarray) -> Any:
    """Fill each cell's box of `canvas` with its colour."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(canvas)
    for row in range(colours.shape[0]):
        for col in range(colours.shape[1]):
            x0, y0, x1, y1 = boxes[row, col]
            if x1 - x0 < 0.5 or y1 - y0 < 0.5:
                continue  # a patch that shows only padding
            rect = (round(x0), round(y0), round(x1) - 1, round(y1) - 1)
            draw.rectangle(rect, fill=tuple(int(c) for c in colours[row, col]))
    return canvas


__all__ = ["save_heatmap"]
