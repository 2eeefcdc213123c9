"""Where images sit in the language model's sequence: which token shows which patch.

A vision-language model replaces each image placeholder with one token per patch of the image
(plus, for some models, a CLS token or a newline token per row). `ImageLayout` records where:
for each batch row, its images in sequence order; for each image, its patch grid(s) (`Tile`),
the language-model position of every patch, the row and token of the vision tower's batch that
patch came from, and the box of the original image it covers. These are plain data, low in the
layers so that components and the cache can name them; computing a layout is the business of
the plugin that knows the model and its processor (a top-level component's
`image_layout(request)`), and `bridge_core.multimodal` works with them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import torch

from bridge_core.errors import InputError

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class LayoutRequest:
    """What a component gets asked for an image layout.

    Attributes:
        inputs: the HF forward keywords of the run (``input_ids``, ``pixel_values`` ...).
        images: the images as the user gave them (``images=``), if any: their sizes are the
            original sizes.
        image_sizes: original ``(height, width)`` per image, if the user gave them.
        processor: the bridge's processor (its resize and crop settings), or None.
        hf_config: the HF model's config.
    """

    inputs: Mapping[str, Any]
    images: Any = None
    image_sizes: Sequence[tuple[int, int]] | None = None
    processor: Any = None
    hf_config: Any = None


@dataclass(frozen=True)
class VisionRoute:
    """How image features reach the language model.

    Attributes:
        stack: the vision layers, as a bridge path (``"vision_encoder.layers"``).
        feature_hooks: the hook names whose activations are the selected features (the
            hidden state(s) the projector is fed).
        projector: the component that maps selected features into the residual stream.
        skip_tokens: leading tokens of the tower's sequence that are not fed (a dropped CLS).
    """

    stack: str
    feature_hooks: tuple[str, ...]
    projector: str
    skip_tokens: int = 0


@dataclass(frozen=True, eq=False)
class Tile:
    """One patch grid of an image as the language model reads it, row by row.

    Attributes:
        positions: ``[rows, cols]`` language-model position of each patch's token.
        vision_index: where each patch's feature comes from, as an index into the vision
            layers' activations (batch dimension first where they have one): ``[rows, cols,
            2]`` (row of the tower's batch, token index in its sequence), or ``[rows, cols,
            k, n]`` for a feature merged from k tower tokens (Qwen2-VL merges 2 x 2 patches;
            its tower has no batch dimension, so n = 1). ``activation[tuple(vision_index[r,
            c].unbind(-1))]`` is what the feature of patch (r, c) is made from.
        boxes: ``[rows, cols, 4]`` ``(x0, y0, x1, y1)`` of each patch in the original image's
            pixels (clipped to the image), or None when the original size is unknown.
        newline_positions: positions of the tokens that end each row (any-resolution models),
            empty if none.
        crops: how many crops (rows, cols) the tile is stitched from; (1, 1) for one image.
    """

    positions: torch.Tensor
    vision_index: torch.Tensor
    boxes: torch.Tensor | None = None
    newline_positions: torch.Tensor = field(
        default_factory=lambda: torch.empty(0, dtype=torch.long)
    )
    crops: tuple[int, int] = (1, 1)

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of patches."""
        rows, cols = self.positions.shape
        return int(rows), int(cols)


