"""Qwen2-VL's vision inputs as plain functions: grids, the tower's order, counts, checks.

The processor cuts each image (resized to multiples of ``patch * merge`` pixels) into a grid of
``(t, h, w)`` patches (``image_grid_thw``), lists them 2x2 block by 2x2 block, and puts one
``<|image_pad|>`` token per block in the text. The tower runs on every patch of every image
as one sequence; its attention kernel once per image (``t`` times for a video of ``t``
frames), or, in Qwen2.5-VL's windowed layers, once per window of blocks, after the tower
reordered the blocks window by window.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from bridge_core.errors import InputError
from bridge_core.hooks import HookPoint

RUNS = "n_vision_runs"
PER_IMAGE = "n_vision_sequences"
PER_WINDOW = "n_vision_windows"
LISTED = ("hook_attn_scores", "hook_pattern")
"""Per-call points kept as a list (one ``[head, seq, seq]`` per image or window); the other
points are concatenated along the patches."""

MODALITIES = (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw"))


@dataclass(frozen=True)
class Grid:
    """How the tower cuts images and merges patches, and whether it reorders them.

    Attributes:
        patch: side of a patch, in pixels of the resized image.
        merge: side of the blocks of patches merged into one token.
        temporal: frames per patch.
        window: side of an attention window in blocks (Qwen2.5-VL), or None.
    """

    patch: int
    merge: int
    temporal: int
    window: int | None = None

    @property
    def unit(self) -> int:
        """Patches per merged block (4)."""
        return self.merge * self.merge

    def block_order(self, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The tower's order of the merged blocks, and the length of each attention call.

        Returns:
            (``order[k]``: the block, in the processor's order, at place ``k`` of the tower's
            sequence; the number of blocks of each attention window, in order). Without
            windows, the processor's order and one call per image frame.
        """
        order: list[torch.Tensor] = []
        calls: list[int] = []
        first = 0
        for t, h, w in grid_thw.tolist():
            rows, cols = int(h) // self.merge, int(w) // self.merge
            blocks = torch.arange(int(t) * rows * cols).view(int(t), rows, cols) + first
            first += blocks.numel()
            for frame in blocks:
                if self.window is None:
                    order.append(frame.flatten())
                    calls.append(frame.numel())
                    continue
                for r in range(0, rows, self.window):  # as Qwen2.5-VL's get_window_index
                    for c in range(0, cols, self.window):
                        window = frame[r : r + self.window, c : c + self.window].flatten()
                        order.append(window)
                        calls.append(window.numel())
        if not order:
            return torch.empty(0, dtype=torch.long), []
        return torch.cat(order), calls


def declare(point: HookPoint, attr: str, per_call: str | None) -> None:
    """Set how often `point` fires per forward and how a cache keeps its calls.

    Args:
        attr: the point's attribute name (``hook_pattern`` ...).
        per_call: ``PER_IMAGE`` or ``PER_WINDOW`` for the attention kernel's points, else None
            (the point fires once per run of the tower and is concatenated along the patches).
    """
    point.calls = per_call or RUNS
    point.collect = "list" if per_call and attr in LISTED else "cat"


def call_counts(inputs: Mapping[str, Any], grid: Grid) -> dict[str, int]:
    """The counts the vision points' ``calls`` name, for a forward on `inputs`.

    ``n_images``; ``n_vision_runs``: runs of the tower (one for the images, one for the videos);
    ``n_vision_sequences``: its attention calls in a full-attention layer (one per image, one
    per video frame); ``n_vision_windows``: in a windowed layer (Qwen2.5-VL).
    """
    counts = {"n_images": 0, RUNS: 0, PER_IMAGE: 0, PER_WINDOW: 0}
    for pixels, grids in MODALITIES:
        grid_thw = inputs.get(grids)
        if inputs.get(pixels) is None or not isinstance(grid_thw, torch.Tensor):
            continue
        counts[RUNS] += 1
        counts[PER_IMAGE] += int(grid_thw[:, 0].sum())
        if grid.window is not None:
            counts[PER_WINDOW] += len(grid.block_order(grid_thw.cpu())[1])
        if pixels == "pixel_values":
            counts["n_images"] = int(grid_thw.shape[0])
    return counts


