"""Weights in TransformerLens's shapes: views of the HF parameters, checked against the
activations the model computes with them, and edits that reach the model."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bridge_core import BridgeError, TransformerBridge
from bridge_core.factored import FactoredMatrix
from bridge_core.weights import LinkedWeight


@pytest.fixture
def run(
    model_and_bridge: tuple[Any, TransformerBridge], ids: torch.Tensor
) -> tuple[Any, TransformerBridge, Any]:
    model, bridge = model_and_bridge
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids)
    return model, bridge, cache


def test_shapes_follow_transformer_lens(run: tuple[Any, TransformerBridge, Any]) -> None:
    _, bridge, _ = run
    cfg = bridge.cfg
    L, H, D, dh, V = cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head, cfg.d_vocab
    d_mlp = bridge.blocks[0].mlp.W_in.shape[-1]
    assert bridge.W_E.shape == (V, D) and bridge.W_U.shape == (D, V) and bridge.b_U.shape == (V,)
    for name in ("W_Q", "W_K", "W_V"):
        assert getattr(bridge, name).shape == (L, H, D, dh)
        assert getattr(bridge.blocks[1].attn, name).shape == (H, D, dh)
    assert bridge.W_O.shape == (L, H, dh, D) and bridge.b_O.shape == (L, D)
    assert bridge.b_Q.shape == bridge.b_K.shape == bridge.b_V.shape == (L, H, dh)
    assert bridge.W_in.shape == (L, D, d_mlp) and bridge.W_out.shape == (L, d_mlp, D)
    assert bridge.b_in.shape == (L, d_mlp) and bridge.b_out.shape == (L, D)
    assert bridge.blocks[0].attn._W_K.shape == (cfg.n_key_value_heads, D, dh)
    assert isinstance(bridge.QK, FactoredMatrix) and bridge.QK.shape == (L, H, D, D)
    assert bridge.OV.shape == (L, H, D, D)
    assert len(bridge.all_head_labels()) == L * H and bridge.all_head_labels()[1] == "L0H1"


def test_weights_compute_the_cached_activations(run: tuple[Any, TransformerBridge, Any]) -> None:
    _, bridge, cache = run
    attn, mlp = bridge.blocks[1].attn, bridge.blocks[1].mlp
    x = cache["blocks.1.ln1.hook_out"]

    def heads(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bpd,hde->bphe", x, w) + b

    assert torch.allclose(heads(attn.W_Q, attn.b_Q), cache["q", 1], atol=1e-5)
    assert torch.allclose(heads(attn._W_K, attn._b_K), cache["k", 1], atol=1e-5)
    assert torch.allclose(heads(attn._W_V, attn._b_V), cache["v", 1], atol=1e-5)
    out = torch.einsum("bphe,hem->bpm", cache["z", 1], attn.W_O) + attn.b_O
    assert torch.allclose(out, cache["attn_out", 1], atol=1e-5)
    mlp_in = cache["blocks.1.ln2.hook_out"]
    first = mlp.W_gate if mlp.W_gate is not None else mlp.W_in
    first_bias = 0 if mlp.W_gate is not None else mlp.b_in
    assert torch.allclose(mlp_in @ first + first_bias, cache["pre", 1], atol=1e-5)
    assert torch.allclose(cache["post", 1] @ mlp.W_out + mlp.b_out, cache["mlp_out", 1], atol=1e-5)
    final = cache["ln_final.hook_out"]
    assert torch.allclose(final @ bridge.W_U + bridge.b_U, cache["unembed.hook_out"], atol=1e-5)


def test_grouped_query_attention_repeats_key_value_heads(llama_bridge: TransformerBridge) -> None:
    attn = llama_bridge.blocks[0].attn
    group = llama_bridge.cfg.n_heads // llama_bridge.cfg.n_key_value_heads
    assert group == 2
    assert torch.equal(attn.W_K, attn._W_K.repeat_interleave(group, 0))
    assert torch.equal(llama_bridge.W_V[0], attn._W_V.repeat_interleave(group, 0))
    with torch.no_grad(), pytest.raises(BridgeError, match=r"must stay equal.*_W_K"):
        attn.W_K[0] += 1  # only one of the two query heads of key/value head 0
    k_proj = llama_bridge.original_model.model.layers[0].self_attn.k_proj
    before = k_proj.weight.detach().clone()
    with torch.no_grad():
        edited = attn.W_K
        edited[0:2] *= 2  # both heads of the group: written back
    assert torch.equal(k_proj.weight[:16], 2 * before[:16])
    with torch.no_grad():
        k_proj.weight.copy_(before)


def test_edits_through_views_and_stacks_edit_the_model(
    gpt2_bridge: TransformerBridge, ids: torch.Tensor
) -> None:
    c_attn = gpt2_bridge.original_model.transformer.h[1].attn.c_attn
    saved = {k: v.detach().clone() for k, v in gpt2_bridge.original_model.state_dict().items()}
    try:
        with torch.no_grad():
            gpt2_bridge.blocks[1].attn.W_V[2] = 0  # a view of GPT-2's fused c_attn weight
            assert bool((c_attn.weight[:, 128 + 32 : 128 + 48] == 0).all())
            stack = gpt2_bridge.W_Q
            stack[1, 3] = 1.5  # [n_layers, ...] stack: written back to layer 1
            assert bool((c_attn.weight[:, 48:64] == 1.5).all())
            stack[0].zero_()  # a view of the stack, edited in place
            assert not gpt2_bridge.blocks[0].attn.W_Q.any()
            gpt2_bridge.W_E[5] = 0  # the HF parameter itself
            _, cache = gpt2_bridge.run_with_cache(torch.tensor([[5, 6]]))
        assert not cache["hook_embed"][0, 0].any()
    finally:
        gpt2_bridge.original_model.load_state_dict(saved)


def test_absent_biases_are_zeros_that_refuse_edits(llama_bridge: TransformerBridge) -> None:
    b_q = llama_bridge.blocks[0].attn.b_Q
    assert isinstance(b_q, LinkedWeight) and not b_q.any()
    with torch.no_grad():
        b_q.zero_()  # still zero: fine
        with pytest.raises(BridgeError, match="has no bias"):
            llama_bridge.b_U[3] = 1.0


def test_factored_circuits(gpt2_bridge: TransformerBridge) -> None:
    qk, ov = gpt2_bridge.QK, gpt2_bridge.OV
    W_Q, W_K = gpt2_bridge.W_Q, gpt2_bridge.W_K
    assert torch.allclose(qk.AB, W_Q @ W_K.transpose(-2, -1), atol=1e-6)
    assert torch.allclose(ov[1, 2].AB, gpt2_bridge.W_V[1, 2] @ gpt2_bridge.W_O[1, 2], atol=1e-6)
    U, S, V = ov.svd()
    assert torch.allclose(U @ torch.diag_embed(S) @ V.transpose(-2, -1), ov.AB, atol=1e-5)
    assert torch.allclose(ov.norm(), torch.linalg.matrix_norm(ov.AB), atol=1e-4)
    assert qk.T.shape == qk.shape and ov[0].shape == (4, 64, 64)
    assert qk.eigenvalues.shape == (2, 4, 16)
    assert torch.allclose((qk @ ov).AB, qk.AB @ ov.AB, atol=1e-5)


def test_accumulated_bias_and_residual_directions(gpt2_bridge: TransformerBridge) -> None:
    b_O, b_out = gpt2_bridge.b_O, gpt2_bridge.b_out
    assert torch.allclose(gpt2_bridge.accumulated_bias(2), b_O.sum(0) + b_out.sum(0), atol=1e-6)
    assert torch.allclose(
        gpt2_bridge.accumulated_bias(1, mlp_input=True), b_O[0] + b_out[0] + b_O[1]
    )
    assert torch.allclose(gpt2_bridge.accumulated_bias(2, include_mlp_biases=False), b_O.sum(0))
    assert not gpt2_bridge.accumulated_bias(0).any()
    W_U = gpt2_bridge.W_U
    token = gpt2_bridge.to_single_token(" the")
    assert torch.equal(gpt2_bridge.tokens_to_residual_directions(" the"), W_U[:, token])
    ids = torch.tensor([[3, 4, 5]])
    assert gpt2_bridge.tokens_to_residual_directions(ids).shape == (1, 3, 64)
