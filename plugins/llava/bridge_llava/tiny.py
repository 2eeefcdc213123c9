"""Tiny random-weight LLaVA / LLaVA-NeXT models with real processors, for tests and demos.

Built locally and deterministically: a seeded CLIP vision tower + Llama (GQA) language model,
the byte-level BPE tokenizer from `bridge_adapters.tiny` with an added `<image>` special token,
and a CLIP image processor configured from parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Literal

import numpy as np
from PIL import Image
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.image_processing_utils import BaseImageProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorKwargs,
)
from transformers.processing_utils import ImagesKwargs
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.utils.import_utils import is_torchvision_available

from bridge_adapters.tiny import build_tokenizer, init_model

__all__ = [
    "IMAGE_TOKEN",
    "LLAVA_CHAT_TEMPLATE",
    "VisionFeatureSelectStrategy",
    "num_image_tokens",
    "tiny_image",
    "tiny_llava",
    "tiny_llava_next",
]

IMAGE_TOKEN: Final[str] = "<image>"

LLAVA_CHAT_TEMPLATE: Final[str] = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ ' ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
"""A llava-1.5-style template: `USER: <image>\\nWhat is this? ASSISTANT:`."""

VisionFeatureSelectStrategy = Literal["default", "full"]


def num_image_tokens(
    image_size: int, patch_size: int, strategy: VisionFeatureSelectStrategy
) -> int:
    """Return how many `<image>` tokens one base image expands to (CLS dropped for "default").

    Args:
        image_size: Square input resolution of the vision tower.
        patch_size: Patch size of the vision tower.
        strategy: `vision_feature_select_strategy`.

    Returns:
        `(image_size // patch_size) ** 2`, plus one for the CLS token with "full".
    """
    return (image_size // patch_size) ** 2 + (1 if strategy == "full" else 0)


def _tokenizer() -> PreTrainedTokenizerFast:
    """Return the Llama-style tokenizer with `<image>` as an extra special token."""
    return build_tokenizer(512, add_bos=True, extra_special_tokens=(IMAGE_TOKEN,))


def _vision_config(
    layers: int, hidden: int, heads: int, image_size: int, patch_size: int
) -> CLIPVisionConfig:
    """Return a small CLIP vision-tower config."""
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        projection_dim=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
    )


def _text_config(
    tokenizer: PreTrainedTokenizerFast, layers: int, hidden: int, heads: int, kv_heads: int
) -> LlamaConfig:
    """Return a small Llama (GQA) language-model config matching the tokenizer."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _clip_processor_kwargs(image_size: int) -> ImagesKwargs:
    """Return CLIP-style preprocessing parameters for a square `image_size` input."""
    return ImagesKwargs(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        do_convert_rgb=True,
    )


def _image_token_id(tokenizer: PreTrainedTokenizerFast) -> int:
    """Return the id of the `<image>` special token."""
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if not isinstance(token_id, int):
        raise TypeError(f"expected one id for {IMAGE_TOKEN!r}, got {token_id!r}")
    return token_id


def _clip_image_processor(image_size: int) -> BaseImageProcessor:
    """Return a CLIP image processor on the backend AutoImageProcessor would pick here.

    Matching AutoImageProcessor's choice (torchvision when installed, else PIL) keeps pixel
    values identical after a save/load round trip; the two backends resize differently.
    """
    if is_torchvision_available():
        # Imported lazily: without torchvision, `transformers.CLIPImageProcessor` is a
        # warning-emitting alias of the PIL class.
        from transformers.models.clip.image_processing_clip import CLIPImageProcessor

        return CLIPImageProcessor(**_clip_processor_kwargs(image_size))
    return CLIPImageProcessorPil(**_clip_processor_kwargs(image_size))