def example_image(height: int, width: int, seed: int) -> Any:
    """A random RGB PIL image of `height` x `width` pixels (verify's inputs)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def example_inputs(
    inputs: dict[str, Any], processor: Any, grid: Grid, image_token_id: int | None, channels: int
) -> dict[str, Any]:
    """Put one image in each row of `inputs`: alternately 2x3 and 3x2 merged blocks.

    Through the processor if it is a Qwen2-VL one; otherwise pixel values and token ids made
    here (the image tokens without the ``<|vision_start|>`` / ``<|vision_end|>`` around them,
    whose ids the bridge does not know: the model finds images by ``mm_token_type_ids``).
    """
    rows = int(inputs["input_ids"].shape[0])
    shapes = [(2, 3) if i % 2 == 0 else (3, 2) for i in range(rows)]
    side = grid.patch * grid.merge
    if processor is not None and hasattr(processor, "image_token"):
        images = [example_image(h * side, w * side, i) for i, (h, w) in enumerate(shapes)]
        prompt = f"<|vision_start|>{processor.image_token}<|vision_end|>"
        texts = [f"{prompt} a picture number {i}" for i in range(rows)]
        encoded = processor(text=texts, images=images, padding=True, return_tensors="pt")
        return {**inputs, **dict(encoded)}
    if image_token_id is None:
        raise InputError(
            "example inputs for Qwen2-VL need its processor or the image token's id: "
            "wrap(model, processor=...) or pass inputs= with pixel_values"
        )
    ids: torch.Tensor = inputs["input_ids"]
    n = shapes[0][0] * shapes[0][1]
    image = torch.full((rows, n), image_token_id)
    ids = torch.cat([ids[:, :1], image, ids[:, 1:]], dim=1)
    kinds = (ids == image_token_id).long()
    thw = torch.tensor([[1, h * grid.merge, w * grid.merge] for h, w in shapes])
    size = (int(thw.prod(-1).sum()), channels * grid.temporal * grid.patch**2)
    pixels = torch.randn(size, generator=torch.Generator().manual_seed(0))
    return {
        **inputs,
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": kinds,
        "pixel_values": pixels,
        "image_grid_thw": thw,
    }


def check_inputs(
    inputs: Mapping[str, Any], grid: Grid, channels: int, image_token_id: int | None
) -> None:
    """Check pixel values, grids and image tokens before Qwen2-VL runs.

    (A missing ``mm_token_type_ids`` is left to HF, which names it: older transformers did not
    use it.)

    Raises:
        InputError: naming what was expected.
    """
    pixels, grid_thw = inputs.get("pixel_values"), inputs.get("image_grid_thw")
    ids = inputs.get("input_ids")
    ids = ids if isinstance(ids, torch.Tensor) else None
    if pixels is None:
        _check_no_image_tokens(inputs, ids, image_token_id)
        return
    width = channels * grid.temporal * grid.patch**2
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 2 or pixels.shape[1] != width:
        shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise InputError(
            f"Qwen2-VL's pixel_values are the processor's patches [patches, {width}] "
            f"(channels x temporal patch x patch x patch); got {shape}. Pass images=[...] "
            "with text to run the processor"
        )
    if not isinstance(grid_thw, torch.Tensor) or grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise InputError(
            "pixel_values need image_grid_thw [images, 3] (temporal, height, width in patches, "
            "as the processor returns it)"
        )
    patches = int(grid_thw.prod(-1).sum())
    if patches != pixels.shape[0]:
        raise InputError(
            f"image_grid_thw {grid_thw.tolist()} makes {patches} patches, but pixel_values "
            f"has {pixels.shape[0]}"
        )
    if ids is None or inputs.get("past_key_values") is not None:
        return
    if image_token_id is not None:
        found, expected = int((ids == image_token_id).sum()), patches // grid.unit
        if found != expected:
            raise InputError(
                f"input_ids has {found} image tokens (id {image_token_id}), but the "
                f"{grid_thw.shape[0]} image(s) of image_grid_thw need {expected} (one per "
                f"{grid.merge}x{grid.merge} patches). Put one <|vision_start|><|image_pad|>"
                "<|vision_end|> per image in the text and let the processor expand it"
            )


def _check_no_image_tokens(
    inputs: Mapping[str, Any], ids: torch.Tensor | None, token: int | None
) -> None:
    if ids is None or token is None or inputs.get("past_key_values") is not None:
        return
    if inputs.get("mm_encoder_outputs"):
        return
    found = int((ids == token).sum())
    if found:
        raise InputError(
            f"input_ids has {found} image tokens (id {token}) but no pixel_values were given; "
            "pass the images (images=[...] with text, or pixel_values and image_grid_thw)"
        )
