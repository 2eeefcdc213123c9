"""Text generation through HF's own `generate`, with the bridge's hooks active."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch

from bridge_core import tokens
from bridge_core.errors import InputError
from bridge_core.hooks import running

if TYPE_CHECKING:
    from bridge_core.bridge import HookSpec, TransformerBridge


def generate(
    bridge: TransformerBridge,
    input: tokens.TextInput | torch.Tensor | None = None,
    *,
    images: Any = None,
    max_new_tokens: int = 10,
    do_sample: bool = False,
    fwd_hooks: Sequence[HookSpec] = (),
    prepend_bos: bool | None = None,
    padding_side: str | None = None,
    return_type: Literal["tokens", "str"] | None = None,
    **generate_kwargs: Any,
) -> torch.Tensor | str | list[str]:
    """Generate a continuation with the HF model's `generate` (greedy by default).

    Hooks attached to the bridge (and `fwd_hooks`, for this call only) run at every step.

    Args:
        input: text, a list of texts (left-padded), or input ids; or None with
            ``input_ids=`` and other HF keywords in `generate_kwargs`.
        images: images for a multimodal processor.
        return_type: "tokens" (the full sequences), "str" (decoded without special
            tokens); by default text for text input and tokens otherwise.

    Returns:
        The prompt followed by the generated tokens, as `return_type` asks.
    """
    if padding_side is None and isinstance(input, list):
        padding_side = "left"
    inputs = bridge.prepare_inputs(input, images, prepend_bos, padding_side, **generate_kwargs)
    with bridge.hooks(fwd_hooks), torch.no_grad(), running(bridge):
        output = bridge.original_model.generate(  # type: ignore[operator]  # HF GenerationMixin
            **inputs, max_new_tokens=max_new_tokens, do_sample=do_sample
        )
    sequences: torch.Tensor = output if isinstance(output, torch.Tensor) else output.sequences
    wants_text = return_type == "str" or (return_type is None and isinstance(input, str | list))
    if not wants_text:
        return sequences
    if bridge.tokenizer is None:
        raise InputError("return_type='str' needs a tokenizer; this bridge has none")
    texts = [str(bridge.tokenizer.decode(row, skip_special_tokens=True)) for row in sequences]
    return texts[0] if isinstance(input, str) else texts
