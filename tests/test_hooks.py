"""Hook life cycle, names, edits reaching the output, backward hooks."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bridge_core import HookNameError, HookPoint, HookReturnError, InputError, TransformerBridge


def no_hooks(bridge: TransformerBridge) -> bool:
    return not any(point.has_hooks() for point in bridge.hook_dict.values())


def zero(tensor: torch.Tensor, hook: HookPoint) -> torch.Tensor:
    return torch.zeros_like(tensor)


def test_aliases_resolve_to_one_hook_point(gpt2_bridge: TransformerBridge) -> None:
    aliases = gpt2_bridge.hook_aliases()
    assert aliases["blocks.0.hook_resid_pre"] == "blocks.0.hook_in"
    assert aliases["blocks.0.hook_resid_mid"] == "blocks.0.ln2.hook_in"
    assert aliases["blocks.1.hook_mlp_out"] == "blocks.1.mlp.hook_out"
    assert aliases["hook_embed"] == "embed.hook_out"
    assert "blocks.0.ln1.hook_normalized" not in aliases  # a hook point of its own (TL's)
    assert gpt2_bridge.blocks[0].hook_in is gpt2_bridge.hook_dict["blocks.0.hook_in"]
    assert gpt2_bridge.blocks[0].hook_in.name == "blocks.0.hook_in"


def test_resid_edit_reaches_logits_and_hf_hidden_states(
    gpt2_bridge: TransformerBridge, ids: torch.Tensor
) -> None:
    model = gpt2_bridge.original_model

    def double(tensor: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        return tensor * 2

    with torch.no_grad():
        plain = model(ids, output_hidden_states=True)
        with gpt2_bridge.hooks(fwd_hooks=[("blocks.0.hook_resid_post", double)]):
            edited = model(ids, output_hidden_states=True)
    assert torch.equal(edited.hidden_states[1], plain.hidden_states[1] * 2)
    assert not torch.allclose(edited.logits, plain.logits)
    assert no_hooks(gpt2_bridge)


def test_ablation_equals_plain_torch_hook_on_hf_module(
    llama_bridge: TransformerBridge, ids: torch.Tensor
) -> None:
    mlp = llama_bridge.original_model.model.layers[1].mlp
    handle = mlp.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
    try:
        with torch.no_grad():
            expected = llama_bridge.original_model(ids).logits
    finally:
        handle.remove()
    with torch.no_grad():
        got = llama_bridge.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_mlp_out", zero)])
    assert torch.equal(got, expected)


def test_head_ablation_through_hook_z(llama_bridge: TransformerBridge, ids: torch.Tensor) -> None:
    def kill_head_0(z: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        z = z.clone()
        z[:, :, 0] = 0
        return z

    o_proj = llama_bridge.original_model.model.layers[0].self_attn.o_proj
    d_head = llama_bridge.cfg.d_head or 0

    def plain(module: Any, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        x = args[0].clone()
        x[..., :d_head] = 0
        return (x,)

    handle = o_proj.register_forward_pre_hook(plain)
    try:
        with torch.no_grad():
            expected = llama_bridge.original_model(ids).logits
    finally:
        handle.remove()
    with torch.no_grad():
        got = llama_bridge.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_z", kill_head_0)])
    assert torch.equal(got, expected)


def test_pattern_edit_changes_output_then_kernel_is_restored(
    model_and_bridge: Any, ids: torch.Tensor
) -> None:
    model, bridge = model_and_bridge
    with torch.no_grad():
        plain = model(ids).logits
        uniform = bridge.run_with_hooks(
            ids,
            fwd_hooks=[
                (
                    "blocks.0.attn.hook_pattern",
                    lambda p, hook: p.tril() / p.tril().sum(-1, keepdim=True).clamp(min=1),
                )
            ],
        )
        ablated = bridge.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_pattern", zero)])
        assert model.config._attn_implementation == "sdpa"
        assert torch.equal(model(ids).logits, plain)
    assert not torch.allclose(ablated, plain)
    assert not torch.allclose(uniform, plain)


def test_q_edit_reaches_output(gpt2_bridge: TransformerBridge, ids: torch.Tensor) -> None:
    with torch.no_grad():
        plain = gpt2_bridge(ids)
        edited = gpt2_bridge.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_v", zero)])
    assert edited.shape == plain.shape and not torch.allclose(edited, plain)


def test_hooks_removed_when_a_hook_raises(
    gpt2_bridge: TransformerBridge, ids: torch.Tensor
) -> None:
    def boom(tensor: torch.Tensor, hook: HookPoint) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        gpt2_bridge.run_with_hooks(
            ids, fwd_hooks=[("blocks.0.hook_resid_pre", zero), ("blocks.1.attn.hook_pattern", boom)]
        )
    assert no_hooks(gpt2_bridge)
    assert gpt2_bridge.original_model.config._attn_implementation == "sdpa"


def test_hooks_removed_when_the_forward_raises(gpt2_bridge: TransformerBridge) -> None:
    beyond_vocab = torch.full((1, 4), 10**6, dtype=torch.long)  # fails in the embedding
    with pytest.raises((IndexError, RuntimeError)):
        gpt2_bridge.run_with_cache(beyond_vocab)
    assert no_hooks(gpt2_bridge)


def test_unknown_hook_name_has_did_you_mean(gpt2_bridge: TransformerBridge) -> None:
    with pytest.raises(HookNameError, match=r"blocks\.0\.hook_resid_pre"):
        gpt2_bridge.run_with_hooks(
            torch.zeros(1, 3, dtype=torch.long), fwd_hooks=[("blocks.0.hook_resid_per", zero)]
        )
    assert no_hooks(gpt2_bridge)


def test_second_bad_name_leaves_no_first_hook(gpt2_bridge: TransformerBridge) -> None:
    with (
        pytest.raises(HookNameError),
        gpt2_bridge.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", zero), ("nope", zero)]),
    ):
        pass
    assert no_hooks(gpt2_bridge)


def test_wrong_shape_or_dtype_names_hook_and_shapes(
    gpt2_bridge: TransformerBridge, ids: torch.Tensor
) -> None:
    def shrink(tensor: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        return tensor[:, :-1]

    def to_half(tensor: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        return tensor.half()

    with pytest.raises(HookReturnError, match=r"blocks\.0\.hook_in.*\(2, 11, 64\).*\(2, 12, 64\)"):
        gpt2_bridge.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_pre", shrink)])
    with pytest.raises(HookReturnError, match="float16"):
        gpt2_bridge.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_pre", to_half)])
    assert no_hooks(gpt2_bridge)


def test_names_filter_of_wrong_type(gpt2_bridge: TransformerBridge, ids: torch.Tensor) -> None:
    with pytest.raises(InputError, match="names_filter"):
        gpt2_bridge.run_with_cache(ids, names_filter=3)  # type: ignore[arg-type]  # bad on purpose
    assert no_hooks(gpt2_bridge)


def test_perma_hooks_survive_reset(gpt2_bridge: TransformerBridge, ids: torch.Tensor) -> None:
    calls: list[str] = []

    def record(tensor: torch.Tensor, hook: HookPoint) -> None:
        calls.append(hook.name)

    gpt2_bridge.add_perma_hook("hook_embed", record)
    gpt2_bridge.add_hook(lambda name: name.endswith("ln_final.hook_out"), record)
    gpt2_bridge.reset_hooks()
    with torch.no_grad():
        gpt2_bridge(ids)
    assert calls == ["embed.hook_out"]
    gpt2_bridge.reset_hooks(including_permanent=True)
    assert no_hooks(gpt2_bridge)


def test_hook_layer_and_context(gpt2_bridge: TransformerBridge, ids: torch.Tensor) -> None:
    def remember(tensor: torch.Tensor, hook: HookPoint) -> None:
        hook.ctx["layer"] = hook.layer()

    point = gpt2_bridge.hook_dict["blocks.1.attn.hook_q"]
    with torch.no_grad():
        gpt2_bridge.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_q", remember)])
    assert point.ctx == {"layer": 1}
    point.clear_context()


def test_backward_hooks_and_incl_bwd(gpt2_bridge: TransformerBridge, ids: torch.Tensor) -> None:
    grads: list[torch.Tensor] = []
    with gpt2_bridge.hooks(
        bwd_hooks=[("blocks.1.hook_resid_pre", lambda g, hook: grads.append(g))]
    ):
        loss = gpt2_bridge(ids, return_type="loss")
        loss.backward()
    assert grads and grads[0].shape == (2, 12, 64)
    loss, cache = gpt2_bridge.run_with_cache(
        ids, return_type="loss", incl_bwd=True, names_filter="blocks.1.hook_resid_pre"
    )
    assert torch.allclose(cache["blocks.1.hook_in_grad"], grads[0])
    gpt2_bridge.original_model.zero_grad(set_to_none=True)
    assert no_hooks(gpt2_bridge)


def test_gradients_flow_through_edits(gpt2_bridge: TransformerBridge, ids: torch.Tensor) -> None:
    scale = torch.tensor(1.0, requires_grad=True)
    with gpt2_bridge.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", lambda t, hook: t * scale)]):
        gpt2_bridge(ids, return_type="loss").backward()
    assert scale.grad is not None and scale.grad.abs() > 0
    gpt2_bridge.original_model.zero_grad(set_to_none=True)


def test_incl_bwd_needs_a_loss(gpt2_bridge: TransformerBridge, ids: torch.Tensor) -> None:
    with pytest.raises(InputError, match="return_type='loss'"):
        gpt2_bridge.run_with_cache(ids, incl_bwd=True)


def test_in_place_pattern_edit_counts(gpt2_bridge: TransformerBridge, ids: torch.Tensor) -> None:
    def zero_head_0(pattern: torch.Tensor, hook: HookPoint) -> None:
        pattern[:, 0] = 0  # TransformerLens habit: edit in place, return None

    with torch.no_grad():
        plain = gpt2_bridge(ids)
        edited = gpt2_bridge.run_with_hooks(
            ids, fwd_hooks=[("blocks.0.attn.hook_pattern", zero_head_0)]
        )
        expected = gpt2_bridge.run_with_hooks(
            ids,
            fwd_hooks=[
                (
                    "blocks.0.attn.hook_pattern",
                    lambda p, hook: p * (torch.arange(p.shape[1]) != 0)[:, None, None],
                )
            ],
        )
    assert not torch.allclose(edited, plain)
    assert torch.equal(edited, expected)


def test_incl_bwd_gives_gradients_of_head_and_pattern_hooks(
    llama_bridge: TransformerBridge, ids: torch.Tensor
) -> None:
    names = ["blocks.0.attn.hook_q", "blocks.0.attn.hook_v", "blocks.0.attn.hook_pattern"]
    _, cache = llama_bridge.run_with_cache(
        ids, return_type="loss", incl_bwd=True, names_filter=names
    )
    for name in names:
        grad = cache[f"{name}_grad"]
        assert grad.shape == cache[name].shape and grad.abs().sum() > 0, name
    llama_bridge.original_model.zero_grad(set_to_none=True)


def test_bad_inputs_are_our_errors(gpt2_bridge: TransformerBridge, ids: torch.Tensor) -> None:
    embeds = torch.zeros(1, 3, 64)
    with pytest.raises(InputError, match="input_ids"):
        gpt2_bridge(inputs_embeds=embeds, return_type="loss")
    with pytest.raises(InputError, match="images="):
        gpt2_bridge(ids, images=[object()])
    with pytest.raises(HookNameError, match=r"Did you mean 'blocks\.0\.attn'"):
        gpt2_bridge.component("blocks.0.atn")
    with pytest.raises(InputError, match="'fwd' or 'bwd'"):
        gpt2_bridge.add_hook("hook_embed", zero, dir="backward")  # type: ignore[arg-type]  # bad on purpose
    assert no_hooks(gpt2_bridge)


def test_a_point_hooked_again_runs_once_and_first_and_leaves_nothing_between_calls(
    gpt2_bridge: TransformerBridge, ids: torch.Tensor
) -> None:
    """A point's tap registers its PyTorch hook again on each hooked call (the one it
    removed, restored): it runs once, before the hooks the module has of its own, with the
    keywords a pre-hook takes, and nothing of it stays on the module between calls."""
    block = gpt2_bridge.original_model.transformer.h[0]
    tables = (block._forward_pre_hooks, block._forward_pre_hooks_with_kwargs)
    tables += (block.mlp._forward_hooks,)
    before = [dict(table) for table in tables]
    seen: list[str] = []
    own = [
        block.register_forward_pre_hook(lambda module, args: seen.append("block's own")),
        block.mlp.register_forward_hook(lambda module, args, out: seen.append("mlp's own")),
    ]
    with_own = [dict(table) for table in tables]

    def saw(tensor: torch.Tensor, hook: HookPoint) -> None:
        seen.append(hook.name)

    try:
        for _ in range(3):
            seen.clear()
            with torch.no_grad():
                gpt2_bridge.run_with_hooks(
                    ids, fwd_hooks=[("blocks.0.hook_in", saw), ("blocks.0.mlp.hook_out", saw)]
                )
            assert seen == ["blocks.0.hook_in", "block's own", "blocks.0.mlp.hook_out", "mlp's own"]
            assert [dict(table) for table in tables] == with_own
    finally:
        for handle in own:
            handle.remove()
    assert [dict(table) for table in tables] == before
