"""Text generation through HF's own `generate`, with the bridge's hooks active.

Hooks know where they are: while `generate` runs, every hook point that has hooks gets
``hook.ctx["step"]`` (0 for the prompt pass, then 1, 2, ... per new token) and
``hook.ctx["positions"]`` (the absolute positions of the current pos dimension in the padded
sequence), set by a forward pre-hook on the HF model before each of its forward passes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from bridge_core import tokens
from bridge_core.errors import InputError
from bridge_core.hooks import mark_tap, running

if TYPE_CHECKING:
    from bridge_core.bridgelike import BridgeLike
    from bridge_core.hooked_root import HookSpec


def generate(
    bridge: BridgeLike,
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

    Hooks attached to the bridge (and `fwd_hooks`, for this call only) run at every step,
    with ``hook.ctx["step"]`` and ``hook.ctx["positions"]`` set (see the module docstring), so
    a hook can act on new tokens only (``hook.ctx["step"] > 0``) or on given positions.

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
    cfg = bridge.cfg
    tokens.check_positions(inputs, cfg.n_ctx, cfg.positional_embedding_type, max_new_tokens)
    with bridge.hooks(fwd_hooks), _steps(bridge), torch.no_grad(), running(bridge._owner):
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


STEP_KEYS = ("step", "positions")


@contextmanager
def _steps(bridge: BridgeLike) -> Iterator[None]:
    """Set ``ctx["step"]`` and ``ctx["positions"]`` of the hooked points before each forward."""
    points = list(bridge.hook_dict.values())
    state = {"step": 0, "seen": 0}

    def before(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        length = _new_length(args, kwargs)
        mask = kwargs.get("attention_mask")
        start = mask.shape[1] - length if isinstance(mask, torch.Tensor) else state["seen"]
        positions = torch.arange(start, start + length)
        for point in points:
            if point.has_hooks():
                point.ctx["step"] = state["step"]
                point.ctx["positions"] = positions
        state["step"] += 1
        state["seen"] = start + length

    handle = bridge.original_model.register_forward_pre_hook(mark_tap(before), with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for point in points:
            for key in STEP_KEYS:
                point.ctx.pop(key, None)


def _new_length(args: Any, kwargs: dict[str, Any]) -> int:
    """Length of the pos dimension this forward computes (input ids or embeddings)."""
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args[:1]):
        if isinstance(value, torch.Tensor):
            return int(value.shape[1])
    return 0
