"""Patching sweeps equal the same patches written by hand as hooks."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bridge_core import InputError, TransformerBridge
from bridge_core.patching import Patch, activation_patch, patch_sweep


def last_logit(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, 7].sum()


@pytest.fixture(scope="module")
def runs(gpt2_bridge: TransformerBridge) -> tuple[torch.Tensor, torch.Tensor, Any]:
    gen = torch.Generator().manual_seed(5)
    clean, corrupted = torch.randint(3, 500, (2, 2, 6), generator=gen)
    with torch.no_grad():
        _, cache = gpt2_bridge.run_with_cache(clean)
    return clean, corrupted, cache


def by_hand(
    bridge: TransformerBridge, corrupted: torch.Tensor, cache: Any, hook: str, index: Any
) -> float:
    def patch(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        activation = activation.clone()
        activation[index] = cache[hook.name][index]
        return activation

    with torch.no_grad():
        return float(last_logit(bridge.run_with_hooks(corrupted, fwd_hooks=[(hook, patch)])))


def test_resid_sweep_equals_hand_written_hooks(gpt2_bridge: TransformerBridge, runs: tuple) -> None:
    clean, corrupted, cache = runs
    hooks = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_mid"]
    result = activation_patch(
        gpt2_bridge, corrupted, cache, last_logit, hooks, positions="all", progress=False
    )
    assert result.axes == ("hook", "pos") and result.values.shape == (2, 6)
    assert result.coords["hook"] == hooks and result.coords["pos"] == list(range(6))
    for h, hook in enumerate(hooks):
        for pos in (0, 3, 5):
            assert result.values[h, pos] == by_hand(
                gpt2_bridge, corrupted, cache, hook, (slice(None), pos)
            )
    # patching every position of the first residual stream gives the clean run back
    whole = activation_patch(gpt2_bridge, corrupted, cache, last_logit, hooks[0], progress=False)
    with torch.no_grad():
        assert whole.values[0] == float(last_logit(gpt2_bridge(clean)))


def test_head_sweeps_and_patterns(gpt2_bridge: TransformerBridge, runs: tuple) -> None:
    _, corrupted, cache = runs
    z = activation_patch(
        gpt2_bridge,
        corrupted,
        cache,
        last_logit,
        "blocks.1.attn.hook_z",
        heads="all",
        batch=1,
        progress=False,
    )
    assert z.values.shape == (1, 4)
    assert z.values[0, 2] == by_hand(
        gpt2_bridge, corrupted, cache, "blocks.1.attn.hook_z", (1, slice(None), 2)
    )
    both = activation_patch(
        gpt2_bridge,
        corrupted,
        cache,
        last_logit,
        ["blocks.0.attn.hook_pattern"],
        positions=[5],
        heads=[1, 3],
        progress=False,
    )
    assert both.axes == ("hook", "pos", "head") and both.values.shape == (1, 1, 2)
    index = (slice(None), 3, 5)  # pattern: [batch, head, query, key]
    assert both.values[0, 0, 1] == by_hand(
        gpt2_bridge, corrupted, cache, "blocks.0.attn.hook_pattern", index
    )


def test_patch_sweep_checks_its_targets_and_shapes(
    gpt2_bridge: TransformerBridge, runs: tuple
) -> None:
    _, corrupted, cache = runs
    with pytest.raises(InputError, match=r"1 targets do not fill axes of shape \(2,\)"):
        patch_sweep(gpt2_bridge, corrupted, cache, last_logit, [[]], {"x": [0, 1]})
    with pytest.raises(InputError, match=r"clean activation has shape \(2, 6, 64\).*\(2, 4, 64\)"):
        activation_patch(
            gpt2_bridge, corrupted[:, :4], cache, last_logit, "hook_embed", progress=False
        )
    with pytest.raises(InputError, match=r"positions \[9\] are out of range"):
        activation_patch(gpt2_bridge, corrupted, cache, last_logit, "hook_embed", positions=[9])
    with pytest.raises(InputError, match="no image axis"):
        patch_sweep(
            gpt2_bridge,
            corrupted,
            cache,
            last_logit,
            [[Patch("hook_embed", (0,))]],
            {"x": [0]},
            progress=False,
        ).grid()
    assert not any(p.has_hooks for p in gpt2_bridge.hook_dict.values())
