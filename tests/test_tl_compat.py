"""Compatibility mode: HookedTransformer's weight processing on a copy of the HF model.

Against HookedTransformer itself where TransformerLens is installed (the ``sae`` extra brings
it): the same checkpoint, loaded into a HookedTransformer with its default processing, gives
the same activations under the same names. And against the processing's own math, which
needs nothing but the HF model.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

from bridge_adapters import tiny
from bridge_core import BridgeError, TransformerBridge

HAS_TL = importlib.util.find_spec("transformer_lens") is not None


def _noisy_norms(model: Any) -> Any:
    """Norm weights and biases away from 1 and 0, so that folding them matters."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ln" in name or "norm" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return model


def _gpt2() -> tuple[Any, Any]:
    model, tokenizer = tiny.tiny_gpt2()
    return _noisy_norms(model), tokenizer


def _llama() -> tuple[Any, Any]:
    model, tokenizer = tiny.tiny_llama()
    return _noisy_norms(model), tokenizer


def _hooked_transformer(model: Any) -> Any:
    """A HookedTransformer of the same checkpoint, processed as from_pretrained does."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained import weight_conversions

    hf = model.config
    if hf.model_type == "gpt2":
        cfg = HookedTransformerConfig(
            d_model=hf.n_embd,
            n_layers=hf.n_layer,
            n_heads=hf.n_head,
            d_head=hf.n_embd // hf.n_head,
            d_mlp=4 * hf.n_embd,
            d_vocab=hf.vocab_size,
            n_ctx=hf.n_positions,
            act_fn="gelu_new",
            eps=hf.layer_norm_epsilon,
            normalization_type="LN",
        )
        state = weight_conversions.convert_gpt2_weights(model, cfg)
    else:
        cfg = HookedTransformerConfig(
            d_model=hf.hidden_size,
            n_layers=hf.num_hidden_layers,
            n_heads=hf.num_attention_heads,
            n_key_value_heads=hf.num_key_value_heads,
            d_head=hf.hidden_size // hf.num_attention_heads,
            d_mlp=hf.intermediate_size,
            d_vocab=hf.vocab_size,
            n_ctx=hf.max_position_embeddings,
            act_fn="silu",
            eps=hf.rms_norm_eps,
            normalization_type="RMS",
            positional_embedding_type="rotary",
            rotary_dim=hf.hidden_size // hf.num_attention_heads,
            rotary_base=hf.rope_parameters["rope_theta"],
            gated_mlp=True,
            final_rms=True,
        )
        state = weight_conversions.convert_llama_weights(model, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hooked = HookedTransformer(cfg)
        hooked.load_and_process_state_dict(state)  # fold_ln, centering, value biases: defaults
    return hooked.eval()


NAMES = [
    "hook_embed",
    "blocks.0.hook_resid_pre",
    "blocks.0.ln1.hook_scale",
    "blocks.0.ln1.hook_normalized",
    "blocks.0.attn.hook_q",
    "blocks.0.attn.hook_v",
    "blocks.0.attn.hook_pattern",
    "blocks.0.attn.hook_z",
    "blocks.0.hook_attn_out",
    "blocks.1.hook_resid_mid",
    "blocks.1.ln2.hook_normalized",
    "blocks.1.mlp.hook_pre",
    "blocks.1.mlp.hook_post",
    "blocks.1.hook_mlp_out",
    "blocks.1.hook_resid_post",
    "ln_final.hook_normalized",
]


@pytest.mark.skipif(not HAS_TL, reason="TransformerLens is not installed (the sae extra)")
@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_activations_equal_hooked_transformers(build: Callable[[], tuple[Any, Any]]) -> None:
    model, tokenizer = build()
    hooked = _hooked_transformer(model)
    bridge = TransformerBridge.wrap(model, tokenizer=tokenizer).enable_compatibility_mode()
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    names = [n for n in NAMES if n in bridge.hook_dict]
    if "hook_pos_embed" in bridge.hook_dict:
        names.append("hook_pos_embed")
    with torch.no_grad():
        expected_logits, expected = hooked.run_with_cache(ids, names_filter=names)
        logits, cache = bridge.run_with_cache(ids, names_filter=names)
    for name in names:
        assert torch.allclose(cache[name], expected[name], atol=1e-4), name
    assert torch.allclose(logits, expected_logits, atol=1e-4)
    for weight in ("W_Q", "W_K", "W_V", "W_O", "b_O", "W_in", "W_out", "W_U", "b_U", "W_E"):
        assert torch.allclose(getattr(bridge, weight), getattr(hooked, weight), atol=1e-5), weight


def test_processing_keeps_the_function_and_the_original(ids: torch.Tensor) -> None:
    model, tokenizer = _gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        original = model(ids).logits
    bridge = TransformerBridge.wrap(model, tokenizer=tokenizer).enable_compatibility_mode()
    assert bridge.compatibility_mode and bridge.original_model is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(ids)
    # center_unembed shifts each position's logits by a constant: log-probs are unchanged
    assert torch.allclose(logits.log_softmax(-1), original.log_softmax(-1), atol=1e-5)
    assert torch.allclose(logits.mean(-1), torch.zeros(()), atol=1e-5)
    for name in ("blocks.0.ln1", "blocks.1.ln2", "ln_final"):  # norms are LNPre now
        assert torch.allclose(
            cache[f"{name}.hook_normalized"], cache[f"{name}.hook_out"], atol=1e-5
        )
    assert torch.allclose(cache["resid_post", 1].mean(-1), torch.zeros(()), atol=1e-5)
    assert not bridge.b_V.any()  # folded into b_O
    assert torch.allclose(bridge.W_U.mean(-1), torch.zeros(()), atol=1e-6)
    assert not torch.equal(bridge.W_U.T, bridge.W_E)  # untied in the copy


def test_options_and_refusals(gpt2_bridge: TransformerBridge, ids: torch.Tensor) -> None:
    model, tokenizer = _gpt2()
    bridge = TransformerBridge.wrap(model, tokenizer=tokenizer)
    with torch.no_grad():
        original = model(ids).logits
        unprocessed = bridge.enable_compatibility_mode(no_processing=True)(ids)
    assert torch.equal(unprocessed, original)
    bridge.add_hook("hook_embed", lambda t, hook: None)
    with pytest.raises(BridgeError, match="remove the hooks first"):
        bridge.enable_compatibility_mode()
    bridge.reset_hooks()
    with pytest.raises(BridgeError, match="refactor_factored_attn_matrices"):
        bridge.enable_compatibility_mode(refactor_factored_attn_matrices=True)
    only_fold = TransformerBridge.wrap(model, tokenizer=tokenizer)
    only_fold.enable_compatibility_mode(center_writing_weights=False, center_unembed=False)
    with torch.no_grad():
        assert torch.allclose(only_fold(ids), original, atol=1e-4)
