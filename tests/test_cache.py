"""ActivationCache: names, residual-stream helpers, storage."""

from __future__ import annotations

import pytest
import torch

from bridge_core import HookNameError, InputError, TransformerBridge


@pytest.fixture(scope="module")
def gpt2_run(gpt2_bridge: TransformerBridge) -> tuple[torch.Tensor, object]:
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return gpt2_bridge.run_with_cache(ids)


def test_alias_and_canonical_share_one_tensor(gpt2_run: tuple) -> None:
    _, cache = gpt2_run
    assert cache["blocks.1.hook_resid_pre"] is cache["blocks.1.hook_in"]
    assert cache["resid_pre", 1] is cache["blocks.1.hook_in"]
    assert cache["resid_mid", -1] is cache["blocks.1.ln2.hook_in"]
    assert cache["normalized", 0, "ln2"] is cache["blocks.0.ln2.hook_normalized"]
    assert "blocks.1.hook_resid_pre" in cache and "hook_embed" in cache
    assert "blocks.1.hook_resid_pre" in cache.keys()  # noqa: SIM118  # TL names are keys too
    assert "blocks.1.hook_resid_pre" not in list(cache.keys())  # stored once, canonically


def test_unknown_key_suggests(gpt2_run: tuple) -> None:
    _, cache = gpt2_run
    with pytest.raises(HookNameError, match="Did you mean"):
        cache["blocks.1.hook_resid_pree"]


def test_names_filter_caches_only_what_was_asked(gpt2_bridge: TransformerBridge) -> None:
    ids = torch.randint(3, 500, (1, 5))
    _, cache = gpt2_bridge.run_with_cache(
        ids, names_filter=["hook_embed", "blocks.0.hook_resid_post"]
    )
    assert list(cache.keys()) == ["embed.hook_out", "blocks.0.hook_out"]
    _, cache = gpt2_bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_pre"))
    assert list(cache.keys()) == ["blocks.0.hook_in", "blocks.1.hook_in"]


def test_stack_and_accumulated_resid(gpt2_run: tuple) -> None:
    _, cache = gpt2_run
    stack = cache.stack_activation("resid_pre")
    assert stack.shape == (2, 2, 12, 64)
    acc, labels = cache.accumulated_resid(return_labels=True)
    assert labels == ["0_pre", "1_pre", "final_post"]
    assert torch.equal(acc[-1], cache["resid_post", 1])
    acc_mid = cache.accumulated_resid(layer=1, incl_mid=True)
    assert acc_mid.shape[0] == 3


def test_decompose_resid_sums_to_residual(gpt2_run: tuple) -> None:
    _, cache = gpt2_run
    parts, labels = cache.decompose_resid(return_labels=True)
    assert labels == ["embed", "pos_embed", "0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]
    torch.testing.assert_close(parts.sum(0), cache["resid_post", 1], rtol=0, atol=1e-5)
    mid = cache.decompose_resid(layer=1, mlp_input=True)
    torch.testing.assert_close(mid.sum(0), cache["resid_mid", 1], rtol=0, atol=1e-5)


def test_apply_ln_to_stack_matches_the_final_layernorm(
    gpt2_bridge: TransformerBridge, gpt2_run: tuple
) -> None:
    _, cache = gpt2_run
    ln = gpt2_bridge.component("ln_final").original_component
    assert ln is not None
    scaled = cache.apply_ln_to_stack(cache.accumulated_resid()[-1:])[0]
    torch.testing.assert_close(scaled * ln.weight + ln.bias, cache["ln_final.hook_out"])
    parts = cache.apply_ln_to_stack(cache.decompose_resid())
    torch.testing.assert_close(parts.sum(0), scaled, rtol=1e-4, atol=1e-5)


def test_logit_lens_of_final_resid_is_the_logits(gpt2_run: tuple) -> None:
    logits, cache = gpt2_run
    lens = cache.logit_lens(cache.accumulated_resid())
    assert lens.shape == (3, 2, 12, 512)
    assert torch.equal(lens[-1], logits)


def test_to_moves_the_cache_not_the_model(gpt2_bridge: TransformerBridge) -> None:
    _, cache = gpt2_bridge.run_with_cache(torch.randint(3, 500, (1, 4)), names_filter="hook_embed")
    cache.to("meta")
    assert cache["hook_embed"].device.type == "meta"
    assert gpt2_bridge.device.type == "cpu"


def test_remove_batch_dim(gpt2_bridge: TransformerBridge) -> None:
    ids = torch.randint(3, 500, (1, 4))
    _, cache = gpt2_bridge.run_with_cache(ids, names_filter="hook_embed", remove_batch_dim=True)
    assert cache["hook_embed"].shape == (4, 64)
    _, cache = gpt2_bridge.run_with_cache(ids, names_filter="hook_embed")
    assert cache.remove_batch_dim()["hook_embed"].shape == (4, 64)


def test_unique_bytes_count_shared_storage_once(
    gpt2_bridge: TransformerBridge, ids: torch.Tensor
) -> None:
    with torch.no_grad():
        gpt2_bridge.run_with_cache(ids)  # the first cache of a point copies and checks it
        _, cache = gpt2_bridge.run_with_cache(ids)  # then caches hold the live tensors
    total = sum(t.untyped_storage().nbytes() for t in cache.values())
    assert 0 < cache.unique_nbytes() < total  # q, k and v are views of one fused output


def test_shorthand_without_layer_and_alias_grads(gpt2_bridge: TransformerBridge) -> None:
    ids = torch.randint(3, 500, (1, 5))
    _, cache = gpt2_bridge.run_with_cache(
        ids,
        return_type="loss",
        incl_bwd=True,
        names_filter=["hook_embed", "ln_final.hook_normalized"],
    )
    assert cache["embed"] is cache["embed.hook_out"]
    assert cache["normalized"] is cache["ln_final.hook_normalized"]
    assert cache["hook_embed_grad"] is cache["embed.hook_out_grad"]
    gpt2_bridge.original_model.zero_grad(set_to_none=True)


def test_remove_batch_dim_needs_a_batch_of_one(gpt2_bridge: TransformerBridge) -> None:
    with pytest.raises(InputError, match=r"batch of one.*batch size 2"):
        gpt2_bridge.run_with_cache(torch.zeros(2, 3, dtype=torch.long), remove_batch_dim=True)
    assert not any(p.has_hooks() for p in gpt2_bridge.hook_dict.values())


def test_accumulated_resid_for_the_mlp_input_ends_with_resid_mid(gpt2_run: tuple) -> None:
    _, cache = gpt2_run
    stack, labels = cache.accumulated_resid(layer=1, mlp_input=True, return_labels=True)
    assert labels == ["0_pre", "1_pre", "1_mid"]
    assert torch.equal(stack[-1], cache["resid_mid", 1])


def test_decompose_resid_adds_up_at_every_position(model_and_bridge: tuple) -> None:
    _, bridge = model_and_bridge
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids)
    n = bridge.cfg.n_layers
    for layer in range(n + 1):
        for mlp_input in (False, True) if layer < n else (False,):
            parts = cache.decompose_resid(layer, mlp_input=mlp_input)
            name = "resid_mid" if mlp_input else "resid_pre"
            target = cache["resid_post", n - 1] if layer == n else cache[name, layer]
            torch.testing.assert_close(parts.sum(0), target, rtol=0, atol=1e-5)
    assert cache.image_layout is None


def test_unknown_stack_is_named(gpt2_run: tuple) -> None:
    _, cache = gpt2_run
    with pytest.raises(HookNameError, match=r"'block' is not a list of layers.*'blocks'"):
        cache.accumulated_resid(stack="block")
