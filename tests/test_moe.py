"""Mixture-of-experts hook points against the plain HF model: values, edits, errors."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from bridge_adapters.families import tiny_mixtral, tiny_qwen2_moe
from bridge_core import BridgeError, TransformerBridge
from bridge_core.components.experts import experts_active, routed_tokens
from bridge_core.verify import example_inputs

EXPERT = 2  # the expert the edits below act on


@pytest.fixture(scope="module")
def mixtral() -> tuple[Any, TransformerBridge, dict[str, torch.Tensor]]:
    model, tokenizer = tiny_mixtral()
    bridge = TransformerBridge.wrap(model, tokenizer=tokenizer)
    return model, bridge, example_inputs(bridge)


def _logits(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _experts(model: Any, layer: int = 0) -> Any:
    return model.model.layers[layer].mlp.experts


def test_router_outputs_and_expert_activations_equal_a_hand_computation(mixtral: Any) -> None:
    model, bridge, inputs = mixtral
    with torch.no_grad():
        _, cache = bridge.run_with_cache(**inputs, names_filter=lambda n: ".mlp." in n)
    moe = model.model.layers[0].mlp
    x = cache["blocks.0.mlp.hook_in"]  # [batch, pos, d_model]
    logits = x @ moe.gate.weight.T
    assert torch.allclose(cache["blocks.0.mlp.hook_router_logits"], logits, atol=1e-6)
    probs = torch.softmax(cache["blocks.0.mlp.hook_router_logits"].float(), dim=-1)
    top, indices = probs.topk(2, dim=-1)
    assert torch.equal(cache["blocks.0.mlp.hook_expert_indices"], indices)
    assert torch.equal(cache["blocks.0.mlp.hook_expert_weights"], top / top.sum(-1, keepdim=True))

    gate_up, down = moe.experts.gate_up_proj[EXPERT], moe.experts.down_proj[EXPERT]
    batch, pos, slot = routed_tokens(cache["blocks.0.mlp.hook_expert_indices"], EXPERT)
    rows = x[batch, pos]  # the tokens routed to the expert, by slot then token
    gate, up = nn.functional.linear(rows, gate_up).chunk(2, dim=-1)
    post = nn.functional.silu(gate) * up
    name = f"blocks.0.mlp.experts.{EXPERT}"
    assert torch.equal(cache[f"{name}.hook_in"], rows)
    assert torch.equal(cache[f"{name}.hook_pre"], gate)
    assert torch.equal(cache[f"{name}.hook_pre_linear"], up)
    assert torch.equal(cache[f"{name}.hook_post"], post)
    assert torch.equal(cache[f"{name}.hook_out"], nn.functional.linear(post, down))
    assert cache[f"{name}.hook_post"].shape == (len(slot), 48)
    counts = [cache[f"blocks.0.mlp.experts.{e}.hook_in"].shape[0] for e in range(4)]
    assert sum(counts) == 2 * 16  # every token goes to k = 2 experts


def _zero(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
    return torch.zeros_like(tensor)


def test_ablating_an_expert_equals_hf_with_that_expert_zeroed(mixtral: Any) -> None:
    model, bridge, inputs = mixtral
    model.set_experts_implementation("eager")  # HF's eager loop: the reference to the bit
    try:
        ablated = copy.deepcopy(model)
        with torch.no_grad():
            _experts(ablated).down_proj[EXPERT].zero_()
        expected = _logits(ablated, inputs)
        with torch.no_grad():
            got = bridge.run_with_hooks(
                **inputs, fwd_hooks=[(f"blocks.0.mlp.experts.{EXPERT}.hook_post", _zero)]
            )
        assert torch.equal(got, expected)
        assert not torch.equal(got, _logits(model, inputs))
    finally:
        model.set_experts_implementation("grouped_mm")


def test_an_edit_under_grouped_mm_changes_exactly_the_tokens_routed_to_the_expert(
    mixtral: Any,
) -> None:
    model, bridge, inputs = mixtral
    assert model.config._experts_implementation == "grouped_mm"
    names = ["blocks.0.mlp.hook_in", "blocks.0.mlp.hook_expert_indices", "blocks.0.mlp.hook_out"]
    with torch.no_grad():
        _, clean = bridge.run_with_cache(**inputs, names_filter=names)
        with bridge.hooks(fwd_hooks=[(f"blocks.0.mlp.experts.{EXPERT}.hook_post", _zero)]):
            _, edited = bridge.run_with_cache(**inputs, names_filter=names)
    routed = (clean["blocks.0.mlp.hook_expert_indices"] == EXPERT).any(-1)
    before, after = clean["blocks.0.mlp.hook_out"], edited["blocks.0.mlp.hook_out"]
    assert torch.equal(after[~routed], before[~routed])  # the kernel's bits elsewhere
    # the routed tokens: the other expert's weighted output alone, in plain torch
    experts = _experts(model)
    x, indices = clean["blocks.0.mlp.hook_in"][routed], clean["blocks.0.mlp.hook_expert_indices"]
    probs = torch.softmax(x @ model.model.layers[0].mlp.gate.weight.T, dim=-1)
    top = probs.topk(2, dim=-1).values
    weights = top / top.sum(-1, keepdim=True)
    expected = torch.zeros_like(x)
    for row, (pair, w) in enumerate(zip(indices[routed], weights, strict=True)):
        for e, weight in zip(pair.tolist(), w, strict=True):
            if e != EXPERT:
                gate, up = nn.functional.linear(x[row], experts.gate_up_proj[e]).chunk(2)
                expected[row] = weight * (experts.down_proj[e] @ (nn.functional.silu(gate) * up))
    assert torch.allclose(after[routed], expected, atol=1e-6)
    assert not torch.allclose(before[routed], expected, atol=1e-4)


def test_editing_router_logits_reroutes_as_the_router_would(mixtral: Any) -> None:
    model, bridge, inputs = mixtral
    doubled = copy.deepcopy(model)
    with torch.no_grad():
        doubled.model.layers[1].mlp.gate.weight.mul_(2)  # x @ (2W) == 2 (x @ W), exactly
    with torch.no_grad():
        got = bridge.run_with_hooks(
            **inputs, fwd_hooks=[("blocks.1.mlp.hook_router_logits", lambda x, hook: x * 2)]
        )
    assert torch.equal(got, _logits(doubled, inputs))


def test_forcing_the_experts_of_every_token(mixtral: Any) -> None:
    _, bridge, inputs = mixtral

    def only_experts_0_and_1(indices: torch.Tensor, hook: Any) -> None:
        indices[..., 0], indices[..., 1] = 0, 1  # in place, TransformerLens style

    names = [f"blocks.0.mlp.experts.{e}.hook_in" for e in range(4)]
    force = [("blocks.0.mlp.hook_expert_indices", only_experts_0_and_1)]
    with torch.no_grad(), bridge.hooks(fwd_hooks=force):
        _, cache = bridge.run_with_cache(**inputs, names_filter=names)
    assert [cache[n].shape[0] for n in names] == [16, 16, 0, 0]  # experts 2 and 3 see no token


def test_an_expert_index_outside_the_experts_is_an_error(mixtral: Any) -> None:
    _, bridge, inputs = mixtral
    with pytest.raises(BridgeError, match=r"edited to \[4\], outside the 4 experts"):
        bridge.run_with_hooks(
            **inputs, fwd_hooks=[("blocks.0.mlp.hook_expert_indices", lambda i, hook: i + 1)]
        )


def test_per_expert_points_fire_once_also_for_an_expert_without_tokens(mixtral: Any) -> None:
    _, bridge, _ = mixtral
    ids = torch.tensor([[5]])  # one token: two experts of four
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids, names_filter=lambda n: ".experts." in n)
    rows = [cache[f"blocks.0.mlp.experts.{e}.hook_post"].shape for e in range(4)]
    assert sorted(r[0] for r in rows) == [0, 0, 1, 1] and {r[1] for r in rows} == {48}
    assert all(len(cache.calls(n)) == 1 for n in cache)


def test_verify_skips_the_edits_of_experts_without_tokens(mixtral: Any) -> None:
    _, bridge, _ = mixtral
    short = bridge.verify({"input_ids": torch.tensor([[5, 6]])})  # experts 2 / 1, 3 get none
    assert short.ok, short.summary()
    skipped = {r.hook.rsplit(".", 1)[0] for r in short.results if r.ok is None}
    assert skipped == {"blocks.0.mlp.experts.2", "blocks.1.mlp.experts.1", "blocks.1.mlp.experts.3"}


def test_hooks_restore_the_experts_implementation_also_when_a_hook_raises(mixtral: Any) -> None:
    model, bridge, inputs = mixtral

    def boom(tensor: torch.Tensor, hook: Any) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        bridge.run_with_hooks(**inputs, fwd_hooks=[("blocks.1.mlp.experts.0.hook_pre", boom)])
    assert model.config._experts_implementation == "grouped_mm" and not experts_active()
    assert torch.equal(bridge(**inputs), _logits(model, inputs))


def test_an_ablation_under_inference_mode_equals_one_under_no_grad(mixtral: Any) -> None:
    _, bridge, inputs = mixtral
    hooks = [(f"blocks.1.mlp.experts.{EXPERT}.hook_pre", _zero)]
    with torch.no_grad():
        expected = bridge.run_with_hooks(**inputs, fwd_hooks=hooks)

    def halve_in_place(tensor: torch.Tensor, hook: Any) -> None:
        tensor.mul_(0.5)

    with torch.inference_mode():
        got = bridge.run_with_hooks(**inputs, fwd_hooks=hooks)
        _, cache = bridge.run_with_cache(**inputs)
        halved = bridge.run_with_hooks(
            **inputs, fwd_hooks=[("blocks.0.mlp.experts.1.hook_post", halve_in_place)]
        )
    assert torch.equal(got, expected)
    assert cache["blocks.0.mlp.experts.0.hook_post"].is_inference()
    assert not torch.equal(halved, bridge(**inputs))


def test_gradients_reach_per_expert_activations_and_outputs_stay_exact(mixtral: Any) -> None:
    model, bridge, inputs = mixtral
    name = f"blocks.0.mlp.experts.{EXPERT}"
    loss, cache = bridge.run_with_cache(
        **inputs,
        return_type="loss",
        incl_bwd=True,
        names_filter=[f"{name}.hook_post", f"{name}.hook_out"],
    )
    bridge.zero_grad()
    expected = model(**inputs, labels=inputs["input_ids"]).loss
    assert torch.equal(loss.detach(), expected.detach())
    down = _experts(model).down_proj[EXPERT].detach()
    grad_post, grad_out = cache[f"{name}.hook_post_grad"], cache[f"{name}.hook_out_grad"]
    assert grad_post.abs().sum() > 0
    assert torch.allclose(grad_post, grad_out @ down, atol=1e-7)  # the chain rule through W_out


def test_a_backward_hook_on_router_logits_gets_hf_s_gradient(mixtral: Any) -> None:
    model, bridge, inputs = mixtral
    loss, cache = bridge.run_with_cache(
        **inputs, return_type="loss", incl_bwd=True, names_filter="blocks.1.mlp.hook_router_logits"
    )
    bridge.zero_grad()
    seen: list[torch.Tensor] = []

    def keep_grad(module: nn.Module, args: Any, output: Any) -> None:
        output[0].retain_grad()
        seen.append(output[0])

    handle = model.model.layers[1].mlp.gate.register_forward_hook(keep_grad)
    try:
        expected = model(**inputs, labels=inputs["input_ids"]).loss
        expected.backward()
    finally:
        handle.remove()
        model.zero_grad()
    assert torch.equal(loss.detach(), expected.detach())
    hf_grad = seen[0].grad
    assert hf_grad is not None and hf_grad.abs().sum() > 0
    grad = cache["blocks.1.mlp.hook_router_logits_grad"]
    assert torch.allclose(grad, hf_grad.view_as(grad), atol=1e-8)


def test_qwen2_moe_output_is_routed_experts_plus_gated_shared_expert() -> None:
    model, tokenizer = tiny_qwen2_moe()
    bridge = TransformerBridge.wrap(model, tokenizer=tokenizer)
    inputs = example_inputs(bridge)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(**inputs, names_filter=lambda n: "blocks.1.mlp" in n)
        x = cache["blocks.1.mlp.hook_in"].flatten(0, 1)
        indices = cache["blocks.1.mlp.hook_expert_indices"].flatten(0, 1)
        weights = cache["blocks.1.mlp.hook_expert_weights"].flatten(0, 1)
        routed = model.model.layers[1].mlp.experts(x, indices, weights)
    gate = torch.sigmoid(cache["blocks.1.mlp.hook_shared_expert_gate"])
    shared = gate * cache["blocks.1.mlp.shared_expert.hook_out"]
    assert torch.equal(cache["blocks.1.mlp.hook_out"], routed.view_as(shared) + shared)
    assert cache["blocks.1.mlp.shared_expert.hook_post"].shape == (2, 8, 64)


class _FusedExperts(nn.Module):
    """Experts with 3-D weights whose forward does not go through ExpertsInterface."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.gate_up_proj, self.down_proj = original.gate_up_proj, original.down_proj
        self.original = original

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.original(*args)
        return result


