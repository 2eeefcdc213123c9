"""Qwen2-VL's processor for text and images, also where transformers cannot build its own.

transformers' `Qwen2VLProcessor` (and `Qwen2_5_VLProcessor`) hold a video processor too, which
transformers 5 builds only with torchvision installed: without it, ``AutoProcessor`` fails on
every Qwen2-VL checkpoint, and so `boot` finds no processor. `ImageTextProcessor` is the same
processor without the video part (text and images work exactly as in the full one), and
`load_processor` builds it from a checkpoint's own files.
"""

from __future__ import annotations

from typing import Any, cast

from transformers import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

IMAGE_PROMPT = "<|vision_start|><|image_pad|><|vision_end|>"
"""What Qwen2-VL's chat template puts where an image goes; the processor expands the
``<|image_pad|>`` into one token per merged 2x2 patch block."""


class ImageTextProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` for text and images only (no video processor, so no torchvision)."""

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Build from a Qwen2-VL image processor and a tokenizer with Qwen2-VL's vision tokens.

        Raises:
            ValueError: the tokenizer lacks ``<|image_pad|>``.
        """
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        if self.image_token_id in (None, tokenizer.unk_token_id):
            raise ValueError(f"the tokenizer has no {self.image_token!r} token")
        # ProcessorMixin.__init__ is unannotated in transformers (mypy --strict flags the call)
        ProcessorMixin.__init__(  # type: ignore[no-untyped-call]
            self, image_processor, tokenizer, chat_template=chat_template
        )


def load_processor(source: str, **hub: Any) -> ImageTextProcessor:
    """An `ImageTextProcessor` from a checkpoint's files (hub id or directory).

    For environments without torchvision, where ``AutoProcessor`` cannot build Qwen2-VL's
    processor: ``bridge.processor = load_processor("Qwen/Qwen2-VL-2B-Instruct")``.

    Args:
        **hub: ``from_pretrained`` keywords (``revision``, ``cache_dir``, ``token`` ...).
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, **hub)
    image_processor = cast(Any, AutoImageProcessor).from_pretrained(source, **hub)  # untyped
    template = getattr(tokenizer, "chat_template", None)
    return ImageTextProcessor(image_processor, tokenizer, chat_template=template)
