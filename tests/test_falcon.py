"""Falcon's pattern hooks: a kernel of the adapter's own, since FalconAttention computes inline."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import FalconConfig, FalconForCausalLM

from bridge_adapters import tiny
from bridge_adapters.families import tiny_falcon, tiny_falcon_40b
from bridge_core import BridgeError, HookPoint, TransformerBridge


@pytest.fixture(scope="module", params=["7b", "40b"])
def falcon(request: pytest.FixtureRequest) -> tuple[Any, TransformerBridge]:
    """Both layouts: multi-query with one LayerNorm, and kv groups with ln_attn / ln_mlp."""
    model, tokenizer = (tiny_falcon if request.param == "7b" else tiny_falcon_40b)()
    return model, TransformerBridge.wrap(model, tokenizer=tokenizer)


def _padded() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 500, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    # positions counted over the mask, as the bridge (and HF's generate) count them
    positions = torch.where(mask.bool(), mask.cumsum(-1) - 1, torch.arange(7))
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


def test_patterns_are_what_falcon_computes(falcon: tuple[Any, TransformerBridge]) -> None:
    model, bridge = falcon
    inputs = _padded()
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(**inputs)
        assert torch.equal(logits, model(**inputs).logits)  # observing changes nothing
        model.config._attn_implementation = "eager"  # Falcon returns its weights in eager only
        try:
            weights = model(**inputs, output_attentions=True).attentions
        finally:
            model.config._attn_implementation = "sdpa"
    for layer in range(2):
        torch.testing.assert_close(cache["pattern", layer], weights[layer])
        v = cache["v", layer].repeat_interleave(4 // cache["v", layer].shape[2], dim=2)
        z = cache["pattern", layer] @ v.transpose(1, 2)  # kv group g serves heads 2g, 2g + 1
        real = inputs["attention_mask"].bool()  # sdpa gives padded queries a z of 0
        torch.testing.assert_close(z.transpose(1, 2)[real], cache["z", layer][real])


def test_an_edited_pattern_is_what_the_layer_computes_with(
    falcon: tuple[Any, TransformerBridge],
) -> None:
    _, bridge = falcon
    inputs = _padded()

    def zero_head_1(x: torch.Tensor, hook: HookPoint) -> None:
        x[:, 1] = 0  # in place, TransformerLens style: [batch, head, q, k]

    def zero_z_1(x: torch.Tensor, hook: HookPoint) -> None:
        x[:, :, 1] = 0  # [batch, pos, head, d_head]

    seen: list[torch.Tensor] = []
    with torch.no_grad():
        by_pattern = bridge.run_with_hooks(
            **inputs,
            fwd_hooks=[
                ("blocks.0.attn.hook_pattern", zero_head_1),
                ("blocks.0.attn.hook_z", lambda z, hook: seen.append(z.clone())),
            ],
        )
        by_z = bridge.run_with_hooks(**inputs, fwd_hooks=[("blocks.0.attn.hook_z", zero_z_1)])
        plain = bridge(**inputs)
    real = inputs["attention_mask"].bool()  # padded queries: eager's uniform rows, sdpa's 0
    torch.testing.assert_close(by_pattern[real], by_z[real])
    assert not torch.allclose(by_pattern, plain)
    assert torch.all(seen[0][:, :, 1] == 0)  # hook_z sees the z of the edited pattern


def test_rotated_keys_edit_reaches_the_output(falcon: tuple[Any, TransformerBridge]) -> None:
    _, bridge = falcon
    inputs = _padded()
    with torch.no_grad():
        same = bridge.run_with_hooks(
            **inputs, fwd_hooks=[("blocks.1.attn.hook_rot_k", lambda k, hook: k.clone())]
        )
        moved = bridge.run_with_hooks(
            **inputs, fwd_hooks=[("blocks.1.attn.hook_rot_k", lambda k, hook: k.flip(1))]
        )
        plain = bridge(**inputs)
    assert torch.equal(same, plain)
    assert not torch.allclose(moved, plain)


def test_pattern_hooks_follow_generation_with_a_kv_cache(
    falcon: tuple[Any, TransformerBridge],
) -> None:
    _, bridge = falcon
    prompt = torch.tensor([[5, 6, 7, 8]])
    patterns: list[torch.Tensor] = []

    def keep(pattern: torch.Tensor, hook: HookPoint) -> None:
        patterns.append(pattern.clone())

    out = bridge.generate(
        prompt, max_new_tokens=3, fwd_hooks=[("blocks.1.attn.hook_pattern", keep)]
    )
    assert isinstance(out, torch.Tensor)
    assert [p.shape[-2:] for p in patterns] == [(4, 4), (1, 5), (1, 6)]
    with torch.no_grad():
        _, cache = bridge.run_with_cache(out[:, :-1], names_filter="blocks.1.attn.hook_pattern")
    full = cache["blocks.1.attn.hook_pattern"]
    torch.testing.assert_close(patterns[-1][0, :, -1], full[0, :, -1])


def test_backward_hooks_on_a_pattern_get_its_gradient(
    falcon: tuple[Any, TransformerBridge],
) -> None:
    model, bridge = falcon
    inputs = _padded()
    grads: list[torch.Tensor] = []
    loss = bridge.run_with_hooks(
        **inputs,
        return_type="loss",
        bwd_hooks=[("blocks.0.attn.hook_pattern", lambda g, hook: grads.append(g))],
    )
    loss.backward()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        assert torch.equal(loss, bridge(**inputs, return_type="loss"))  # forward unchanged
    assert grads and grads[0].shape == (2, 4, 7, 7) and grads[0].abs().sum() > 0


def test_alibi_falcon_patterns_under_sdpa_and_a_refusal_in_eager() -> None:
    """Falcon-RW: ALiBi, sequential blocks, one kv head per query head."""
    config = FalconConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        alibi=True,
        multi_query=False,
        parallel_attn=False,
        bias=True,
    )
    model = tiny.init_model(FalconForCausalLM, config, seed=0)
    bridge = TransformerBridge.wrap(model)
    assert "blocks.0.attn.hook_rot_q" not in bridge.hook_names()
    assert bridge.cfg.block_layout == "pre_norm"
    inputs = {"input_ids": torch.tensor([[4, 5, 6, 7, 8]])}
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(**inputs)
    assert torch.equal(logits, model(**inputs).logits)
    z = cache["pattern", 0] @ cache["v", 0].transpose(1, 2)  # [batch, head, pos, d_head]
    torch.testing.assert_close(z.transpose(1, 2), cache["z", 0])
    report = bridge.verify()
    assert report.ok, report.summary()
    skipped = [r for r in report.results if r.check == "pattern" and r.ok is None]
    assert len(skipped) == 2 and "ALiBi" in skipped[0].detail
    model.config._attn_implementation = "eager"
    try:
        with pytest.raises(BridgeError, match="ALiBi attention outside sdpa"):
            bridge.run_with_cache(**inputs, names_filter="blocks.0.attn.hook_pattern")
    finally:
        model.config._attn_implementation = "sdpa"
    assert not any(p.has_hooks for p in bridge.hook_dict.values())
