"""Gradients of any metric, through the language model, the projector and the tower to pixels."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bridge_core import InputError, TransformerBridge


def logit_diff(logits: torch.Tensor) -> torch.Tensor:
    return logits[0, -1, 42] - logits[0, -1, 7]


def test_metric_gradients_equal_autograd_on_the_hf_model(
    bridge: TransformerBridge, llava: tuple[Any, Any], inputs: dict[str, torch.Tensor]
) -> None:
    model, _ = llava
    pixels = inputs["pixel_values"].clone().requires_grad_(True)
    names = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "vision_projector.hook_out"]
    _, cache = bridge.run_with_cache(
        **{**inputs, "pixel_values": pixels}, incl_bwd=True, metric=logit_diff, names_filter=names
    )
    hf_pixels = inputs["pixel_values"].clone().requires_grad_(True)
    out = model(**{**inputs, "pixel_values": hf_pixels}, output_hidden_states=True)
    for hidden in out.hidden_states:
        hidden.retain_grad()
    logit_diff(out.logits).backward()
    model.zero_grad(set_to_none=True)
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    assert torch.equal(pixels.grad, hf_pixels.grad)
    assert torch.equal(cache["blocks.0.hook_resid_pre_grad"], out.hidden_states[0].grad)
    assert torch.equal(cache["resid_post_grad", 0], out.hidden_states[1].grad)
    image_grad = cache["blocks.0.hook_resid_pre_grad"][0, cache.image_layout[0][0].positions]
    assert torch.equal(cache["vision_projector.hook_out_grad"][0], image_grad)


def test_bad_metrics_are_refused(
    bridge: TransformerBridge, inputs: dict[str, torch.Tensor]
) -> None:
    with pytest.raises(InputError, match="pass incl_bwd=True too"):
        bridge.run_with_cache(**inputs, metric=logit_diff)
    with pytest.raises(InputError, match=r"scalar tensor .*got \(1, 40, 512\)"):
        bridge.run_with_cache(**inputs, incl_bwd=True, metric=lambda logits: logits)
    with pytest.raises(InputError, match="without gradient"):
        bridge.run_with_cache(**inputs, incl_bwd=True, metric=lambda lg: logit_diff(lg).detach())
    with pytest.raises(InputError, match=r"return_type='loss'\) or a metric"):
        bridge.run_with_cache(**inputs, incl_bwd=True)
