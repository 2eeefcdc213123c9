"""The plugin registry: hookspecs, in-process and entry-point plugins, conflicts, routing."""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from transformers import GPT2LMHeadModel, LlamaConfig, LlamaForSequenceClassification

from bridge_adapters import tiny
from bridge_core import (
    AdapterNotFoundError,
    AdapterSpec,
    BridgeError,
    DuplicateAdapterError,
    GeneralizedComponent,
    PluginLoadError,
    TransformerBridge,
    get_registry,
    hookimpl,
    hookspecs,
)
from bridge_core.hooks import OutputTap
from bridge_core.registry import Registry

# -- helpers ------------------------------------------------------------------------------


def builtin_spec(name: str) -> AdapterSpec:
    return Registry(autoload=False).adapter(name)


def adapter_plugin(*specs: AdapterSpec) -> SimpleNamespace:
    """A notebook-style plugin object contributing `specs`."""

    @hookimpl
    def register_adapters() -> list[AdapterSpec]:
        return list(specs)

    return SimpleNamespace(register_adapters=register_adapters)


def adapter_names(registry: Registry) -> set[str]:
    return {spec.name for spec in registry.adapters()}


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits  # type: ignore[no-any-return]


# -- every hookspec has a test -------------------------------------------------------------


def test_every_hookspec_has_a_test_here() -> None:
    marker = f"{hookspecs.PROJECT}_spec"
    specs = {n for n, f in vars(hookspecs).items() if callable(f) and hasattr(f, marker)}
    assert specs == {"register_adapters", "register_components", "resolve_adapter"}
    tests = [n for n, f in globals().items() if n.startswith("test_") and inspect.isfunction(f)]
    untested = sorted(s for s in specs if not any(t.startswith(f"test_{s}") for t in tests))
    assert not untested, f"hookspecs without a test_<hookspec>... in {__file__}: {untested}"


# -- register_adapters ---------------------------------------------------------------------


def test_register_adapters_in_process_then_wrap_a_new_architecture(
    fresh_registry: None, research_gpt2: tuple[GPT2LMHeadModel, Any], ids: torch.Tensor
) -> None:
    model, tokenizer = research_gpt2
    spec = builtin_spec("gpt2").model_copy(
        update={"name": "gpt2-research", "architectures": ["ResearchGPT2"]}
    )
    name = get_registry().register(adapter_plugin(spec), name="research")

    bridge = TransformerBridge.wrap(model, tokenizer=tokenizer)

    assert name == "research"
    assert bridge.adapter.name == "gpt2-research"
    assert get_registry().adapter_source("gpt2-research").name == "research"
    assert torch.equal(bridge(ids), logits(model, ids))
    _, cache = bridge.run_with_cache(ids, names_filter="blocks.0.hook_resid_post")
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[1]
    assert torch.equal(cache["blocks.0.hook_resid_post"], hidden)


def test_register_adapters_in_process_then_boot_by_model_class(
    fresh_registry: None, research_gpt2: tuple[GPT2LMHeadModel, Any], tmp_path: Path
) -> None:
    """A saved checkpoint names an architecture transformers does not have; the spec says
    which HF class loads it."""
    model, tokenizer = research_gpt2
    saved = tiny.save_pretrained(model, tokenizer, tmp_path / "research-gpt2")
    spec = builtin_spec("gpt2").model_copy(
        update={
            "name": "gpt2-research",
            "architectures": ["ResearchGPT2"],
            "model_class": "GPT2LMHeadModel",
        }
    )
    get_registry().register(adapter_plugin(spec))

    bridge = TransformerBridge.boot(saved)

    assert type(bridge.original_model) is GPT2LMHeadModel
    assert bridge.adapter.name == "gpt2-research"
    assert torch.equal(
        bridge("The quick brown fox"), logits(model, bridge.to_tokens("The quick brown fox"))
    )


def test_register_adapters_as_dicts_is_validated() -> None:
    registry = Registry(autoload=False)
    as_dict = builtin_spec("gpt2").model_copy(update={"name": "gpt2-dict"}).model_dump()
    as_dict["priority"] = -1

    @hookimpl
    def register_adapters() -> list[dict[str, Any]]:
        return [as_dict]

    registry.register(SimpleNamespace(register_adapters=register_adapters), name="dicts")

    assert isinstance(registry.adapter("gpt2-dict"), AdapterSpec)
    assert registry.adapter_for("GPT2LMHeadModel").name == "gpt2"  # -1 loses to 0


