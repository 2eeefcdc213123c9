"""TransformerLens's patching functions on the bridge (`bridge_core.tl_patching`), each value
checked against the same patch done by hand with a hook."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bridge_core import InputError, TransformerBridge
from bridge_core import tl_patching as patching


@pytest.fixture(scope="module")
def runs(
    text_models: dict[str, tuple[Any, Any]],
) -> dict[str, tuple[TransformerBridge, torch.Tensor, Any, Any]]:
    found = {}
    for arch in ("gpt2", "llama"):
        model, tokenizer = text_models[arch]
        bridge = TransformerBridge.wrap(model, tokenizer=tokenizer)
        generator = torch.Generator().manual_seed(2)
        clean = torch.randint(3, 500, (1, 5), generator=generator)
        corrupted = clean.clone()
        corrupted[0, 1] = (clean[0, 1] + 7) % 500
        answer = int(clean[0, -1])
        with torch.no_grad():
            _, cache = bridge.run_with_cache(clean)

        def metric(logits: torch.Tensor, answer: int = answer) -> torch.Tensor:
            return logits[0, -1, answer]

        found[arch] = (bridge, corrupted, cache, metric)
    return found


def by_hand(
    bridge: TransformerBridge, corrupted: torch.Tensor, name: str, fn: Any, metric: Any
) -> float:
    with torch.no_grad():
        return float(metric(bridge.run_with_hooks(corrupted, fwd_hooks=[(name, fn)])))


def test_residual_patching_per_layer_and_position(runs: dict[str, Any]) -> None:
    bridge, corrupted, cache, metric = runs["gpt2"]
    result = patching.get_act_patch_resid_pre(bridge, corrupted, cache, metric)
    assert result.shape == (2, 5)

    def patch_pos_1(tensor: torch.Tensor, hook: Any) -> None:
        tensor[:, 1] = cache["resid_pre", 1][:, 1]

    assert result[1, 1].item() == pytest.approx(
        by_hand(bridge, corrupted, "blocks.1.hook_resid_pre", patch_pos_1, metric), abs=1e-5
    )
    every = patching.get_act_patch_block_every(bridge, corrupted, cache, metric)
    assert every.shape == (3, 2, 5) and torch.equal(every[0], result)


def test_head_patching_per_position_and_over_all(runs: dict[str, Any]) -> None:
    bridge, corrupted, cache, metric = runs["llama"]
    z = patching.get_act_patch_attn_head_out_by_pos(bridge, corrupted, cache, metric)
    k = patching.get_act_patch_attn_head_k_all_pos(bridge, corrupted, cache, metric)
    assert z.shape == (2, 5, 4) and k.shape == (2, 2)  # GQA: 2 key/value heads

    def patch_head_3(tensor: torch.Tensor, hook: Any) -> None:
        tensor[:, 2, 3] = cache["z", 0][:, 2, 3]

    assert z[0, 2, 3].item() == pytest.approx(
        by_hand(bridge, corrupted, "blocks.0.attn.hook_z", patch_head_3, metric), abs=1e-5
    )
    pattern = patching.get_act_patch_attn_head_pattern_by_pos(bridge, corrupted, cache, metric)
    assert pattern.shape == (2, 4, 5)
    every = patching.get_act_patch_attn_head_all_pos_every(bridge, corrupted, cache, metric)
    assert every.shape == (5, 2, 4) and torch.equal(every[2, :, :2], k)
    assert not every[2, :, 2:].any()  # padded key heads


def test_index_tables(runs: dict[str, Any]) -> None:
    pandas = pytest.importorskip("pandas")
    bridge, corrupted, cache, metric = runs["gpt2"]
    table = pandas.DataFrame([[0, 1], [1, 4]], columns=["layer", "pos"])
    flat = patching.get_act_patch_resid_mid(bridge, corrupted, cache, metric, index_df=table)
    full, index = patching.get_act_patch_resid_mid(
        bridge, corrupted, cache, metric, return_index_df=True
    )
    assert flat.shape == (2,) and torch.allclose(flat, torch.stack([full[0, 1], full[1, 4]]))
    assert list(index.columns) == ["layer", "pos"] and len(index) == 10
    with pytest.raises(InputError, match="not both"):
        patching.generic_activation_patch(
            bridge,
            corrupted,
            cache,
            metric,
            patching.layer_pos_patch_setter,
            "resid_pre",
            index_axis_names=("layer",),
            index_df=table,
        )
