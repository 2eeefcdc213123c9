"""Tiny random-weight Qwen2-VL / Qwen2.5-VL models with real processors, for tests and demos.

Built locally and deterministically: a seeded vision transformer (4-pixel patches merged 2x2,
so one language-model token per 8x8 pixels) and a Qwen2 language model with M-RoPE, the
byte-level BPE tokenizer from `bridge_adapters.tiny` with Qwen2-VL's special tokens, and a
Qwen2-VL image processor configured from parameters (images resized to at most 32x32 pixels).
"""

from __future__ import annotations

from typing import Any, Final

from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.image_processing_utils import BaseImageProcessor
from transformers.utils.import_utils import is_torchvision_available

from bridge_adapters.tiny import build_tokenizer, init_model
from bridge_qwen2vl.processing import IMAGE_PROMPT, ImageTextProcessor

__all__ = ["CHAT_TEMPLATE", "IMAGE_PROMPT", "SPECIAL_TOKENS", "tiny_qwen2_5_vl", "tiny_qwen2_vl"]

SPECIAL_TOKENS: Final[tuple[str, ...]] = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

CHAT_TEMPLATE: Final[str] = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen2-VL's chat format: ``<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>
What is this?<|im_end|>\\n<|im_start|>assistant\\n``."""

PATCH: Final[int] = 4
MERGE: Final[int] = 2


def _tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer(512, extra_special_tokens=SPECIAL_TOKENS)


def _image_processor(max_side: int) -> BaseImageProcessor:
    """A Qwen2-VL image processor on the backend AutoImageProcessor would pick here."""
    kwargs: dict[str, Any] = {
        "patch_size": PATCH,
        "temporal_patch_size": 2,
        "merge_size": MERGE,
        "min_pixels": (PATCH * MERGE) ** 2,
        "max_pixels": max_side * max_side,
    }
    if is_torchvision_available():  # imported lazily, as in bridge_llava.tiny
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import (
            Qwen2VLImageProcessor,
        )

        return Qwen2VLImageProcessor(**kwargs)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    return Qwen2VLImageProcessorPil(**kwargs)


def _token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int):
        raise TypeError(f"expected one id for {token!r}, got {token_id!r}")
    return token_id


def _text_config(tokenizer: PreTrainedTokenizerFast, layers: int, hidden: int) -> dict[str, Any]:
    """A Qwen2 language model with grouped-query attention and M-RoPE over (t, h, w)."""
    head_dim = hidden // 4
    half = head_dim // 2  # M-RoPE sections split the rotary frequencies: t, h, w
    sections = [half - 2 * (half // 3), half // 3, half // 3]
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": sections,
        },
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _processor(tokenizer: PreTrainedTokenizerFast, max_side: int) -> ImageTextProcessor:
    return ImageTextProcessor(_image_processor(max_side), tokenizer, chat_template=CHAT_TEMPLATE)


def tiny_qwen2_vl(
    *,
    vision_layers: int = 2,
    text_layers: int = 2,
    vision_hidden: int = 32,
    text_hidden: int = 64,
    max_side: int = 32,
    seed: int = 0,
) -> tuple[Qwen2VLForConditionalGeneration, ImageTextProcessor]:
    """Build a tiny random Qwen2-VL and its processor.

    ``model(**processor(text=f"{IMAGE_PROMPT} What is this?", images=[img],
    return_tensors="pt"))`` works: the processor resizes each image to multiples of 8 pixels
    (at most ``max_side**2`` pixels), cuts it into 4x4-pixel patches and puts one
    ``<|image_pad|>`` token per 2x2 patches.

    Args:
        vision_layers: vision transformer blocks.
        text_layers: language-model layers.
        vision_hidden: vision width (4 heads; the MLP is 2x).
        text_hidden: language-model width (4 query and 2 key/value heads; the MLP is 2x).
        max_side: the largest square (in pixels) the processor resizes an image into.
        seed: weight-initialisation seed.

    Returns:
        (model, processor), the model float32 in eval mode.
    """
    tokenizer = _tokenizer()
    config = Qwen2VLConfig(
        text_config=_text_config(tokenizer, text_layers, text_hidden),
        vision_config={
            "depth": vision_layers,
            "embed_dim": vision_hidden,
            "hidden_size": text_hidden,
            "num_heads": 4,
            "mlp_ratio": 2,
            "patch_size": PATCH,
            "temporal_patch_size": 2,
            "spatial_merge_size": MERGE,
        },
        image_token_id=_token_id(tokenizer, "<|image_pad|>"),
        video_token_id=_token_id(tokenizer, "<|video_pad|>"),
        vision_start_token_id=_token_id(tokenizer, "<|vision_start|>"),
        vision_end_token_id=_token_id(tokenizer, "<|vision_end|>"),
    )
    return init_model(Qwen2VLForConditionalGeneration, config, seed), _processor(
        tokenizer, max_side
    )


def tiny_qwen2_5_vl(
    *,
    vision_layers: int = 2,
    text_layers: int = 2,
    vision_hidden: int = 32,
    text_hidden: int = 64,
    max_side: int = 32,
    window_size: int = 16,
    full_attention_layers: tuple[int, ...] = (1,),
    seed: int = 0,
) -> tuple[Qwen2_5_VLForConditionalGeneration, ImageTextProcessor]:
    """Build a tiny random Qwen2.5-VL (windowed vision attention) and its processor.

    As `tiny_qwen2_vl`, with Qwen2.5-VL's vision blocks (RMSNorm, gated MLP) attending within
    windows of ``window_size`` pixels (16: 2x2 merged tokens, 16 patches) except in
    `full_attention_layers`, which attend over each whole image.

    Returns:
        (model, processor), the model float32 in eval mode.
    """
    tokenizer = _tokenizer()
    config = Qwen2_5_VLConfig(
        text_config=_text_config(tokenizer, text_layers, text_hidden),
        vision_config={
            "depth": vision_layers,
            "hidden_size": vision_hidden,
            "out_hidden_size": text_hidden,
            "intermediate_size": 2 * vision_hidden,
            "num_heads": 4,
            "patch_size": PATCH,
            "temporal_patch_size": 2,
            "spatial_merge_size": MERGE,
            "window_size": window_size,
            "fullatt_block_indexes": list(full_attention_layers),
        },
        image_token_id=_token_id(tokenizer, "<|image_pad|>"),
        video_token_id=_token_id(tokenizer, "<|video_pad|>"),
        vision_start_token_id=_token_id(tokenizer, "<|vision_start|>"),
        vision_end_token_id=_token_id(tokenizer, "<|vision_end|>"),
    )
    return init_model(Qwen2_5_VLForConditionalGeneration, config, seed), _processor(
        tokenizer, max_side
    )