def test_register_adapters_returning_junk_is_refused_with_the_plugin_named() -> None:
    registry = Registry(autoload=False)
    before = adapter_names(registry)

    @hookimpl
    def register_adapters() -> list[str]:
        return ["gpt2.toml"]

    with pytest.raises(PluginLoadError, match=r"'junk'.*register_adapters.*str"):
        registry.register(SimpleNamespace(register_adapters=register_adapters), name="junk")
    assert adapter_names(registry) == before
    assert "junk" not in {p.name for p in registry.plugins()}


# -- register_components -------------------------------------------------------------------


class ActivationMLPBridge(GeneralizedComponent):
    """An MLP whose activation function module is hookable: ``hook_act_out``."""

    internal_hooks = ("hook_act_out",)
    path_options = required_options = ("act",)

    def bind(self, module: nn.Module) -> None:
        self.hook_act_out.bind(OutputTap(self.part(module, "act")))


def test_register_components_adds_a_kind_a_spec_can_use(
    fresh_registry: None, text_models: dict[str, tuple[Any, Any]], ids: torch.Tensor
) -> None:
    model, tokenizer = text_models["gpt2"]
    spec = builtin_spec("gpt2")
    blocks = spec.components["blocks"]
    mlp = blocks.submodules["mlp"].model_copy(update={"kind": "act_mlp", "options": {"act": "act"}})
    blocks = blocks.model_copy(update={"submodules": {**blocks.submodules, "mlp": mlp}})
    spec = spec.model_copy(
        update={"name": "gpt2-act", "components": {**spec.components, "blocks": blocks}}
    )

    @hookimpl
    def register_components() -> dict[str, type[GeneralizedComponent]]:
        return {"act_mlp": ActivationMLPBridge}

    get_registry().register(SimpleNamespace(register_components=register_components))
    assert get_registry().component_class("act_mlp") is ActivationMLPBridge

    bridge = TransformerBridge.wrap(model, tokenizer=tokenizer, adapter=spec)
    seen: list[torch.Tensor] = []
    act = model.transformer.h[1].mlp.act
    handle = act.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    try:
        _, cache = bridge.run_with_cache(ids, names_filter="blocks.1.mlp.hook_act_out")
    finally:
        handle.remove()

    assert isinstance(bridge.blocks[1].mlp, ActivationMLPBridge)
    assert torch.equal(cache["blocks.1.mlp.hook_act_out"], seen[0])


def test_register_components_rejects_a_class_that_is_no_component() -> None:
    registry = Registry(autoload=False)
    kinds = registry.component_kinds()

    @hookimpl
    def register_components() -> dict[str, type]:
        return {"linear": nn.Linear}

    with pytest.raises(PluginLoadError, match=r"'torchy'.*'linear'.*GeneralizedComponent"):
        registry.register(SimpleNamespace(register_components=register_components), name="torchy")
    assert registry.component_kinds() == kinds


def test_register_components_same_kind_twice_is_an_error_naming_both() -> None:
    registry = Registry(autoload=False)

    @hookimpl
    def register_components() -> dict[str, type[GeneralizedComponent]]:
        return {"mlp": ActivationMLPBridge}

    with pytest.raises(DuplicateAdapterError, match=r"'mine'.*'mlp'.*bridge_core"):
        registry.register(SimpleNamespace(register_components=register_components), name="mine")
    assert registry.component_class("mlp") is not ActivationMLPBridge


# -- resolve_adapter -----------------------------------------------------------------------


def test_resolve_adapter_overrides_routing_for_the_configs_it_claims(
    fresh_registry: None, text_models: dict[str, tuple[Any, Any]], ids: torch.Tensor
) -> None:
    gpt2, gpt2_tokenizer = text_models["gpt2"]
    llama, llama_tokenizer = text_models["llama"]
    shallow = builtin_spec("gpt2").model_copy(update={"name": "gpt2-shallow"})
    asked: list[str] = []

    @hookimpl
    def resolve_adapter(hf_config: Any) -> AdapterSpec | None:
        asked.append(hf_config.model_type)
        return shallow if hf_config.model_type == "gpt2" and hf_config.n_layer <= 2 else None

    get_registry().register(SimpleNamespace(resolve_adapter=resolve_adapter))

    gpt2_bridge = TransformerBridge.wrap(gpt2, tokenizer=gpt2_tokenizer)
    llama_bridge = TransformerBridge.wrap(llama, tokenizer=llama_tokenizer)

    assert asked == ["gpt2", "llama"]
    assert gpt2_bridge.adapter.name == "gpt2-shallow"
    assert llama_bridge.adapter.name == "llama"  # None: routing by architecture goes on
    assert torch.equal(gpt2_bridge(ids), logits(gpt2, ids))
    # an explicit adapter= is not second-guessed by the plugin
    assert TransformerBridge.wrap(gpt2, adapter="gpt2").adapter.name == "gpt2"


