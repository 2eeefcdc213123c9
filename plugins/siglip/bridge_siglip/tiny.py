"""Tiny random-weight SigLIP vision-language models with real processors, for tests and demos.

Built locally and deterministically, no downloads: a seeded SigLIP tower (2 layers, width 32,
32-pixel images in 8-pixel patches: a 4 x 4 grid), a 2-layer language model of the family,
the byte-level BPE tokenizer of `bridge_adapters.tiny` with the family's special tokens, and
the family's image processor configured from parameters.

| builder | model | language model | image tokens |
|---|---|---|---|
| `tiny_paligemma` | PaliGemma (`text="gemma2"`: PaliGemma 2) | Gemma / Gemma-2 | 16 per image |
| `tiny_gemma3` | Gemma-3 (image + text) | Gemma-3 | 4 per image (2 x 2 pooling) |
| `tiny_idefics3` | Idefics3 / SmolVLM | Llama | 4 per tile (pixel shuffle 2), tiles + global |
| `tiny_llava_onevision` | LLaVA-OneVision | Qwen2 | any resolution: base + tiles + newlines |
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, Literal

import torch
from transformers import (
    Gemma2Config,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Gemma3TextConfig,
    GemmaConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)
from transformers.processing_utils import ProcessorMixin
from transformers.utils.constants import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD

from bridge_adapters.tiny import build_tokenizer, init_model

__all__ = [
    "ImageOnlyOnevisionProcessor",
    "GEMMA3_CHAT_TEMPLATE",
    "IDEFICS3_CHAT_TEMPLATE",
    "tiny_gemma3",
    "tiny_idefics3",
    "tiny_llava_onevision",
    "tiny_paligemma",
]

IMAGE_SIZE: Final = 32
PATCH_SIZE: Final = 8
VOCAB: Final = 512

GEMMA3_CHAT_TEMPLATE: Final[str] = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) "
    "+ '\n' }}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
"""Gemma-3's turn format: `<start_of_turn>user\\n<start_of_image>What is this?<end_of_turn>`."""

IDEFICS3_CHAT_TEMPLATE: Final[str] = (
    "<|begin_of_text|>{% for message in messages %}"
    "{{ message['role'] | capitalize }}:{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>' }}"
    "{% elif item['type'] == 'text' %}{{ ' ' + item['text'] }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
"""Idefics3's turns: `User:<image> What is this?<end_of_utterance>\\nAssistant:`."""


def _vision(
    layers: int, hidden: int = 32, image_size: int = IMAGE_SIZE, **extra: Any
) -> SiglipVisionConfig:
    config = SiglipVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=PATCH_SIZE,
        **extra,
    )
    # as the VLM checkpoints: no pooling head (an attribute: before transformers 5.24 the
    # config's signature does not name it, and the model reads it either way)
    config.vision_use_head = False
    return config