def tiny_llava(
    *,
    vision_layers: int = 2,
    text_layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    text_hidden: int = 64,
    seed: int = 0,
    vision_feature_layer: int | Sequence[int] = -2,
    vision_feature_select_strategy: VisionFeatureSelectStrategy = "default",
    vision_heads: int = 4,
    text_heads: int = 4,
    text_kv_heads: int = 2,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Build a tiny random LLaVA (CLIP vision tower + GQA Llama) and its LlavaProcessor.

    The processor expands each `<image>` in the text into `num_image_tokens(...)` tokens, so
    `model(**processor(text="<image> What is this?", images=[img], return_tensors="pt"))` works.

    Args:
        vision_layers: CLIP encoder layers.
        text_layers: Llama decoder layers.
        image_size: Square input resolution (the processor resizes and crops to it).
        patch_size: CLIP patch size; `image_size` should be a multiple of it.
        vision_hidden: CLIP width (MLP is 4x).
        text_hidden: Llama width (MLP is 2x).
        seed: Weight-initialisation seed.
        vision_feature_layer: Vision hidden-state index (or indices, concatenated) fed to the
            projector.
        vision_feature_select_strategy: "default" drops CLS, "full" keeps it.
        vision_heads: CLIP attention heads.
        text_heads: Llama query heads.
        text_kv_heads: Llama key/value heads.

    Returns:
        (model, processor), the model float32 in eval mode.
    """
    tokenizer = _tokenizer()
    config = LlavaConfig(
        vision_config=_vision_config(
            vision_layers, vision_hidden, vision_heads, image_size, patch_size
        ),
        text_config=_text_config(tokenizer, text_layers, text_hidden, text_heads, text_kv_heads),
        image_token_index=_image_token_id(tokenizer),
        image_seq_length=num_image_tokens(image_size, patch_size, vision_feature_select_strategy),
        vision_feature_layer=_feature_layer(vision_feature_layer),
        vision_feature_select_strategy=vision_feature_select_strategy,
    )
    # LlavaProcessor.__init__ is unannotated in transformers, so mypy --strict flags the call.
    processor = LlavaProcessor(  # type: ignore[no-untyped-call]
        image_processor=_clip_image_processor(image_size),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=vision_feature_select_strategy,
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    return init_model(LlavaForConditionalGeneration, config, seed), processor


def _feature_layer(layer: int | Sequence[int]) -> int | list[int]:
    """Normalise `vision_feature_layer` to what the HF config accepts (an int or a list)."""
    return layer if isinstance(layer, int) else list(layer)


def _llava_next_image_processor(image_size: int, pinpoints: list[list[int]]) -> BaseImageProcessor:
    """Return a LLaVA-NeXT (any-resolution) image processor on AutoImageProcessor's backend."""
    kwargs = LlavaNextImageProcessorKwargs(
        **_clip_processor_kwargs(image_size), image_grid_pinpoints=pinpoints
    )
    if is_torchvision_available():
        # Imported lazily for the same reason as in `_clip_image_processor`.
        from transformers.models.llava_next.image_processing_llava_next import (
            LlavaNextImageProcessor,
        )

        return LlavaNextImageProcessor(**kwargs)
    return LlavaNextImageProcessorPil(**kwargs)


def tiny_llava_next(
    *,
    vision_layers: int = 2,
    text_layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    text_hidden: int = 64,
    seed: int = 0,
    vision_feature_layer: int | Sequence[int] = -2,
    vision_feature_select_strategy: VisionFeatureSelectStrategy = "default",
    image_grid_pinpoints: Sequence[Sequence[int]] | None = None,
) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """Build a tiny random LLaVA-NeXT (any-resolution tiling) and its LlavaNextProcessor.

    Same towers as `tiny_llava` (4 CLIP heads; Llama with 4 query and 2 key/value heads).

    Args:
        vision_layers: CLIP encoder layers.
        text_layers: Llama decoder layers.
        image_size: Tile resolution of the vision tower.
        patch_size: CLIP patch size.
        vision_hidden: CLIP width.
        text_hidden: Llama width.
        seed: Weight-initialisation seed.
        vision_feature_layer: Vision hidden-state index (or indices) fed to the projector.
        vision_feature_select_strategy: "default" drops CLS, "full" keeps it.
        image_grid_pinpoints: Allowed (height, width) resolutions, multiples of `image_size`;
            default 1x2, 2x1 and 2x2 tiles.

    Returns:
        (model, processor), the model float32 in eval mode. Image-token counts depend on the
        image's size (base tile + tiles + one newline token per feature row).
    """
    tokenizer = _tokenizer()
    s = image_size
    pinpoints = [list(p) for p in image_grid_pinpoints or ([s, 2 * s], [2 * s, s], [2 * s, 2 * s])]
    config = LlavaNextConfig(
        vision_config=_vision_config(vision_layers, vision_hidden, 4, image_size, patch_size),
        text_config=_text_config(tokenizer, text_layers, text_hidden, 4, 2),
        image_token_index=_image_token_id(tokenizer),
        image_seq_length=num_image_tokens(image_size, patch_size, vision_feature_select_strategy),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=_feature_layer(vision_feature_layer),
        vision_feature_select_strategy=vision_feature_select_strategy,
    )
    # LlavaNextProcessor.__init__ is unannotated in transformers (see tiny_llava).
    processor = LlavaNextProcessor(  # type: ignore[no-untyped-call]
        image_processor=_llava_next_image_processor(image_size, pinpoints),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=vision_feature_select_strategy,
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    return init_model(LlavaNextForConditionalGeneration, config, seed), processor


def tiny_image(
    size: int = 64, kind: Literal["gradient", "checkerboard"] = "gradient", seed: int = 0
) -> Image.Image:
    """Return a deterministic RGB test image.

    Args:
        size: Width and height in pixels.
        kind: "gradient" (red ramps left-right, green top-down, seeded blue) or
            "checkerboard" (8x8 squares in two seeded colours).
        seed: Seed for the colours.

    Returns:
        A `size` x `size` RGB PIL image.
    """
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size)
    if kind == "gradient":
        red, green = np.meshgrid(ramp, ramp)
        blue = np.full((size, size), rng.integers(0, 256))
        pixels = np.stack([red, green, blue], axis=-1)
    elif kind == "checkerboard":
        cell = max(1, size // 8)
        ys, xs = np.indices((size, size)) // cell
        colours = rng.integers(0, 256, size=(2, 3))
        pixels = colours[(ys + xs) % 2]
    else:
        raise ValueError(f"unknown image kind {kind!r}; use 'gradient' or 'checkerboard'")
    return Image.fromarray(pixels.astype(np.uint8))
