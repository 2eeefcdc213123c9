"""The spec language v2 on real tiny models: expressions, views, removals, repeated calls."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pydantic import ValidationError
from transformers import AlbertConfig, AlbertModel

from bridge_adapters import tiny
from bridge_adapters.families import tiny_gpt_neox, tiny_opt, tiny_phi3
from bridge_core import AdapterSpec, InputError, SpecError, TransformerBridge, get_registry
from bridge_core.spec import hf_lookup


def spec_of(name: str, **changes: Any) -> AdapterSpec:
    """A registered spec under another name, with top-level fields changed."""
    data = get_registry().adapter(name).model_dump()
    data.update(name=f"{name}-under-test", **changes)
    return AdapterSpec.model_validate(data)


def test_size_expressions_fit_grouped_query_widths() -> None:
    model, _ = tiny_phi3()
    bridge = TransformerBridge.wrap(model)
    ids = torch.randint(3, 500, (2, 6))
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(ids)
        assert torch.equal(logits, model(ids).logits)
    assert cache["q", 0].shape == (2, 6, 4, 16)
    assert cache["k", 0].shape == cache["v", 0].shape == (2, 6, 2, 16)  # n_key_value_heads * d_head
    fused = model.model.layers[0].self_attn.qkv_proj(cache["blocks.0.ln1.hook_out"])
    assert torch.equal(cache["v", 0].flatten(-2), fused[..., 64 + 32 :])
    gate, up = model.model.layers[0].mlp.gate_up_proj(cache["blocks.0.ln2.hook_out"]).chunk(2, -1)
    assert torch.equal(cache["pre", 0], gate) and torch.equal(
        cache["blocks.0.mlp.hook_pre_linear"], up
    )


def test_the_grouped_layout_is_per_head_with_a_group_per_head() -> None:
    model, _ = tiny_gpt_neox()
    ids = torch.randint(3, 500, (2, 6))
    data = get_registry().adapter("gpt_neox").model_dump()
    data["components"]["blocks"]["submodules"]["attn"]["options"]["layout"] = "grouped"
    grouped = TransformerBridge.wrap(model, adapter=AdapterSpec.model_validate(data))
    with torch.no_grad():
        _, expected = TransformerBridge.wrap(model).run_with_cache(ids)  # layout = "per_head"
        _, cache = grouped.run_with_cache(ids)
    for name in ("q", "k", "v", "z"):
        assert torch.equal(cache[name, 1], expected[name, 1])
    data["config"]["fixed"]["n_key_value_heads"] = 2  # not the model's layout: refused
    data["config"]["fixed"]["d_head"] = 48
    with pytest.raises(SpecError, match="fused width 192 is not 2 groups"):
        TransformerBridge.wrap(model, adapter=AdapterSpec.model_validate(data))


def test_a_bad_expression_is_a_spec_error_naming_the_key() -> None:
    data = get_registry().adapter("phi3").model_dump()
    attn = data["components"]["blocks"]["submodules"]["attn"]
    attn["options"]["split"] = ["n_heads * d_head", "n_kv_heads * d_head", "n_kv_heads * d_head"]
    model, _ = tiny_phi3()
    with pytest.raises(
        SpecError, match=r"attn.*options.split = 'n_kv_heads \* d_head' gives a missing"
    ):
        TransformerBridge.wrap(model, adapter=AdapterSpec.model_validate(data))
    with pytest.raises(ValidationError, match=r"config.from_hf\n.*d_model: 'len\(n_embd\)': Call"):
        spec_of("gpt2", config={"from_hf": {"d_model": "len(n_embd)"}})


def test_from_hf_reads_config_values_and_nothing_else() -> None:
    model, _ = tiny.tiny_gpt2()
    lookup = hf_lookup(model.config)
    assert lookup("n_embd") == 64
    assert not callable(lookup("to_dict"))  # methods are not data
    for text in ("__class__", "n_embd.__class__", "n_embd._x"):
        with pytest.raises(ValidationError, match="names starting with '_' are not readable"):
            spec_of("gpt2", config={"from_hf": {"d_model": text}})
    config = spec_of(
        "gpt2",
        config={
            "from_hf": {
                "d_model": "n_embd",
                "n_layers": "n_layer",
                "n_heads": "n_head",
                "d_mlp": "to_dict",
            }
        },
    )
    assert config.bridge_config(model.config).d_mlp is None  # a method is missing, not called


def test_a_conditional_layout_and_the_parallel_block_without_resid_mid() -> None:
    model, _ = tiny_gpt_neox()
    bridge = TransformerBridge.wrap(model)
    assert bridge.cfg.block_layout == "parallel" and bridge.cfg.parallel_attn_mlp
    assert "blocks.0.hook_resid_mid" not in bridge.hook_names()
    model.config.use_parallel_residual = False
    assert TransformerBridge.wrap(model).cfg.block_layout == "pre_norm"


def test_tokens_view_and_a_component_that_is_its_parent_module() -> None:
    model, _ = tiny_opt()
    bridge = TransformerBridge.wrap(model)
    layer = model.model.decoder.layers[0]
    assert bridge.blocks[0].mlp.original_component is layer  # path "."
    seen: dict[str, torch.Tensor] = {}
    handle = layer.fc1.register_forward_hook(lambda m, a, o: seen.update(fc1=o.clone()))
    ids = torch.randint(3, 500, (2, 5))
    try:
        with torch.no_grad():
            _, cache = bridge.run_with_cache(ids)
    finally:
        handle.remove()
    assert seen["fc1"].shape == (10, 256)  # OPT runs its MLP on [batch * pos, d]
    assert torch.equal(cache["blocks.0.mlp.hook_pre"], seen["fc1"].view(2, 5, 256))
    assert (
        cache["blocks.0.hook_mlp_out"].shape == cache["blocks.0.hook_resid_mid"].shape == (2, 5, 64)
    )

    def zero_fc2_input(module: Any, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        return (torch.zeros_like(args[0]),)

    handle = layer.fc2.register_forward_pre_hook(zero_fc2_input)
    try:
        with torch.no_grad():
            expected = model(ids).logits
    finally:
        handle.remove()
    with torch.no_grad():
        zero = [("blocks.0.mlp.hook_post", lambda x, hook: torch.zeros_like(x))]
        got = bridge.run_with_hooks(ids, fwd_hooks=zero)
    assert torch.equal(got, expected)  # an edit through the view reaches the model


def test_remove_hooks_and_aliases() -> None:
    data = get_registry().adapter("gpt2").model_dump()
    data["name"] = "gpt2-trimmed"
    data["components"]["blocks"]["remove_hooks"] = ["hook_resid_mid", "attn.hook_attn_scores"]
    model, _ = tiny.tiny_gpt2()
    bridge = TransformerBridge.wrap(model, adapter=AdapterSpec.model_validate(data))
    names = bridge.hook_names()
    assert "blocks.0.hook_resid_mid" not in names and "blocks.1.attn.hook_attn_scores" not in names
    assert "blocks.0.ln2.hook_in" in names and "blocks.0.attn.hook_pattern" in names
    data["components"]["blocks"]["remove_hooks"] = ["hook_resid_mdi"]
    with pytest.raises(
        SpecError, match=r"'hook_resid_mdi' is neither.*Did you mean 'hook_resid_mid'"
    ):
        TransformerBridge.wrap(model, adapter=AdapterSpec.model_validate(data))


ALBERT = {
    "name": "albert-shared",
    "architectures": ["AlbertModel"],
    "config": {
        "from_hf": {
            "d_model": "hidden_size",
            "n_layers": "num_hidden_layers",
            "n_heads": "num_attention_heads",
        }
    },
    "components": {
        # ALBERT runs its one shared layer num_hidden_layers times
        "blocks": {"kind": "block", "path": "encoder.albert_layer_groups.0.albert_layers"}
    },
}


@pytest.fixture(scope="module")
def albert() -> AlbertModel:
    config = AlbertConfig(
        vocab_size=100,
        embedding_size=32,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
    )
    return tiny.init_model(AlbertModel, config, seed=0)


def test_a_point_that_fires_every_layer_keeps_every_call(albert: AlbertModel) -> None:
    declared = {
        **ALBERT,
        "components": {
            "blocks": {
                **ALBERT["components"]["blocks"],  # type: ignore[dict-item]
                "calls": "n_layers",
                "collect": "stack",
            }
        },
    }
    bridge = TransformerBridge.wrap(albert, adapter=AdapterSpec.model_validate(declared))
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        hidden = albert(ids, output_hidden_states=True).hidden_states
        _, cache = bridge.run_with_cache(ids)
    assert cache["blocks.0.hook_out"].shape == (3, 2, 7, 32)  # stacked: [call, batch, pos, d]
    assert all(torch.equal(cache["blocks.0.hook_out"][i], hidden[i + 1]) for i in range(3))
    assert [c.shape for c in cache.calls("blocks.0.hook_resid_pre")] == [(2, 7, 32)] * 3
    fires = [r for r in bridge.verify().results if r.check == "fires"]
    assert all(r.ok for r in fires), fires


def test_an_undeclared_repeated_point_is_never_silently_the_last(albert: AlbertModel) -> None:
    bridge = TransformerBridge.wrap(albert, adapter=AdapterSpec.model_validate(ALBERT))
    ids = torch.randint(0, 100, (1, 4))
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids)
    with pytest.raises(
        InputError, match=r"fired 3 times .* use cache.calls\('blocks.0.hook_out'\)"
    ):
        cache["blocks.0.hook_out"]
    assert len(cache.calls("blocks.0.hook_resid_post")) == 3
    report = bridge.verify()
    assert ("fires", "blocks.0.hook_out") in {(r.check, r.hook) for r in report.failures()}
