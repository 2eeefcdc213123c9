"""TransformerLens's ActivationCache analyses on the bridge: decompositions that add up to the
residual stream the model computed, attributions that add up to its logits."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bridge_core import ActivationCache, InputError, TransformerBridge


@pytest.fixture(scope="module")
def gpt2_run(text_models: dict[str, tuple[Any, Any]]) -> tuple[TransformerBridge, Any, Any, Any]:
    model, tokenizer = text_models["gpt2"]
    bridge = TransformerBridge.wrap(model, tokenizer=tokenizer)
    ids = torch.randint(3, 500, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(ids)
    return bridge, ids, logits, cache


def test_head_results_add_up_to_the_attention_output(gpt2_run: tuple) -> None:
    bridge, _, _, cache = gpt2_run
    heads, labels = cache.stack_head_results(return_labels=True)
    assert heads.shape == (8, 2, 7, 64) and labels[:2] == ["L0H0", "L0H1"]
    for layer in range(2):
        summed = heads[4 * layer : 4 * layer + 4].sum(0) + bridge.b_O[layer]
        assert torch.allclose(summed, cache["attn_out", layer], atol=1e-5)
    bridge.set_use_attn_result(True)
    try:
        with torch.no_grad():
            _, direct = bridge.run_with_cache(gpt2_run[1], names_filter=lambda n: "result" in n)
    finally:
        bridge.set_use_attn_result(False)
    assert torch.allclose(cache["result", 1], direct["result", 1], atol=1e-5)
    last, labels = cache.stack_head_results(
        1, pos_slice=-1, incl_remainder=True, return_labels=True
    )
    assert last.shape == (5, 2, 64) and labels[-1] == "remainder"
    assert torch.allclose(last.sum(0), cache["resid_pre", 1][:, -1], atol=1e-5)


def test_neuron_results_add_up_to_the_mlp_output(gpt2_run: tuple) -> None:
    bridge, _, _, cache = gpt2_run
    neurons = cache.get_neuron_results(1)
    assert neurons.shape == (2, 7, 256, 64)
    assert torch.allclose(neurons.sum(-2) + bridge.b_out[1], cache["mlp_out", 1], atol=1e-5)
    stack, labels = cache.stack_neuron_results(2, neuron_slice=(0, 10), return_labels=True)
    assert stack.shape == (20, 2, 7, 64) and labels[10] == "L1N0"
    one = cache.stack_neuron_results(1, neuron_slice=3, pos_slice=0)
    assert one.shape == (1, 2, 64)


def test_full_decomposition_adds_up_and_attributes_the_logits(gpt2_run: tuple) -> None:
    bridge, ids, logits, cache = gpt2_run
    full, labels = cache.get_full_resid_decomposition(return_labels=True)
    assert labels[:1] == ["L0H0"] and labels[-3:] == ["embed", "pos_embed", "bias"]
    assert full.shape[0] == len(labels) == 8 + 512 + 3
    assert torch.allclose(full.sum(0), cache["resid_post", 1], atol=1e-5)
    mid = cache.get_full_resid_decomposition(1, mlp_input=True, expand_neurons=False)
    assert torch.allclose(mid.sum(0), cache["resid_mid", 1], atol=1e-5)
    # direct logit attribution at the last position, through ln_f's scale, weight and bias
    ln_f = bridge.original_model.transformer.ln_f
    stack = cache.get_full_resid_decomposition(expand_neurons=False, pos_slice=-1)
    answer = ids[:, -1]
    attrs = cache.logit_attrs(stack * ln_f.weight, answer, pos_slice=-1)
    expected = logits[torch.arange(2), -1, answer] - ln_f.bias @ bridge.W_U[:, answer]
    assert torch.allclose(attrs.sum(0), expected, atol=1e-4)
    diff = cache.logit_attrs(stack, answer, incorrect_tokens=ids[:, 0], pos_slice=-1)
    assert diff.shape == (stack.shape[0], 2)
    with pytest.raises(InputError, match="same shape"):
        cache.logit_attrs(stack, answer, incorrect_tokens=ids[:, :2], pos_slice=-1)


def test_batch_slices_and_tl_slice_inputs(gpt2_run: tuple) -> None:
    _, _, _, cache = gpt2_run
    first = cache.apply_slice_to_batch_dim(0)
    assert isinstance(first, ActivationCache) and not first.has_batch_dim
    assert torch.equal(first["resid_pre", 1], cache["resid_pre", 1][0])
    pair = cache.apply_slice_to_batch_dim([1, 0])
    assert pair.has_batch_dim and torch.equal(pair["hook_embed"][0], cache["hook_embed"][1])
    resid = cache.accumulated_resid(pos_slice=(1, 4))
    assert resid.shape == (3, 2, 3, 64)
    assert cache.accumulated_resid(pos_slice=-1).shape == (3, 2, 64)  # an int drops the dim
    attrs = cache.logit_attrs(
        cache.decompose_resid(pos_slice=-1)[:, :1], torch.tensor([5]), pos_slice=-1, batch_slice=[0]
    )
    assert attrs.shape == (6, 1)


def test_run_with_cache_takes_transformer_lens_keywords(gpt2_run: tuple) -> None:
    bridge, ids, _, cache = gpt2_run
    with torch.no_grad():
        _, sliced = bridge.run_with_cache(ids, pos_slice=-1)
        _, plain = bridge.run_with_cache(ids, names_filter="hook_embed", return_cache_object=False)
    assert torch.equal(sliced["resid_pre", 1], cache["resid_pre", 1][:, -1])
    assert torch.equal(sliced["q", 1], cache["q", 1][:, -1])  # heads: third from last
    assert torch.equal(sliced["pattern", 1], cache["pattern", 1][:, :, -1])  # query positions
    assert isinstance(plain, dict) and list(plain) == ["embed.hook_out"]
