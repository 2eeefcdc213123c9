"""With no hooks the bridge is the HF model, bit for bit; every hook names a real tensor."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from bridge_core import TransformerBridge


def test_logits_equal_hf_without_hooks(model_and_bridge: Any, ids: torch.Tensor) -> None:
    model, bridge = model_and_bridge
    with torch.no_grad():
        assert torch.equal(bridge(ids), model(ids).logits)


def test_run_with_cache_of_everything_keeps_logits_exact(
    model_and_bridge: Any, ids: torch.Tensor
) -> None:
    model, bridge = model_and_bridge
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(ids)
        assert torch.equal(logits, model(ids).logits)
    assert set(cache.keys()) == {n for n, p in bridge.hook_dict.items() if p.enabled}


def test_residual_hooks_equal_hf_hidden_states(model_and_bridge: Any, ids: torch.Tensor) -> None:
    model, bridge = model_and_bridge
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
        _, cache = bridge.run_with_cache(ids)
    n_layers = bridge.cfg.n_layers
    assert len(hidden) == n_layers + 1
    for layer in range(n_layers):
        assert torch.equal(cache["resid_pre", layer], hidden[layer]), layer
    # HF's last hidden state is after the final norm; ours is named ln_final.hook_out
    assert torch.equal(cache["ln_final.hook_out"], hidden[-1])
    assert torch.equal(cache["ln_final.hook_in"], cache["resid_post", n_layers - 1])


def test_attention_pattern_equals_hf_eager_attentions(
    model_and_bridge: Any, ids: torch.Tensor
) -> None:
    model, bridge = model_and_bridge
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
        model.set_attn_implementation("eager")
        try:
            attentions = model(ids, output_attentions=True).attentions
        finally:
            model.set_attn_implementation("sdpa")
    for layer, reference in enumerate(attentions):
        torch.testing.assert_close(cache["pattern", layer], reference, rtol=0, atol=1e-6)


def test_component_hooks_equal_plain_torch_hooks(model_and_bridge: Any, ids: torch.Tensor) -> None:
    _, bridge = model_and_bridge
    seen: dict[str, torch.Tensor] = {}
    block = bridge.blocks[1]
    modules = {
        "attn.hook_out": block.attn.original_component,
        "mlp.hook_out": block.mlp.original_component,
        "ln1.hook_out": block.ln1.original_component,
    }
    handles = [
        m.register_forward_hook(
            lambda m, a, o, k=k: seen.__setitem__(k, o[0] if isinstance(o, tuple) else o)
        )
        for k, m in modules.items()
    ]
    try:
        with torch.no_grad():
            _, cache = bridge.run_with_cache(ids)
    finally:
        for handle in handles:
            handle.remove()
    for key, tensor in seen.items():
        assert torch.equal(cache[f"blocks.1.{key}"], tensor), key
    assert torch.equal(cache["blocks.1.hook_attn_out"], seen["attn.hook_out"])


def test_head_shapes_follow_the_contract(model_and_bridge: Any, ids: torch.Tensor) -> None:
    _, bridge = model_and_bridge
    cfg = bridge.cfg
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids, names_filter=lambda n: ".attn.hook_" in n)
    batch, pos = ids.shape
    assert cache["q", 0].shape == (batch, pos, cfg.n_heads, cfg.d_head)
    assert cache["k", 0].shape == (batch, pos, cfg.n_key_value_heads, cfg.d_head)
    assert cache["v", 0].shape == (batch, pos, cfg.n_key_value_heads, cfg.d_head)
    assert cache["z", 0].shape == (batch, pos, cfg.n_heads, cfg.d_head)
    assert cache["pattern", 0].shape == (batch, cfg.n_heads, pos, pos)
    assert cache["attn_scores", 0].shape == (batch, cfg.n_heads, pos, pos)
    assert torch.allclose(cache["pattern", 0].sum(-1), torch.ones(batch, cfg.n_heads, pos))


def test_wrapping_changes_nothing_global(text_models: dict[str, Any], ids: torch.Tensor) -> None:
    model, tokenizer = text_models["llama"]
    attention = dict(AttentionInterface._global_mapping)
    masks = dict(AttentionMaskInterface._global_mapping)
    hooks_before = {name: len(m._forward_hooks) for name, m in model.named_modules()}
    bridge = TransformerBridge.wrap(model, tokenizer=tokenizer)
    with torch.no_grad():
        bridge(ids)
    assert model.config._attn_implementation == "sdpa"
    assert {name: len(m._forward_hooks) for name, m in model.named_modules()} == hooks_before
    assert dict(AttentionMaskInterface._global_mapping).keys() >= masks.keys()
    assert all(AttentionInterface._global_mapping[k] is v for k, v in attention.items())
