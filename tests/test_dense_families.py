"""What the dense decoder-only adapters promise beyond `verify`: TransformerLens's conventions.

`tests/test_families.py` checks every family for exactness and runs `verify`; these tests pin
down the conventions a researcher relies on, against the plain HF model: which tensor a
TransformerLens name denotes (Gemma's scaled ``hook_embed``, Gemma-2's ``hook_attn_out``
after the post-norm), and the variants a family's one spec must also fit.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import (
    GPTBigCodeConfig,
    GPTBigCodeForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    StableLmConfig,
    StableLmForCausalLM,
)

from bridge_adapters.families import FAMILIES, _text
from bridge_core import TransformerBridge

IDS = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(0))


def _bridge(family: str) -> tuple[Any, TransformerBridge]:
    model, tokenizer = FAMILIES[family]()
    return model, TransformerBridge.wrap(model, tokenizer=tokenizer)


def _cache(bridge: TransformerBridge, model: Any) -> Any:
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(IDS)
        assert torch.equal(logits, model(IDS).logits)
    return cache


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3_text"])
def test_gemma_hook_embed_is_the_scaled_embedding(family: str) -> None:
    model, bridge = _bridge(family)
    cache = _cache(bridge, model)
    scale = torch.tensor(64**0.5, dtype=torch.float32)  # sqrt(d_model), in the model's dtype
    expected = model.model.embed_tokens.weight[IDS] * scale
    assert torch.equal(cache["hook_embed"], expected)
    assert torch.equal(cache["hook_embed"], cache["blocks.0.hook_resid_pre"])
    parts, labels = cache.decompose_resid(layer=1, return_labels=True)
    assert labels == ["embed", "0_attn_out", "0_mlp_out"]
    torch.testing.assert_close(parts.sum(0), cache["resid_pre", 1])


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_attn_out_and_mlp_out_are_after_the_post_norms(family: str) -> None:
    model, bridge = _bridge(family)
    assert bridge.hook_aliases()["blocks.0.hook_attn_out"] == "blocks.0.ln1_post.hook_out"
    assert bridge.hook_aliases()["blocks.0.hook_mlp_out"] == "blocks.0.ln2_post.hook_out"
    cache = _cache(bridge, model)
    layer = model.model.layers[1]
    assert torch.equal(
        cache["attn_out", 1], layer.post_attention_layernorm(cache["blocks.1.attn.hook_out"])
    )
    torch.testing.assert_close(cache["resid_mid", 1], cache["resid_pre", 1] + cache["attn_out", 1])
    torch.testing.assert_close(cache["resid_post", 1], cache["resid_mid", 1] + cache["mlp_out", 1])


def test_gemma2_soft_capping_and_sliding_window() -> None:
    model, bridge = _bridge("gemma2")
    cache = _cache(bridge, model)
    cap = model.config.final_logit_softcapping
    with torch.no_grad():
        logits = model(IDS).logits
    torch.testing.assert_close(torch.tanh(cache["unembed.hook_out"] / cap) * cap, logits)
    window = model.config.sliding_window  # layer 0 is local, layer 1 global
    distance = torch.arange(9)[:, None] - torch.arange(9)[None, :]
    assert torch.all(cache["pattern", 0][..., distance >= window] == 0)
    assert torch.all(cache["pattern", 1][..., (distance >= window) & (distance >= 0)] > 0)
    scores = cache["attn_scores", 1][..., distance >= 0]
    assert scores.abs().max() <= model.config.attn_logit_softcapping  # capped before the mask


def test_gemma3_q_norm_is_what_rotary_receives_before_rotation() -> None:
    model, bridge = _bridge("gemma3_text")
    cache = _cache(bridge, model)
    attn = model.model.layers[0].self_attn
    q = cache["q", 0]  # [batch, pos, head, d_head]
    assert torch.equal(cache["blocks.0.attn.q_norm.hook_in"], q)
    expected = attn.q_norm(q.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(cache["blocks.0.attn.q_norm.hook_out"], expected)
    torch.testing.assert_close(cache["rot_q", 0][:, 0], expected[:, 0])  # position 0: angle 0


def test_olmo2_post_norms_carry_what_is_added_to_the_residual_stream() -> None:
    model, bridge = _bridge("olmo2")
    names = bridge.hook_names()
    assert "blocks.0.ln1.hook_in" not in names  # no norm reads resid_pre: apply_ln says so
    cache = _cache(bridge, model)
    layer = model.model.layers[0]
    assert torch.equal(cache["resid_pre", 0], cache["blocks.0.attn.hook_in"])
    assert torch.equal(cache["resid_mid", 0], cache["blocks.0.mlp.hook_in"])
    assert torch.equal(
        cache["attn_out", 0], layer.post_attention_layernorm(cache["blocks.0.attn.hook_out"])
    )
    torch.testing.assert_close(cache["resid_mid", 0], cache["resid_pre", 0] + cache["attn_out", 0])
    torch.testing.assert_close(cache["resid_post", 0], cache["resid_mid", 0] + cache["mlp_out", 0])
    q = layer.self_attn.q_norm(layer.self_attn.q_proj(cache["resid_pre", 0]))
    assert torch.equal(cache["blocks.0.attn.q_norm.hook_out"], q)  # over all heads at once
    with pytest.raises(KeyError, match=r"blocks.0.ln1.hook_in"):
        cache.apply_ln_to_stack(cache["resid_pre", 0][None], layer=0)


@pytest.mark.parametrize(
    "variant",
    [
        # Phi with qk_layernorm (per-head LayerNorms on [batch, head, pos, d_head])
        (PhiConfig, PhiForCausalLM, {"qk_layernorm": True, "num_attention_heads": 2}),
        # GPT-BigCode without multi-query: c_attn is [q_h | k_h | v_h] head after head
        (GPTBigCodeConfig, GPTBigCodeForCausalLM, {"multi_query": False, "n_head": 2}),
        # StableLM-2 1.6B: sequential blocks with ln2, no q/k norms
        (StableLmConfig, StableLmForCausalLM, {"num_attention_heads": 2, "num_key_value_heads": 2}),
    ],
    ids=["phi-qk-layernorm", "bigcode-multi-head", "stablelm-sequential"],
)
def test_one_spec_fits_the_family_variants(variant: tuple[Any, Any, dict[str, Any]]) -> None:
    config_cls, model_cls, settings = variant
    sizes = (
        {"n_embd": 32, "n_layer": 1}
        if config_cls is GPTBigCodeConfig
        else {"hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 64}
    )
    model, _ = _text(config_cls, model_cls, **sizes, **settings)
    bridge = TransformerBridge.wrap(model)
    report = bridge.verify()
    assert report.ok, report.summary()
