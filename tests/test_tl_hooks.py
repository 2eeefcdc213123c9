"""The HookedRootModule / HookPoint API as TransformerLens users know it: hook contexts and
their nesting, permanent hooks, ``has_hooks``, ``fwd_hooks``, caching helpers, aliases as
names everywhere, the ``set_use_*`` switches and the tokenizer helpers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from bridge_core import BridgeError, HookNameError, HookPoint, InputError, TransformerBridge

EMBED = "hook_embed"


class Counter:
    def __init__(self) -> None:
        self.count = 0

    def inc(self, tensor: torch.Tensor, hook: HookPoint) -> None:
        self.count += 1


@pytest.fixture
def bridge(gpt2_bridge: TransformerBridge) -> Iterator[TransformerBridge]:
    yield gpt2_bridge
    gpt2_bridge.reset_hooks(including_permanent=True)


def n_fwd(bridge: TransformerBridge, name: str = EMBED) -> int:
    return len(bridge.hook_dict[name].fwd_hooks)


def test_hook_contexts_nest_and_clean_up(bridge: TransformerBridge, ids: torch.Tensor) -> None:
    c = Counter()
    bridge.add_perma_hook(EMBED, c.inc)
    with bridge.hooks(fwd_hooks=[(EMBED, c.inc)]):
        assert n_fwd(bridge) == 2
        with pytest.raises(ValueError), bridge.hooks(fwd_hooks=[(EMBED, _fail)]):
            assert n_fwd(bridge) == 3
            bridge(ids)
        assert n_fwd(bridge) == 2
        bridge.run_with_cache(ids, names_filter=EMBED)
        assert n_fwd(bridge) == 2
    assert n_fwd(bridge) == 1  # the permanent one
    assert c.count == 2 + 2  # the failed forward reached the first two hooks
    bridge.remove_all_hook_fns()
    assert n_fwd(bridge) == 1
    bridge.remove_all_hook_fns(including_permanent=True)
    assert n_fwd(bridge) == 0


def _fail(tensor: torch.Tensor, hook: HookPoint) -> None:
    raise ValueError("fail")


def test_has_hooks_is_transformer_lens_s_method(bridge: TransformerBridge) -> None:
    point = bridge.hook_dict[EMBED]
    assert point.has_hooks() is False
    bridge.add_perma_hook(EMBED, Counter().inc)
    with bridge.hooks(bwd_hooks=[(EMBED, Counter().inc)]):
        assert point.has_hooks() and point.has_hooks("bwd")
        assert point.has_hooks("bwd", including_permanent=False)
        assert not point.has_hooks("fwd", including_permanent=False)
        assert point.has_hooks(level=bridge.context_level)
        assert [h.is_permanent for h in point.fwd_hooks] == [True]
    with pytest.warns(DeprecationWarning, match="call has_hooks"):
        assert point.has_hooks  # the old property still works
    bridge.reset_hooks(including_permanent=True)
    assert not point.has_hooks()


def test_reset_hooks_end_false_keeps_hooks(bridge: TransformerBridge, ids: torch.Tensor) -> None:
    c = Counter()
    bridge.run_with_hooks(ids, fwd_hooks=[(EMBED, c.inc)], reset_hooks_end=False)
    bridge(ids)
    assert c.count == 2 and n_fwd(bridge) == 1
    bridge.reset_hooks()
    assert n_fwd(bridge) == 0
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids, names_filter=EMBED, reset_hooks_end=False)
        first = cache[EMBED]
        bridge(ids[:, :3])  # the caching hooks are still there: they overwrite the cache
    assert cache[EMBED].shape[1] == 3 and first.shape[1] == ids.shape[1]


def test_contexts_are_cleared_on_request(bridge: TransformerBridge, ids: torch.Tensor) -> None:
    def remember(tensor: torch.Tensor, hook: HookPoint) -> None:
        hook.ctx["seen"] = True

    bridge.run_with_hooks(ids, fwd_hooks=[(EMBED, remember)])
    assert bridge.hook_dict[EMBED].ctx == {"seen": True}
    bridge.run_with_hooks(ids, fwd_hooks=[(EMBED, remember)], clear_contexts=True)
    assert bridge.hook_dict[EMBED].ctx == {}
    bridge.run_with_hooks(ids, fwd_hooks=[(EMBED, remember)])
    bridge.reset_hooks()  # clears contexts by default, as TransformerLens
    assert bridge.hook_dict[EMBED].ctx == {}


def test_backward_hooks_of_any_return_convention(
    bridge: TransformerBridge, ids: torch.Tensor
) -> None:
    c = Counter()

    def bare(grad: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        c.inc(grad, hook)
        return grad

    def one_tuple(grad: torch.Tensor, hook: HookPoint) -> tuple[torch.Tensor]:
        c.inc(grad, hook)
        return (grad,)

    with bridge.hooks(bwd_hooks=[("blocks.0.hook_resid_post", f) for f in (bare, one_tuple)]):
        bridge(ids).sum().backward()
    bridge.zero_grad()
    assert c.count == 2


def test_prepended_hooks_run_first(bridge: TransformerBridge, ids: torch.Tensor) -> None:
    order: list[str] = []
    bridge.add_hook(EMBED, lambda t, hook: order.append("second"))
    bridge.add_hook(EMBED, lambda t, hook: order.append("first"), prepend=True)
    bridge(ids)
    assert order == ["first", "second"]


def test_introspection(bridge: TransformerBridge) -> None:
    assert bridge.get_hook_point("blocks.0.hook_resid_pre") is bridge.blocks[0].hook_in
    assert bridge.mod_dict["blocks.0.hook_resid_pre"] is bridge.blocks[0].hook_in
    assert bridge.mod_dict["blocks.0.attn"] is bridge.blocks[0].attn
    assert len(bridge.hook_points()) == len(bridge.hook_dict)
    bridge.add_hook(lambda n: n.endswith("hook_resid_post"), Counter().inc)
    listed = bridge.list_hooks()
    assert list(listed) == ["blocks.0.hook_out", "blocks.1.hook_out"]
    assert bridge.list_hooks("blocks.1.hook_resid_post", dir="bwd") == {}
    with pytest.raises(HookNameError, match="Did you mean"):
        bridge.get_hook_point("blocks.0.hook_resid_pr")


def test_aliases_are_names_everywhere(bridge: TransformerBridge, ids: torch.Tensor) -> None:
    assert bridge.hook_dict["hook_embed"] is bridge.embed.hook_out
    assert "blocks.0.hook_resid_mid" in bridge.hook_dict
    assert bridge.hook_dict.get("nope") is None
    assert "blocks.0.hook_resid_mid" not in list(bridge.hook_dict)  # iteration: each point once
    assert bridge.blocks[0].hook_resid_post is bridge.blocks[0].hook_out
    assert bridge.blocks[1].hook_resid_mid is bridge.blocks[1].ln2.hook_in
    assert (
        bridge.hook_embed is bridge.embed.hook_out
        and bridge.hook_unembed.name == "unembed.hook_out"
    )
    with pytest.raises(AttributeError):
        bridge.blocks[0].hook_nonexistent  # noqa: B018
    _, cache = bridge.run_with_cache(ids, names_filter=["blocks.0.hook_resid_pre", "hook_embed"])
    assert list(cache) == ["embed.hook_out", "blocks.0.hook_in"]  # stored once
    assert "blocks.0.hook_resid_pre" in cache and "resid_pre" not in cache
    assert "blocks.0.hook_resid_pre" in cache.keys() and len(cache.keys()) == 2  # noqa: SIM118
    assert "hook_embed" in bridge.hook_dict.keys()  # noqa: SIM118  # the keys view
    assert cache["blocks.0.hook_resid_pre"] is cache["resid_pre", 0]


def test_caching_helpers(bridge: TransformerBridge, ids: torch.Tensor) -> None:
    store, fwd, bwd = bridge.get_caching_hooks("blocks.1.hook_resid_post", incl_bwd=True)
    assert len(fwd) == len(bwd) == 1
    with bridge.hooks(fwd, bwd):
        bridge(ids, return_type="loss").backward()
    bridge.zero_grad()
    assert set(store) == {"blocks.1.hook_out", "blocks.1.hook_out_grad"}
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids)
        everything: dict[str, torch.Tensor] = {}
        bridge.cache_all(everything)
        some: dict[str, torch.Tensor] = {}
        bridge.cache_some(some, lambda n: n.endswith("hook_z"))
        bridge(ids)
    bridge.reset_hooks()
    assert set(everything) == set(cache.keys())
    assert list(some) == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
    assert torch.equal(everything["blocks.1.hook_out"], cache["resid_post", 1])


def test_set_use_switches(bridge: TransformerBridge, llama_bridge: TransformerBridge) -> None:
    with pytest.raises(BridgeError, match="set_use_attn_result"):
        bridge.add_hook("blocks.0.attn.hook_result", Counter().inc)
    bridge.set_use_attn_result(True)
    bridge.add_hook("blocks.0.attn.hook_result", Counter().inc)
    bridge.set_use_attn_result(False)
    assert not bridge.blocks[0].attn.hook_result.has_hooks()
    bridge.set_use_hook_mlp_in(True)  # always available here
    bridge.set_use_attn_in(True)
    bridge.set_use_split_qkv_input(False)
    with pytest.raises(BridgeError, match="hook_q_input"):
        bridge.set_use_split_qkv_input(True)
    llama_bridge.set_ungroup_grouped_query_attention(False)
    with pytest.raises(BridgeError, match="2 key/value heads"):
        llama_bridge.set_ungroup_grouped_query_attention(True)


def test_tokenizer_helpers(bridge: TransformerBridge) -> None:
    token = bridge.to_single_token(" the")
    assert bridge.to_single_str_token(token) == " the"
    with pytest.raises(InputError, match="not one"):
        bridge.to_single_token("hello world")
    text = "the cat and the dog"
    strs = bridge.to_str_tokens(text)
    first = strs.index(" the")
    assert strs[0] == bridge.tokenizer.bos_token and first > 1
    assert bridge.get_token_position(" the", text) == first
    assert bridge.get_token_position(" the", text, prepend_bos=False) == first - 1
    ids = bridge.to_tokens(text + " the")
    assert bridge.get_token_position(token, ids, mode="last") == ids.shape[1] - 1
    with pytest.raises(InputError, match="does not occur"):
        bridge.get_token_position(" fox", text)
    assert bridge.to_str_tokens(text)[0] == bridge.tokenizer.bos_token
    assert bridge.to_str_tokens(ids[0]) == bridge.to_str_tokens(text + " the")
    assert bridge.to_str_tokens(["a b", "c"]) == [
        bridge.to_str_tokens("a b"),
        bridge.to_str_tokens("c"),
    ]
    long = " the" * 200
    assert bridge.to_tokens(long).shape == (1, bridge.cfg.n_ctx)
    assert bridge.to_tokens(long, truncate=False).shape == (1, 201)


def test_generate_runs_hooks_and_equals_hf(bridge: TransformerBridge) -> None:
    ids = bridge.to_tokens("the cat")
    model: Any = bridge.original_model
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(bridge.generate(ids, max_new_tokens=4), expected)
    c = Counter()
    bridge.generate(ids, max_new_tokens=3, fwd_hooks=[(EMBED, c.inc)])
    assert c.count == 3  # the prompt pass and one per new token
    assert not bridge.hook_dict[EMBED].has_hooks()


def test_config_facts(bridge: TransformerBridge) -> None:
    cfg, hf = bridge.cfg, bridge.original_model.config
    assert cfg.d_mlp == 4 * hf.n_embd and cfg.d_head == hf.n_embd // hf.n_head
    assert cfg.n_key_value_heads == cfg.n_heads and cfg.default_prepend_bos
    assert cfg.normalization_type == "LN" and cfg.positional_embedding_type == "standard"