def test_experts_that_cannot_be_routed_are_refused_naming_the_module() -> None:
    model, tokenizer = tiny_mixtral()
    mlp = model.model.layers[0].mlp
    mlp.experts = _FusedExperts(mlp.experts)
    bridge = TransformerBridge.wrap(model, tokenizer=tokenizer)
    inputs = example_inputs(bridge)
    with pytest.raises(BridgeError, match=r"_FusedExperts .* ExpertsInterface"):
        bridge.run_with_hooks(**inputs, fwd_hooks=[("blocks.0.mlp.experts.0.hook_post", _zero)])
    bridge.run_with_hooks(**inputs, fwd_hooks=[("blocks.0.mlp.hook_expert_indices", _zero)])

    model.config._experts_implementation = "sonicmoe"  # a fused kernel
    with pytest.raises(BridgeError, match=r"MixtralExperts .*'sonicmoe'"):
        bridge.add_hook("blocks.1.mlp.experts.0.hook_pre", _zero)
    assert model.config._experts_implementation == "sonicmoe"
    model.config._experts_implementation = "grouped_mm"


def test_a_layer_that_skips_the_router_while_hooked_raises(mixtral: Any) -> None:
    model, bridge, inputs = mixtral
    experts = _experts(model, 1)
    experts.forward = lambda hidden, index, weights: torch.zeros_like(hidden)  # a hub kernel
    try:
        with pytest.raises(BridgeError, match="ran without calling MixtralExperts"):
            bridge.run_with_hooks(
                **inputs, fwd_hooks=[("blocks.1.mlp.experts.3.hook_post", lambda x, hook: None)]
            )
    finally:
        del experts.forward
    assert model.config._experts_implementation == "grouped_mm"
