"""The plugin registry: hookspecs, in-process and entry-point plugins, conflicts, routing."""

from __future__ import annotations

import copy
import inspect
import sys
import textwrap
from collections.abc import Callable, Iterator, Mapping
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

AUTOLOAD_ENV = "TRANSFORMER_BRIDGE_DISABLE_PLUGIN_AUTOLOAD"
PLUGIN_MODULE_PREFIX = "tb_test_plugin_"


# -- helpers ------------------------------------------------------------------------------


class ResearchGPT2(GPT2LMHeadModel):
    """A GPT-2 subclass under a new architecture name, as a research fork would ship it."""


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


@pytest.fixture
def research_gpt2(text_models: dict[str, tuple[Any, Any]]) -> tuple[ResearchGPT2, Any]:
    """A tiny model whose architecture ("ResearchGPT2") no built-in adapter claims."""
    model, tokenizer = text_models["gpt2"]
    return tiny.init_model(ResearchGPT2, copy.deepcopy(model.config), seed=1), tokenizer


@pytest.fixture
def install_plugins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[Mapping[str, str]], None]]:
    """Install plugin modules as a real distribution with `transformer_bridge` entry points.

    Call it with {entry-point name: module source}; each module is importable as
    ``tb_test_plugin_<name>``, found through a ``.dist-info`` on sys.path.
    """
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)

    def install(plugins: Mapping[str, str]) -> None:
        site = tmp_path / "site-packages"
        dist_info = site / "tb_test_plugins-0.1.dist-info"
        dist_info.mkdir(parents=True)
        (dist_info / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: tb-test-plugins\nVersion: 0.1\n"
        )
        lines = ["[transformer_bridge]"]
        for name, source in plugins.items():
            (site / f"{PLUGIN_MODULE_PREFIX}{name}.py").write_text(textwrap.dedent(source))
            lines.append(f"{name} = {PLUGIN_MODULE_PREFIX}{name}")
        (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        monkeypatch.syspath_prepend(str(site))

    yield install
    for module in [m for m in sys.modules if m.startswith(PLUGIN_MODULE_PREFIX)]:
        del sys.modules[module]


BROKEN_IMPORT = """
    raise ImportError("tb_fast_kernels is not installed")
"""

INVALID_SPEC = """
    from bridge_core import hookimpl

    @hookimpl
    def register_adapters():
        return [{"name": "half-done", "architectures": ["HalfDoneForCausalLM"]}]
"""

GOOD_RESEARCH = """
    from bridge_core import hookimpl
    from bridge_core.registry import Registry

    @hookimpl
    def register_adapters():
        gpt2 = Registry(autoload=False).adapter("gpt2")
        update = {"name": "gpt2-research", "architectures": ["ResearchGPT2"]}
        return [gpt2.model_copy(update=update)]
"""

CLASHING = """
    from bridge_core import hookimpl
    from bridge_core.registry import Registry

    @hookimpl
    def register_adapters():
        gpt2 = Registry(autoload=False).adapter("gpt2")
        return [gpt2.model_copy(update={"name": "gpt2-clash"})]
"""


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
    fresh_registry: None, research_gpt2: tuple[ResearchGPT2, Any], ids: torch.Tensor
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
    fresh_registry: None, research_gpt2: tuple[ResearchGPT2, Any], tmp_path: Path
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


# -- broken plugins through real entry points ----------------------------------------------


def test_broken_plugins_are_reported_by_name_and_the_rest_load(
    install_plugins: Callable[[Mapping[str, str]], None],
) -> None:
    install_plugins({"broken": BROKEN_IMPORT, "invalid": INVALID_SPEC, "research": GOOD_RESEARCH})
    registry = Registry()

    with pytest.warns(RuntimeWarning) as warned:
        names = adapter_names(registry)

    messages = [str(w.message) for w in warned if issubclass(w.category, RuntimeWarning)]
    assert any("broken" in m and "tb_fast_kernels is not installed" in m for m in messages)
    assert any("invalid" in m and "components" in m for m in messages), messages
    errors = registry.plugin_errors
    assert set(errors) >= {"broken", "invalid"}
    assert "research" not in errors
    assert "tb_fast_kernels is not installed" in str(errors["broken"])
    assert isinstance(errors["broken"].__cause__, ImportError)
    assert "components" in str(errors["invalid"]) and "Field required" in str(errors["invalid"])
    assert {"gpt2", "llama", "gpt2-research"} <= names
    assert "half-done" not in names
    plugins = {p.name: p for p in registry.plugins()}
    assert "broken" not in plugins and "invalid" not in plugins
    assert plugins["research"].distribution == "tb-test-plugins"
    assert plugins["research"].version == "0.1"


def test_a_broken_plugin_does_not_stop_booting_through_the_good_one(
    install_plugins: Callable[[Mapping[str, str]], None],
    fresh_registry: None,
    research_gpt2: tuple[ResearchGPT2, Any],
    ids: torch.Tensor,
) -> None:
    install_plugins({"broken": BROKEN_IMPORT, "research": GOOD_RESEARCH})
    model, tokenizer = research_gpt2

    with pytest.warns(RuntimeWarning, match="broken"):
        bridge = TransformerBridge.wrap(model, tokenizer=tokenizer)

    assert bridge.adapter.name == "gpt2-research"
    assert torch.equal(bridge(ids), logits(model, ids))
    assert "broken" in get_registry().plugin_errors


def test_an_entry_point_plugin_that_clashes_is_reported_and_lookup_names_both(
    install_plugins: Callable[[Mapping[str, str]], None],
) -> None:
    install_plugins({"clash": CLASHING})
    registry = Registry()

    with pytest.warns(RuntimeWarning, match=r"gpt2-clash"):
        registry.adapters()

    assert "clash" in registry.plugin_errors
    with pytest.raises(DuplicateAdapterError) as error:
        registry.adapter_for("GPT2LMHeadModel")
    for name in ("'gpt2'", "'gpt2-clash'", "'clash'", "GPT2LMHeadModel"):
        assert name in str(error.value)
    assert registry.adapter_for("LlamaForCausalLM").name == "llama"  # the rest still works


TAKEOVER = """
    from bridge_core import hookimpl
    from bridge_core.components.standard import BUILTIN_KINDS
    from bridge_core.registry import Registry

    class LoudMLP(BUILTIN_KINDS["mlp"]):
        '''The plugin's own 'mlp' kind.'''

    @hookimpl
    def register_adapters():
        gpt2 = Registry(autoload=False).adapter("gpt2")
        return [gpt2.model_copy(update={"description": "the plugin's gpt2", "priority": -5})]

    @hookimpl
    def register_components():
        return {"mlp": LoudMLP}
"""

EXITS = """
    import sys

    sys.exit("usage: tb_test_plugin_exits [--fast]")
"""

MISSPELT = """
    from bridge_core import hookimpl
    from bridge_core.registry import Registry

    @hookimpl
    def register_adapter():
        return [Registry(autoload=False).adapter("gpt2").model_copy(update={"name": "never"})]
"""


def test_an_entry_point_plugin_cannot_take_over_a_builtin_kind_or_adapter_name(
    install_plugins: Callable[[Mapping[str, str]], None],
    fresh_registry: None,
    text_models: dict[str, tuple[Any, Any]],
    ids: torch.Tensor,
) -> None:
    """Issue 11: a plugin re-registering 'mlp' and 'gpt2' was reported but took over every
    model. The built-ins stay in force; the plugin's are picked by '<plugin>:<name>'."""
    install_plugins({"takeover": TAKEOVER})
    model, tokenizer = text_models["gpt2"]
    registry = get_registry()
    with pytest.warns(RuntimeWarning, match=r"plugin 'takeover' registers adapter 'gpt2'"):
        builtin_mlp = registry.component_class("mlp")

    assert builtin_mlp.__module__ == "bridge_core.components.standard"
    bridge = TransformerBridge.wrap(model, tokenizer=tokenizer)
    assert registry.adapter("gpt2").description != "the plugin's gpt2"
    assert type(bridge.blocks[0].mlp) is builtin_mlp
    message = str(registry.plugin_errors["takeover"])
    assert "adapter='takeover:gpt2'" in message and "kind = 'takeover:mlp'" in message
    # picked by name, the plugin's adapter and kind are there
    assert registry.adapter("takeover:gpt2").description == "the plugin's gpt2"
    assert registry.component_class("takeover:mlp").__name__ == "LoudMLP"
    picked = TransformerBridge.wrap(model, tokenizer=tokenizer, adapter="takeover:gpt2")
    assert picked.adapter.description == "the plugin's gpt2"
    assert torch.equal(picked(ids), logits(model, ids))
    assert "takeover" in {p.name for p in registry.plugins()}


def test_a_plugin_that_exits_at_import_is_reported_and_the_rest_load(
    install_plugins: Callable[[Mapping[str, str]], None],
) -> None:
    """Issue 11: sys.exit() in a plugin's import left the registry half-loaded."""
    install_plugins({"exits": EXITS, "research": GOOD_RESEARCH})
    registry = Registry()

    with pytest.warns(RuntimeWarning, match=r'plugin "exits".*SystemExit.*sys.exit\(\)'):
        names = adapter_names(registry)

    assert {"gpt2", "llama", "gpt2-research"} <= names
    error = registry.plugin_errors["exits"]
    assert isinstance(error, PluginLoadError) and isinstance(error.__cause__, SystemExit)
    assert "usage: tb_test_plugin_exits" in str(error)


def test_ctrl_c_while_loading_propagates_and_leaves_the_registry_unloaded(
    install_plugins: Callable[[Mapping[str, str]], None], tmp_path: Path
) -> None:
    flag = tmp_path / "interrupted-once"
    interrupts_once = f"""
        import pathlib

        flag = pathlib.Path({str(flag)!r})
        if not flag.exists():
            flag.touch()
            raise KeyboardInterrupt
    """
    install_plugins({"interrupts": interrupts_once, "research": GOOD_RESEARCH})
    registry = Registry()

    with pytest.raises(KeyboardInterrupt):
        registry.adapters()

    # not half-loaded: the next query loads everything afresh
    assert {"gpt2", "llama", "gpt2-research"} <= adapter_names(registry)
    assert registry.plugin_errors == {}
    assert {"interrupts", "research"} <= {p.name for p in registry.plugins()}


def test_a_misspelt_hookimpl_is_an_error_naming_the_plugin_and_the_hook(
    install_plugins: Callable[[Mapping[str, str]], None],
) -> None:
    """Issue 11: `register_adapter` (no s) was silently never called."""

    @hookimpl
    def register_adapter() -> list[AdapterSpec]:
        return []

    registry = Registry(autoload=False)
    with pytest.raises(PluginLoadError) as error:
        registry.register(SimpleNamespace(register_adapter=register_adapter), name="typo")
    message = str(error.value)
    assert "plugin 'typo' implements 'register_adapter', which is no hook" in message
    assert "Did you mean 'register_adapters'?" in message
    assert "typo" not in {p.name for p in registry.plugins()}

    install_plugins({"misspelt": MISSPELT})
    with pytest.warns(RuntimeWarning, match="'register_adapter'.*'register_adapters'"):
        errors = Registry().plugin_errors
    assert "Did you mean 'register_adapters'?" in str(errors["misspelt"])


def test_env_var_disables_entry_point_plugins_but_not_builtins(
    install_plugins: Callable[[Mapping[str, str]], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    install_plugins({"broken": BROKEN_IMPORT, "research": GOOD_RESEARCH})
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    registry = Registry()

    names = adapter_names(registry)

    assert {"gpt2", "llama"} <= names
    assert "gpt2-research" not in names
    assert registry.plugin_errors == {}
    assert f"{PLUGIN_MODULE_PREFIX}research" not in sys.modules
    assert f"{PLUGIN_MODULE_PREFIX}broken" not in sys.modules


def test_registry_loads_plugins_lazily_on_first_query(
    install_plugins: Callable[[Mapping[str, str]], None],
) -> None:
    install_plugins({"research": GOOD_RESEARCH})

    registry = Registry()
    assert f"{PLUGIN_MODULE_PREFIX}research" not in sys.modules, "Registry() imported a plugin"

    registry.adapter("gpt2-research")
    assert f"{PLUGIN_MODULE_PREFIX}research" in sys.modules


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