def test_resolve_adapter_first_result_wins() -> None:
    registry = Registry(autoload=False)
    first = builtin_spec("gpt2").model_copy(update={"name": "first"})

    @hookimpl
    def resolve_adapter(hf_config: Any) -> AdapterSpec:
        return first

    @hookimpl
    def no_opinion(hf_config: Any) -> None:
        return None

    registry.register(SimpleNamespace(resolve_adapter=resolve_adapter), name="has-one")
    registry.register(SimpleNamespace(resolve_adapter=no_opinion), name="abstains")
    config = SimpleNamespace(architectures=["GPT2LMHeadModel"], model_type="gpt2")

    assert registry.resolve(config).name == "first"


def test_resolve_adapter_returning_junk_is_reported_and_routing_goes_on() -> None:
    registry = Registry(autoload=False)

    @hookimpl
    def resolve_adapter(hf_config: Any) -> str:
        return "gpt2"

    registry.register(SimpleNamespace(resolve_adapter=resolve_adapter), name="stringly")
    config = SimpleNamespace(architectures=["GPT2LMHeadModel"], model_type="gpt2")

    with pytest.warns(RuntimeWarning, match=r"plugin 'stringly' hook resolve_adapter returned"):
        assert registry.resolve(config).name == "gpt2"
    assert "routing by architecture goes on" in str(registry.plugin_errors["stringly"])


@pytest.mark.parametrize("raised", [RuntimeError("no network"), SystemExit(3)])
def test_resolve_adapter_that_raises_blocks_no_wrap(
    fresh_registry: None,
    text_models: dict[str, tuple[Any, Any]],
    ids: torch.Tensor,
    raised: BaseException,
) -> None:
    """Issue 11: one plugin whose resolve_adapter raised made every wrap fail."""
    model, tokenizer = text_models["gpt2"]

    @hookimpl
    def resolve_adapter(hf_config: Any) -> AdapterSpec:
        raise raised

    get_registry().register(SimpleNamespace(resolve_adapter=resolve_adapter), name="flaky")
    with pytest.warns(RuntimeWarning, match=r"plugin 'flaky' hook resolve_adapter raised"):
        bridge = TransformerBridge.wrap(model, tokenizer=tokenizer)

    assert bridge.adapter.name == "gpt2"
    assert torch.equal(bridge(ids), logits(model, ids))
    error = get_registry().plugin_errors["flaky"]
    assert type(raised).__name__ in str(error) and error.__cause__ is raised


# -- conflicts and priorities --------------------------------------------------------------