@dataclass(frozen=True, eq=False)
class ImagePlacement:
    """One image in one batch row: its tokens, its patch grid(s) and its pixels.

    Attributes:
        index: the image's index in the order the model consumes images (over the batch).
        row: the batch row it sits in.
        positions: every position of its tokens in that row, sorted (patches, newline and CLS
            tokens).
        tiles: its patch grids: one for LLaVA; for any-resolution models the base view, then
            the high-resolution view stitched from the crops.
        size: (height, width) of the original image, or None when unknown.
        cls_position: the position of the CLS token fed with the patches, if any.
    """

    index: int
    row: int
    positions: torch.Tensor
    tiles: tuple[Tile, ...]
    size: tuple[int, int] | None = None
    cls_position: int | None = None

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the base patch grid."""
        return self.tiles[0].grid

    @property
    def newline_positions(self) -> torch.Tensor:
        """Positions of the row-end tokens of every tile."""
        return torch.cat([tile.newline_positions for tile in self.tiles])

    @property
    def vision_rows(self) -> torch.Tensor:
        """Indices on the first dimension of the vision activations that hold this image: rows
        of the tower's batch (its crops), or its tokens for a tower without a batch dimension."""
        rows: torch.Tensor = torch.unique(
            torch.cat([t.vision_index[..., 0].flatten() for t in self.tiles])
        )
        return rows

    def token_patch(self, pos: int) -> tuple[int, int, int]:
        """The patch the token at `pos` shows: (tile, row, col).

        Raises:
            InputError: `pos` is not a patch token of this image (a newline or CLS token, or
                no token of the image at all).
        """
        for t, tile in enumerate(self.tiles):
            found = (tile.positions == pos).nonzero()
            if len(found):
                return t, int(found[0, 0]), int(found[0, 1])
        raise InputError(self._not_a_patch(pos))

    def pixel_box(self, pos: int) -> Box:
        """The box ``(x0, y0, x1, y1)`` of the original image that the token at `pos` shows.

        Raises:
            InputError: `pos` is no patch token, or the original size is unknown.
        """
        t, row, col = self.token_patch(pos)
        boxes = self.tiles[t].boxes
        if boxes is None:
            raise InputError(
                f"the original size of image {self.index} is unknown, so its pixel boxes are "
                "too: pass the images (images=[...] with text) or image_sizes=[(height, width)]"
            )
        x0, y0, x1, y1 = (float(v) for v in boxes[row, col])
        return x0, y0, x1, y1

    def vision_token(self, pos: int) -> tuple[int, ...]:
        """Where the feature at `pos` comes from: (row of the tower's batch, token index).

        Raises:
            InputError: the feature is merged from several tower tokens (`vision_tokens`).
        """
        tokens = self.vision_tokens(pos)
        if len(tokens) != 1:
            raise InputError(
                f"the feature at position {pos} is merged from {len(tokens)} tokens of the "
                f"vision tower ({tokens.tolist()}): vision_tokens(pos) lists them"
            )
        return tuple(int(i) for i in tokens[0])

    def vision_tokens(self, pos: int) -> torch.Tensor:
        """Every tower token the feature at `pos` is made from: ``[k, n]`` indices into the
        vision activations (k = 1 unless the model merges tokens, as Qwen2-VL does)."""
        if self.cls_position is not None and pos == self.cls_position:
            return torch.tensor([[int(self.tiles[0].vision_index[0, 0, 0]), 0]])
        t, row, col = self.token_patch(pos)
        index = self.tiles[t].vision_index[row, col]
        return index.reshape(-1, index.shape[-1])

    @overload
    def to_grid(self, values: torch.Tensor, tile: int) -> torch.Tensor: ...

    @overload
    def to_grid(
        self, values: torch.Tensor, tile: None = None
    ) -> torch.Tensor | list[torch.Tensor]: ...

    def to_grid(
        self, values: torch.Tensor, tile: int | None = None
    ) -> torch.Tensor | list[torch.Tensor]:
        """Lay per-token values out on the patch grid: ``[rows, cols, ...]``.

        Args:
            values: ``[pos, ...]`` over the whole row's sequence, or ``[n, ...]`` over this
                image's tokens (``n = len(positions)``, in position order).
            tile: which tile; by default the only one, or a list with one grid per tile.

        Raises:
            InputError: `values` has neither length, or `tile` is out of range.
        """
        if tile is None:
            grids = [self.to_grid(values, t) for t in range(len(self.tiles))]
            return grids[0] if len(grids) == 1 else grids
        if not -len(self.tiles) <= tile < len(self.tiles):
            raise InputError(f"image {self.index} has {len(self.tiles)} tile(s); got tile={tile}")
        positions = self.tiles[tile].positions
        if values.dim() == 0:
            raise InputError("to_grid takes per-token values [pos, ...], got a scalar")
        last = int(self.positions.max())
        if values.shape[0] <= last:  # not over the sequence: over the image's own tokens
            if values.shape[0] != len(self.positions):
                raise InputError(
                    f"to_grid takes values over the row's sequence (length > {last}) or over "
                    f"image {self.index}'s {len(self.positions)} tokens; got length "
                    f"{values.shape[0]}"
                )
            positions = torch.searchsorted(self.positions, positions)
        return values[positions.to(values.device)]

    def _not_a_patch(self, pos: int) -> str:
        what = f"is not a token of image {self.index}"
        if pos == self.cls_position:
            what = f"is the CLS token of image {self.index}, which shows no single patch"
        elif bool((self.newline_positions == pos).any()):
            what = f"is a newline token (the end of a row of patches) of image {self.index}"
        spans = ", ".join(f"{int(t.positions.min())}..{int(t.positions.max())}" for t in self.tiles)
        return f"position {pos} of row {self.row} {what} (its patch tokens: {spans})"


class ImageLayout(Sequence[list[ImagePlacement]]):
    """Where the images of a batch sit: ``layout[row]`` lists that row's images in order.

    Attributes:
        pad_mask, image_mask, text_mask: ``[batch, pos]`` booleans: padding, image tokens
            (patches, newline and CLS tokens), and the other tokens.
        vision: how the image features reach the language model, if the plugin says.
    """

    def __init__(
        self,
        rows: Sequence[Sequence[ImagePlacement]],
        pad_mask: torch.Tensor,
        vision: VisionRoute | None = None,
    ) -> None:
        """Build a layout from each row's images and the padding mask ``[batch, pos]``."""
        self.rows = tuple(tuple(images) for images in rows)
        self.pad_mask = pad_mask.bool()
        self.vision = vision
        self.image_mask = torch.zeros_like(self.pad_mask)
        for image in self.images:
            self.image_mask[image.row, image.positions] = True
        self.text_mask = ~(self.pad_mask | self.image_mask)

    @overload
    def __getitem__(self, row: int) -> list[ImagePlacement]: ...

    @overload
    def __getitem__(self, row: slice) -> list[list[ImagePlacement]]: ...

    def __getitem__(self, row: int | slice) -> list[ImagePlacement] | list[list[ImagePlacement]]:
        if isinstance(row, slice):
            return [list(images) for images in self.rows[row]]
        if not -len(self.rows) <= row < len(self.rows):
            raise InputError(f"the batch has {len(self.rows)} row(s); got row {row}")
        return list(self.rows[row])

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[list[ImagePlacement]]:
        return (list(images) for images in self.rows)

    @property
    def images(self) -> list[ImagePlacement]:
        """Every image, in the order the model consumes them."""
        return sorted((im for images in self.rows for im in images), key=lambda im: im.index)

    def image(self, image: int = 0, batch: int = 0) -> ImagePlacement:
        """The `image`-th image of batch row `batch`.

        Raises:
            InputError: no such row or image, saying how many there are.
        """
        images = self[batch]
        if not -len(images) <= image < len(images):
            raise InputError(f"batch row {batch} has {len(images)} image(s); got image={image}")
        return images[image]

    def __repr__(self) -> str:
        counts = [len(images) for images in self.rows]
        return f"ImageLayout(batch={len(self.rows)}, images per row={counts})"


__all__ = ["Box", "ImageLayout", "ImagePlacement", "LayoutRequest", "Tile", "VisionRoute"]
