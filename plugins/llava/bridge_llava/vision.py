"""Vision features as LLaVA uses them: feature selection, input checks, image-token positions.

Plain functions over tensors, so that they can be read (and tested) apart from the bridge;
`CLIPVisionEncoderBridge` offers them as methods with the model's settings filled in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from bridge_core.errors import InputError

Strategy = Literal["default", "full"]
STRATEGIES: tuple[Strategy, ...] = ("default", "full")

FeatureLayer = int | Sequence[int]


def example_image(size: int, seed: int) -> Any:
    """A random RGB PIL image, `size` pixels square (verify's inputs)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def layer_list(layer: FeatureLayer) -> list[int]:
    """`vision_feature_layer` as a list of indices (an int is one index)."""
    return [layer] if isinstance(layer, int) else list(layer)


def check_feature_layer(layer: Any, num_layers: int) -> None:
    """Check that `layer` (an int or a list of ints) indexes the tower's hidden states.

    A tower of `num_layers` layers has ``num_layers + 1`` hidden states (the input of the
    first layer, then each layer's output), so valid indices are ``-(num_layers + 1)`` to
    ``num_layers``.

    Raises:
        InputError: not an int or a non-empty list of ints, or an index out of range.
    """
    valid = f"{-(num_layers + 1)}..{num_layers}"
    items = [layer] if isinstance(layer, int) else layer
    if isinstance(layer, bool) or not isinstance(items, Sequence) or not items:
        raise InputError(
            f"vision_feature_layer must be an int or a non-empty list of ints in {valid} "
            f"(got {layer!r})"
        )
    for index in items:
        if isinstance(index, bool) or not isinstance(index, int):
            raise InputError(f"vision_feature_layer must hold ints (got {index!r} in {layer!r})")
        if not -(num_layers + 1) <= index <= num_layers:
            raise InputError(
                f"vision_feature_layer {index} is out of range: the vision tower has "
                f"{num_layers} layers, so {num_layers + 1} hidden states, indexed {valid}"
            )


def feature_hook_names(stack: str, layer: FeatureLayer, num_layers: int) -> list[str]:
    """The hook names of hidden state(s) `layer` of a tower whose layers are `stack`.

    Hidden state 0 is the first layer's input (``{stack}.0.hook_resid_pre``), hidden state i
    the output of layer i - 1 (``{stack}.{i-1}.hook_resid_post``).
    """
    check_feature_layer(layer, num_layers)
    indices = [i % (num_layers + 1) for i in layer_list(layer)]
    return [
        f"{stack}.0.hook_resid_pre" if i == 0 else f"{stack}.{i - 1}.hook_resid_post"
        for i in indices
    ]


def check_strategy(strategy: Any) -> Strategy:
    """Check a `vision_feature_select_strategy` ("default" drops CLS, "full" keeps it)."""
    if strategy == "default":
        return "default"
    if strategy == "full":
        return "full"
    raise InputError(
        f"vision_feature_select_strategy must be 'default' (drop the CLS token) or 'full' "
        f"(keep it); got {strategy!r}"
    )


def hidden_states_of(vision_outputs: Any) -> Sequence[torch.Tensor | None]:
    """The hidden states of a tower output (a ModelOutput, or the hidden states themselves)."""
    hidden = getattr(vision_outputs, "hidden_states", vision_outputs)
    if isinstance(hidden, torch.Tensor) or not isinstance(hidden, Sequence):
        raise InputError(
            "feature_select needs the vision tower's hidden states: pass the tower's output "
            "computed with output_hidden_states=True (or the tuple of hidden states)"
        )
    return hidden


def select_features(
    hidden_states: Sequence[torch.Tensor | None],
    layer: FeatureLayer,
    strategy: Strategy,
    num_layers: int,
) -> torch.Tensor:
    """LLaVA's feature selection: hidden state(s) `layer`, without CLS for "default".

    Several layers are concatenated on the last dimension, as HF's LLaVA does.

    Returns:
        ``[batch, num_patches (+1 for "full"), hidden * len(layers)]``
    """
    check_feature_layer(layer, num_layers)
    if len(hidden_states) != num_layers + 1:
        raise InputError(
            f"expected the {num_layers + 1} hidden states of a {num_layers}-layer tower, "
            f"got {len(hidden_states)}"
        )
    picked = []
    for index in layer_list(layer):
        state = hidden_states[index]
        if state is None:
            raise InputError(
                f"hidden state {index} was not recorded; run the tower with "
                "output_hidden_states=True"
            )
        picked.append(state[:, 1:] if strategy == "default" else state)
    return picked[0] if len(picked) == 1 else torch.cat(picked, dim=-1)


def check_pixel_values(
    pixel_values: Any, channels: int, image_size: int | None, what: str = "pixel_values"
) -> None:
    """Check a batch of images ``[num_images, channels, height, width]``.

    Args:
        image_size: the side the tower expects, or None to accept any size.

    Raises:
        InputError: not a tensor, wrong number of dimensions, channels or size.
    """
    if not isinstance(pixel_values, torch.Tensor):
        raise InputError(
            f"{what} must be a tensor [num_images, {channels}, height, width] "
            f"(got {type(pixel_values).__name__}); to pass PIL images use images=[...] "
            "with text, which runs the processor"
        )
    expected = f"[num_images, {channels}, {image_size or 'height'}, {image_size or 'width'}]"
    shape = tuple(pixel_values.shape)
    if pixel_values.dim() != 4:
        raise InputError(f"{what} must have 4 dimensions {expected}; got shape {shape}")
    if shape[1] != channels:
        raise InputError(
            f"{what} must have {channels} channels in dimension 1 {expected}; got shape {shape}"
        )
    if image_size is not None and shape[2:] != (image_size, image_size):
        raise InputError(
            f"{what} must be {image_size}x{image_size} images {expected} (the vision tower's "
            f"image_size); got shape {shape}"
        )


@dataclass(frozen=True)
class ImageTokens:
    """Where one image's tokens sit in the language-model sequence.

    Attributes:
        image: index of the image, in the order the model consumes the images.
        batch: the row of ``input_ids`` holding it.
        positions: ``[n_tokens]`` positions of its tokens in that row.
    """

    image: int
    batch: int
    positions: torch.Tensor

    @property
    def start(self) -> int:
        """First position of the image's tokens."""
        return int(self.positions[0])

    @property
    def stop(self) -> int:
        """One past the last position (the tokens are contiguous)."""
        return int(self.positions[-1]) + 1

    def __len__(self) -> int:
        return int(self.positions.numel())


def image_token_positions(
    input_ids: torch.Tensor, image_token_id: int, tokens_per_image: int | None
) -> list[ImageTokens]:
    """Find each image's tokens in `input_ids`, row by row, wherever the padding is.

    Args:
        input_ids: ``[batch, pos]`` (or ``[pos]``) token ids, image tokens already expanded.
        image_token_id: the id of the image token.
        tokens_per_image: tokens per image (LLaVA: one per selected patch); None splits the
            image tokens of a row into contiguous runs, one image per run (any-resolution
            models, whose images differ in token count).

    Returns:
        One `ImageTokens` per image, ordered by row and position (the order in which HF's
        LLaVA fills image features in).

    Raises:
        InputError: a row's image tokens are not a multiple of `tokens_per_image`.
    """
    ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
    found: list[ImageTokens] = []
    for row in range(ids.shape[0]):
        positions = (ids[row] == image_token_id).nonzero().flatten()
        for chunk in _split(positions, tokens_per_image, row):
            found.append(ImageTokens(len(found), row, chunk))
    return found


def _split(positions: torch.Tensor, size: int | None, row: int) -> list[torch.Tensor]:
    if positions.numel() == 0:
        return []
    if size is None:
        breaks = (positions.diff() != 1).nonzero().flatten() + 1
        return list(torch.tensor_split(positions, breaks.tolist()))
    if positions.numel() % size:
        raise InputError(
            f"row {row} of input_ids has {positions.numel()} image tokens, which is not a "
            f"multiple of the {size} tokens one image takes"
        )
    return list(torch.split(positions, size))


def check_image_tokens(
    input_ids: torch.Tensor, image_token_id: int, num_images: int, tokens_per_image: int
) -> None:
    """Check that `input_ids` holds exactly the image tokens `num_images` images fill.

    Raises:
        InputError: naming the count found and the count expected.
    """
    found = int((input_ids == image_token_id).sum())
    expected = num_images * tokens_per_image
    if found != expected:
        raise InputError(
            f"input_ids has {found} image tokens (id {image_token_id}), but {num_images} "
            f"image(s) need {num_images} x {tokens_per_image} = {expected}. Put one image "
            "placeholder per image in the text and let the processor expand it "
            "(bridge(text, images=[...])), or pass as many images as the text has"
        )