def _text_sizes(tokenizer: PreTrainedTokenizerFast, layers: int) -> dict[str, Any]:
    """Sizes of a 2-layer, width-64 language model with grouped-query attention."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    found = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(found, int):
        raise TypeError(f"expected one id for {token!r}, got {found!r}")
    return found


# -- PaliGemma ----------------------------------------------------------------------------


def tiny_paligemma(
    *, text: Literal["gemma", "gemma2"] = "gemma", layers: int = 2, seed: int = 0
) -> tuple[PaliGemmaForConditionalGeneration, PaliGemmaProcessor]:
    """Build a tiny random PaliGemma (SigLIP + Gemma, or Gemma-2 for PaliGemma 2).

    The processor puts the image tokens first, then BOS, the prompt and a newline (PaliGemma's
    prefix format): `processor(text="caption en", images=[image])` or `"<image>caption en"`.
    The prefix attends bidirectionally (``token_type_ids``).

    Args:
        text: the language model: "gemma" (PaliGemma) or "gemma2" (PaliGemma 2, with
            post-norms, soft-capping and a 4-token sliding window on layer 0).
        layers: layers of the tower and of the language model.
        seed: weight-initialisation seed.

    Returns:
        (model, processor), the model float32 in eval mode.
    """
    tokenizer = build_tokenizer(VOCAB, add_bos=True, extra_special_tokens=("<image>",))
    image_processor = SiglipImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(IMAGENET_STANDARD_MEAN),
        image_std=list(IMAGENET_STANDARD_STD),
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
    )
    # PaliGemmaProcessor.__init__ is unannotated; it adds PaliGemma's <loc>/<seg> tokens
    processor = PaliGemmaProcessor(  # type: ignore[no-untyped-call]
        image_processor=image_processor, tokenizer=tokenizer
    )
    sizes = _text_sizes(tokenizer, layers)
    text_config: GemmaConfig | Gemma2Config
    if text == "gemma":
        text_config = GemmaConfig(head_dim=16, **sizes)
    else:
        text_config = Gemma2Config(
            head_dim=16,
            sliding_window=4,
            query_pre_attn_scalar=16,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
            layer_types=["sliding_attention", "full_attention"][:layers],
            **sizes,
        )
    config = PaliGemmaConfig(
        vision_config=_vision(layers),
        text_config=text_config,
        image_token_index=processor.image_token_id,
        projection_dim=64,
        hidden_size=64,
        vocab_size=len(tokenizer),
    )
    return init_model(PaliGemmaForConditionalGeneration, config, seed), processor


# -- Gemma-3 -----------------------------------------------------------------------------


def _gemma3_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer with Gemma-3's named image tokens (``tokenizer.boi_token`` ...)."""
    named = {
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
        "image_token": "<image_soft_token>",
    }
    base = build_tokenizer(
        VOCAB,
        bos="<bos>",
        eos="<eos>",
        extra_special_tokens=(*named.values(), "<start_of_turn>", "<end_of_turn>"),
    )
    # TokenizersBackend.__init__ takes untyped *args/**kwargs, hence the ignore.
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=base.backend_tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=named,
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
    )


def tiny_gemma3(
    *, layers: int = 2, tokens_per_image: int = 4, seed: int = 0
) -> tuple[Gemma3ForConditionalGeneration, Gemma3Processor]:
    """Build a tiny random Gemma-3 (SigLIP + Gemma-3 text, image and text in) and its processor.

    The projector average-pools the 4 x 4 patch grid to `tokens_per_image` tokens, normalizes
    them and projects them. In text, `<start_of_image>` marks an image; the processor expands
    it to ``\\n\\n<start_of_image>`` + the image's soft tokens + ``<end_of_image>\\n\\n``.
    ``processor(..., do_pan_and_scan=True)`` adds crops of wide or tall images as further
    views (with the processor's defaults: crops of at least 256 pixels).

    Args:
        layers: layers of the tower and of the language model (layer 0 of the language
            model has a 4-token sliding window).
        tokens_per_image: a square number dividing 16 (4: 2 x 2 pooling; 16: none).
        seed: weight-initialisation seed.

    Returns:
        (model, processor), the model float32 in eval mode.
    """
    tokenizer = _gemma3_tokenizer()
    text_config = Gemma3TextConfig(
        head_dim=16,
        sliding_window=4,
        query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"][:layers],
        **_text_sizes(tokenizer, layers),
    )
    config = Gemma3Config(
        vision_config=_vision(layers),
        text_config=text_config,
        mm_tokens_per_image=tokens_per_image,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
    )
    image_processor = Gemma3ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=tokens_per_image,
        chat_template=GEMMA3_CHAT_TEMPLATE,
    )
    model = init_model(Gemma3ForConditionalGeneration, config, seed)
    # transformers initializes the projection matrix to zeros (images would reach nothing)
    weight = model.model.multi_modal_projector.mm_input_projection_weight
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=generator) * weight.shape[0] ** -0.5)
    return model, processor


# -- Idefics3 / SmolVLM ------------------------------------------------------------------


IDEFICS3_TOKENS: Final = (
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
    "<global-img>",
    *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
)


