"""Edits reach the logits, and equal the same edit made with torch hooks on the HF model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from bridge_core import TransformerBridge
from bridge_qwen2vl.tiny import IMAGE_PROMPT

TWO = f"{IMAGE_PROMPT} Compare this with {IMAGE_PROMPT} that."


def with_torch_hook(
    model: Any, module: torch.nn.Module, hook: Callable[..., Any], inputs: Any, pre: bool = False
) -> torch.Tensor:
    if pre:
        handle = module.register_forward_pre_hook(hook, prepend=True)
    else:
        handle = module.register_forward_hook(hook, prepend=True)
    try:
        with torch.no_grad():
            return model(**inputs).logits  # type: ignore[no-any-return]
    finally:
        handle.remove()


def test_an_edit_at_the_selected_vision_layer_changes_the_logits(
    bridge: TransformerBridge, model: Any, processor: Any, images: list[Any]
) -> None:
    inputs = dict(processor(text=TWO, images=images, return_tensors="pt"))
    clean = bridge(**inputs)
    (selected,) = bridge.vision_encoder.selected_hook_names
    assert selected == "vision_encoder.layers.1.hook_resid_post"

    def halve(resid: torch.Tensor, hook: Any) -> torch.Tensor:
        return resid * 0.5

    edited = bridge.run_with_hooks(**inputs, fwd_hooks=[(selected, halve)])
    block = model.model.visual.blocks[1]
    reference = with_torch_hook(model, block, lambda m, a, out: out * 0.5, inputs)
    assert torch.equal(edited, reference) and not torch.equal(edited, clean)
    # the same through the merger's input, which is that very tensor
    through = bridge.run_with_hooks(**inputs, fwd_hooks=[("vision_projector.hook_in", halve)])
    assert torch.equal(through, reference)


def test_an_edit_of_resid_pre_at_image_positions_changes_the_logits(
    bridge: TransformerBridge, model: Any, processor: Any, images: list[Any]
) -> None:
    inputs = dict(processor(text=TWO, images=images, return_tensors="pt"))
    layout = bridge.image_layout(**inputs)
    second = layout.image(1).positions  # the second image's tokens only

    def ablate(resid: torch.Tensor, hook: Any) -> torch.Tensor:
        resid = resid.clone()
        resid[0, second] = 0
        return resid

    def torch_ablate(module: Any, args: Any, kwargs: Any) -> Any:
        hidden = args[0].clone() if args else kwargs["hidden_states"].clone()
        hidden[0, second] = 0
        return (
            ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
        )

    edited = bridge.run_with_hooks(**inputs, fwd_hooks=[("blocks.0.hook_resid_pre", ablate)])
    layer = model.model.language_model.layers[0]
    handle = layer.register_forward_pre_hook(torch_ablate, with_kwargs=True, prepend=True)
    try:
        with torch.no_grad():
            reference = model(**inputs).logits
    finally:
        handle.remove()
    assert torch.equal(edited, reference) and not torch.equal(edited, bridge(**inputs))


def test_an_edit_of_one_images_pattern_leaves_the_other_image_alone(
    bridge: TransformerBridge, processor: Any, images: list[Any]
) -> None:
    inputs = dict(processor(text=TWO, images=images, return_tensors="pt"))
    name = "vision_encoder.layers.1.attn.hook_pattern"  # full attention: one call per image

    def uniform_second(pattern: torch.Tensor, hook: Any) -> torch.Tensor | None:
        hook.ctx["call"] = hook.ctx.get("call", 0) + 1
        return torch.full_like(pattern, 1 / pattern.shape[-1]) if hook.ctx["call"] == 2 else None

    _, clean = bridge.run_with_cache(**inputs, names_filter="hook_vision_out")
    point = bridge.hook_dict[name]
    point.clear_context()
    with bridge.hooks(fwd_hooks=[(name, uniform_second)]):
        _, edited = bridge.run_with_cache(**inputs, names_filter="hook_vision_out")
    point.clear_context()
    first, second = (im.vision_rows for im in bridge.image_layout(**inputs).images)
    assert len(first) == 60 and len(second) == 64  # the tower tokens of each image
    out, ref = edited["hook_vision_out"], clean["hook_vision_out"]
    assert torch.equal(out[first], ref[first])
    assert not torch.equal(out[second], ref[second])