def test_equal_priority_claim_is_refused_naming_both_and_nothing_is_half_registered() -> None:
    registry = Registry(autoload=False)
    before = (adapter_names(registry), registry.plugins(), registry.component_kinds())
    rival = builtin_spec("gpt2").model_copy(update={"name": "gpt2-rival"})

    @hookimpl
    def register_adapters() -> list[AdapterSpec]:
        return [rival]

    @hookimpl
    def register_components() -> dict[str, type[GeneralizedComponent]]:
        return {"act_mlp": ActivationMLPBridge}

    @hookimpl
    def resolve_adapter(hf_config: Any) -> AdapterSpec:
        return rival

    plugin = SimpleNamespace(
        register_adapters=register_adapters,
        register_components=register_components,
        resolve_adapter=resolve_adapter,
    )
    with pytest.raises(DuplicateAdapterError) as error:
        registry.register(plugin, name="rival-plugin")

    message = str(error.value)
    for name in ("'gpt2'", "'gpt2-rival'", "'rival-plugin'", "bridge_adapters", "GPT2LMHeadModel"):
        assert name in message, f"{name} missing from: {message}"
    assert (adapter_names(registry), registry.plugins(), registry.component_kinds()) == before
    config = SimpleNamespace(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    assert registry.resolve(config).name == "gpt2", "the refused plugin's hooks still run"
    # the name is free again: a fixed version of the plugin registers
    fixed = adapter_plugin(rival.model_copy(update={"priority": 1}))
    assert registry.register(fixed, name="rival-plugin") == "rival-plugin"


def test_adapter_names_must_be_unique() -> None:
    registry = Registry(autoload=False)
    other = builtin_spec("gpt2").model_copy(update={"architectures": ["OtherForCausalLM"]})

    with pytest.raises(DuplicateAdapterError, match=r"'gpt2'.*bridge_adapters"):
        registry.register(adapter_plugin(other), name="copycat")
    assert "copycat" not in {p.name for p in registry.plugins()}


@pytest.mark.parametrize(("priority", "winner"), [(1, "gpt2-tuned"), (-1, "gpt2")])
def test_different_priorities_higher_wins(
    fresh_registry: None,
    text_models: dict[str, tuple[Any, Any]],
    ids: torch.Tensor,
    priority: int,
    winner: str,
) -> None:
    model, tokenizer = text_models["gpt2"]
    tuned = builtin_spec("gpt2").model_copy(update={"name": "gpt2-tuned", "priority": priority})
    get_registry().register(adapter_plugin(tuned), name="tuned")

    bridge = TransformerBridge.wrap(model, tokenizer=tokenizer)

    assert get_registry().adapter_for("GPT2LMHeadModel").name == winner
    assert bridge.adapter.name == winner
    assert torch.equal(bridge(ids), logits(model, ids))


# -- unclaimed architectures and unknown names ---------------------------------------------


def test_unclaimed_architecture_names_it_the_known_adapters_and_the_same_model_type(
    text_models: dict[str, tuple[Any, Any]],
) -> None:
    llama, _ = text_models["llama"]
    config = LlamaConfig(**{**llama.config.to_dict(), "num_labels": 3})
    classifier = LlamaForSequenceClassification(config)

    with pytest.raises(AdapterNotFoundError) as error:
        TransformerBridge.wrap(classifier)

    message = str(error.value)
    assert "'LlamaForSequenceClassification'" in message
    assert "adapter='llama'" in message
    assert "Known adapters: " in message
    known = message.split("Known adapters: ")[1]
    assert "gpt2" in known and "llama" in known
    assert isinstance(error.value, KeyError)  # KeyError-like, as the contract says


def test_custom_architecture_without_a_model_type_match() -> None:
    registry = Registry(autoload=False)

    with pytest.raises(AdapterNotFoundError) as error:
        registry.adapter_for("ResearchNetForCausalLM", model_type="research_net")

    message = str(error.value)
    assert "'ResearchNetForCausalLM'" in message
    assert "adapter=" not in message  # no adapter handles model_type research_net
    assert "gpt2" in message and "llama" in message


def test_misspelt_architecture_has_a_did_you_mean() -> None:
    with pytest.raises(AdapterNotFoundError, match=r"Did you mean 'LlamaForCausalLM'"):
        Registry(autoload=False).adapter_for("LLamaForCausalLM")


def test_unknown_adapter_name_has_a_did_you_mean(text_models: dict[str, tuple[Any, Any]]) -> None:
    model, _ = text_models["gpt2"]

    with pytest.raises(AdapterNotFoundError) as error:
        TransformerBridge.wrap(model, adapter="gtp2")

    assert "'gtp2'" in str(error.value)
    assert "Did you mean 'gpt2'?" in str(error.value)
    assert "llama" in str(error.value)


def test_config_without_architectures_asks_for_adapter() -> None:
    config = SimpleNamespace(architectures=None, model_type="gpt2")

    with pytest.raises(AdapterNotFoundError, match="adapter="):
        Registry(autoload=False).resolve(config)


# -- the process-wide registry -------------------------------------------------------------


def test_get_registry_is_one_registry_with_the_builtins(fresh_registry: None) -> None:
    registry = get_registry()

    assert get_registry() is registry
    assert {"gpt2", "llama"} <= adapter_names(registry)
    plugins = {p.name: p for p in registry.plugins()}
    assert plugins["bridge_adapters.plugin"].distribution == "transformer-bridge"
    assert registry.adapter_source("llama").name == "bridge_adapters.plugin"
    assert set(registry.adapter("llama").architectures) >= {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
    }


def test_registering_a_name_twice_is_our_error_naming_it() -> None:
    """Re-running a notebook cell that registers a plugin."""
    registry = Registry(autoload=False)
    extra = builtin_spec("gpt2").model_copy(update={"name": "extra", "architectures": ["X"]})
    registry.register(adapter_plugin(extra), name="notebook")

    with pytest.raises(BridgeError) as error:
        registry.register(adapter_plugin(extra), name="notebook")

    assert "'notebook'" in str(error.value)
    assert registry.adapter_for("X").name == "extra"


def test_adapter_source_as_the_first_query_loads_the_plugins() -> None:
    source = Registry(autoload=False).adapter_source("gpt2")

    assert source.name == "bridge_adapters.plugin"


def test_unregister_removes_what_a_plugin_contributed() -> None:
    registry = Registry(autoload=False)
    extra = builtin_spec("gpt2").model_copy(update={"name": "extra", "architectures": ["X"]})
    registry.register(adapter_plugin(extra), name="extra-plugin")
    assert registry.adapter_for("X").name == "extra"

    registry.unregister("extra-plugin")

    with pytest.raises(AdapterNotFoundError):
        registry.adapter_for("X")
    assert "extra-plugin" not in {p.name for p in registry.plugins()}
