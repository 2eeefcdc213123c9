"""Nothing is ever silently wrong: caches stay what they were, refusals are errors, opt-ins work."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import FalconConfig, FalconForCausalLM

from bridge_adapters import tiny
from bridge_core import AdapterSpec, BridgeError, HookPoint, TransformerBridge

FALCON = {
    "name": "falcon-under-test",
    "architectures": ["FalconForCausalLM"],
    "config": {
        "from_hf": {
            "d_model": "hidden_size",
            "n_layers": "num_hidden_layers",
            "n_heads": "num_attention_heads",
        }
    },
    "components": {
        "blocks": {
            "kind": "block",
            "path": "transformer.h",
            "submodules": {
                # multi-query: the fused output is [q (all heads) | k (one head) | v (one head)]
                "attn": {
                    "kind": "joint_qkv_attention",
                    "path": "self_attention",
                    "options": {
                        "qkv": "query_key_value",
                        "o": "dense",
                        "split": ["d_model", "d_head", "d_head"],
                    },
                },
                "mlp": {
                    "kind": "mlp",
                    "path": "mlp",
                    "options": {"in": "dense_h_to_4h", "out": "dense_4h_to_h"},
                },
            },
        }
    },
}


@pytest.fixture(scope="module")
def falcon() -> tuple[FalconForCausalLM, TransformerBridge]:
    """A tiny Falcon-7B layout (parallel attention, multi-query) with the built-in adapter."""
    config = FalconConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        parallel_attn=True,
        new_decoder_architecture=False,
        multi_query=True,
    )
    model = tiny.init_model(FalconForCausalLM, config, seed=0)
    bridge = TransformerBridge.wrap(model)
    assert bridge.adapter.name == "falcon"
    return model, bridge


def test_pattern_hooks_refuse_an_attention_that_bypasses_the_interface(
    falcon: tuple[FalconForCausalLM, TransformerBridge],
) -> None:
    model, _ = falcon  # the built-in adapter has a kernel for it; the core's kind has none
    bridge = TransformerBridge.wrap(model, adapter=AdapterSpec.model_validate(FALCON))
    kernel = model.config._attn_implementation
    for name in ("blocks.0.attn.hook_pattern", "blocks.1.attn.hook_attn_scores"):
        with pytest.raises(BridgeError, match=r"FalconAttention .* does not choose its kernel"):
            bridge.add_hook(name, lambda x, hook: None)
        with pytest.raises(BridgeError, match="FalconAttention"):
            bridge.run_with_cache(torch.tensor([[1, 2, 3]]), names_filter=name)
    assert model.config._attn_implementation == kernel  # never switched
    assert not any(p.has_hooks() for p in bridge.hook_dict.values())


def test_a_cached_activation_the_model_changes_in_place_stays_as_it_was(
    falcon: tuple[FalconForCausalLM, TransformerBridge],
) -> None:
    model, bridge = falcon
    mlp = model.transformer.h[0].mlp
    seen: list[torch.Tensor] = []
    handle = mlp.register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    ids = torch.randint(0, 100, (2, 6))
    try:
        with torch.no_grad():
            for _ in range(2):  # the first cache finds out, the second relies on it
                _, cache = bridge.run_with_cache(ids, names_filter="blocks.0.mlp.hook_out")
                # Falcon adds the attention output to the MLP output in place afterwards
                assert torch.equal(cache["blocks.0.mlp.hook_out"], seen[-1])
    finally:
        handle.remove()
    assert bridge.hook_dict["blocks.0.mlp.hook_out"].copy_on_cache is True
    assert bridge.hook_dict["blocks.0.attn.hook_z"].copy_on_cache is None  # never cached yet


def test_a_change_after_caching_that_was_not_expected_is_an_error(
    falcon: tuple[FalconForCausalLM, TransformerBridge],
) -> None:
    _, bridge = falcon
    point = bridge.hook_dict["blocks.1.mlp.hook_out"]
    point.copy_on_cache = False  # as if an earlier run had found it safe
    with (
        torch.no_grad(),
        pytest.raises(BridgeError, match=r"changed 'blocks.1.mlp.hook_out' in place"),
    ):
        bridge.run_with_cache(torch.tensor([[4, 5, 6]]), names_filter=point.name)
    assert point.copy_on_cache is True
    with torch.no_grad():
        bridge.run_with_cache(torch.tensor([[4, 5, 6]]), names_filter=point.name)  # now copied


@pytest.fixture(scope="module")
def gpt2() -> tuple[Any, TransformerBridge]:
    model, tokenizer = tiny.tiny_gpt2()
    return model, TransformerBridge.wrap(model, tokenizer=tokenizer)


def test_hook_result_is_opt_in_and_sums_to_the_attention_output(
    gpt2: tuple[Any, TransformerBridge],
) -> None:
    model, bridge = gpt2
    ids = torch.randint(3, 500, (2, 7))
    with pytest.raises(BridgeError, match=r"is off .*set_use_attn_result\(True\)"):
        bridge.add_hook("blocks.0.attn.hook_result", lambda x, hook: None)
    bridge.set_use_attn_result(True)
    try:
        with torch.no_grad():
            logits, cache = bridge.run_with_cache(ids)
            assert torch.equal(logits, model(ids).logits)  # reading results changes nothing
        result = cache["blocks.1.attn.hook_result"]
        assert result.shape == (2, 7, 4, 64)
        b_o = model.transformer.h[1].attn.c_proj.bias
        torch.testing.assert_close(result.sum(-2) + b_o, cache["blocks.1.hook_attn_out"])

        def zero_head_1(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
            x = x.clone()
            x[:, :, 1] = 0
            return x

        with torch.no_grad():
            by_result = bridge.run_with_hooks(
                ids, fwd_hooks=[("blocks.1.attn.hook_result", zero_head_1)]
            )
            by_z = bridge.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_z", zero_head_1)])
        torch.testing.assert_close(by_result, by_z)
        assert not torch.allclose(by_result, logits)
        _, grads = bridge.run_with_cache(
            ids, names_filter="blocks.0.attn.hook_result", incl_bwd=True, return_type="loss"
        )
        assert grads["blocks.0.attn.hook_result_grad"].shape == (2, 7, 4, 64)
        model.zero_grad(set_to_none=True)
    finally:
        bridge.set_use_attn_result(False)
    assert "blocks.0.attn.hook_result" not in bridge.run_with_cache(ids)[1]


def test_identity_edits_of_patterns_keep_the_kernel_output(
    gpt2: tuple[Any, TransformerBridge],
) -> None:
    model, bridge = gpt2
    ids = torch.randint(3, 500, (2, 7))
    copy = [("blocks.0.attn.hook_pattern", lambda p, hook: p.clone())]
    with torch.no_grad():
        assert torch.equal(bridge.run_with_hooks(ids, fwd_hooks=copy), model(ids).logits)
    with torch.inference_mode():  # no version counters here: changes are found by comparison
        halved = bridge.run_with_hooks(
            ids, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda p, hook: p.mul_(0.5))]
        )
        assert not torch.equal(halved, model(ids).logits)


def test_rotated_queries_are_what_the_kernel_receives() -> None:
    model, tokenizer = tiny.tiny_llama()
    bridge = TransformerBridge.wrap(model, tokenizer=tokenizer)
    ids = torch.randint(3, 500, (1, 6))
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(ids)
        assert torch.equal(logits, model(ids).logits)
    q, rot_q = cache["q", 0], cache["rot_q", 0]
    assert rot_q.shape == q.shape == (1, 6, 4, 16)
    torch.testing.assert_close(rot_q[:, 0], q[:, 0])  # position 0 is rotated by angle 0
    assert not torch.allclose(rot_q[:, 1:], q[:, 1:])
    assert (
        "blocks.0.attn.hook_rot_q" not in TransformerBridge.wrap(tiny.tiny_gpt2()[0]).hook_names()
    )