def tiny_idefics3(
    *, layers: int = 2, split: bool = True, seed: int = 0
) -> tuple[Idefics3ForConditionalGeneration, Idefics3Processor]:
    """Build a tiny random Idefics3 (SigLIP-style tower, pixel-shuffle connector, Llama).

    SmolVLM checkpoints are this class too. The image processor scales an image's longest
    edge to 64 pixels and, with `split`, cuts it into 32-pixel tiles (up to 2 x 2) plus a
    32 x 32 global view; each tile or view takes 4 image tokens (16 patches shuffled by 2).
    In text, `<image>` marks an image; the processor expands it with Idefics3's tile tags
    (``<fake_token_around_image><row_1_col_1>`` ... ``<global-img>``).

    Args:
        layers: layers of the tower and of the language model.
        split: split images into tiles (else each image is one 32 x 32 view).
        seed: weight-initialisation seed.

    Returns:
        (model, processor), the model float32 in eval mode.
    """
    tokenizer = build_tokenizer(VOCAB, add_bos=True, extra_special_tokens=IDEFICS3_TOKENS)
    vision = Idefics3VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    config = Idefics3Config(
        vision_config=vision,
        text_config=LlamaConfig(**_text_sizes(tokenizer, layers)),
        image_token_id=_token_id(tokenizer, "<image>"),
        scale_factor=2,
    )
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
        do_image_splitting=split,
        image_mean=list(IMAGENET_STANDARD_MEAN),
        image_std=list(IMAGENET_STANDARD_STD),
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=(IMAGE_SIZE // PATCH_SIZE) ** 2 // 4,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    return init_model(Idefics3ForConditionalGeneration, config, seed), processor


# -- LLaVA-OneVision ----------------------------------------------------------------------


class ImageOnlyOnevisionProcessor(LlavaOnevisionProcessor):
    """LLaVA-OneVision's processor for images and text only.

    transformers' `LlavaOnevisionProcessor` requires a video processor, which needs
    torchvision; this one takes none (videos are refused), and is otherwise the same.
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        num_image_tokens: int | None = None,
        vision_feature_select_strategy: str | None = None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        video_token: str = "<video>",
        vision_aspect_ratio: str = "anyres_max_9",
        **kwargs: Any,
    ) -> None:
        self.num_image_tokens = num_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token = image_token
        self.video_token = video_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(video_token)
        self.vision_aspect_ratio = vision_aspect_ratio
        # ProcessorMixin.__init__ is unannotated; skip LlavaOnevisionProcessor's (video check)
        ProcessorMixin.__init__(  # type: ignore[no-untyped-call]
            self, image_processor, tokenizer, chat_template=chat_template
        )


def tiny_llava_onevision(
    *,
    layers: int = 2,
    seed: int = 0,
    image_grid_pinpoints: Sequence[Sequence[int]] | None = None,
    vision_aspect_ratio: str = "anyres_max_9",
) -> tuple[LlavaOnevisionForConditionalGeneration, ImageOnlyOnevisionProcessor]:
    """Build a tiny random LLaVA-OneVision (SigLIP + projector + Qwen2), any resolution.

    As LLaVA-NeXT: a base view, then the tiles stitched and unpadded with a newline token per
    row; features from the tower's last layer before its post-layernorm
    (``vision_feature_layer=-1``), all of them ("full": SigLIP has no CLS token). A row with
    several images is not tiled (a padded base view each).

    Args:
        layers: layers of the tower and of the language model.
        seed: weight-initialisation seed.
        image_grid_pinpoints: allowed (height, width) resolutions, multiples of 32; default
            1x2, 2x1 and 2x2 tiles.
        vision_aspect_ratio: ``"anyres_max_N"``: a tiled view of more than N tiles' worth of
            tokens is interpolated down (``"anyres_max_1"`` shrinks every tiled view).

    Returns:
        (model, processor), the model float32 in eval mode.
    """
    tokenizer = build_tokenizer(VOCAB, add_bos=True, extra_special_tokens=("<image>", "<video>"))
    s = IMAGE_SIZE
    pinpoints = [list(p) for p in image_grid_pinpoints or ([s, 2 * s], [2 * s, s], [2 * s, 2 * s])]
    config = LlavaOnevisionConfig(
        vision_config=_vision(layers),
        text_config=Qwen2Config(**_text_sizes(tokenizer, layers)),
        image_token_index=_token_id(tokenizer, "<image>"),
        video_token_index=_token_id(tokenizer, "<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio,
    )
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": s, "width": s},
        image_grid_pinpoints=pinpoints,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = ImageOnlyOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=(s // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio,
    )
    return init_model(LlavaOnevisionForConditionalGeneration, config, seed), processor
