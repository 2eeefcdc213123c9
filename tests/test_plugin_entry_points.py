"""Plugins installed as real distributions (a ``.dist-info`` with ``transformer_bridge``
entry points): broken, clashing, exiting and misspelt plugins are reported by name and the rest
load; none takes over a built-in; autoload can be switched off."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from transformers import GPT2LMHeadModel

from bridge_core import (
    AdapterSpec,
    DuplicateAdapterError,
    PluginLoadError,
    TransformerBridge,
    get_registry,
    hookimpl,
)
from bridge_core.registry import Registry

AUTOLOAD_ENV = "TRANSFORMER_BRIDGE_DISABLE_PLUGIN_AUTOLOAD"
PLUGIN_MODULE_PREFIX = "tb_test_plugin_"


def adapter_names(registry: Registry) -> set[str]:
    return {spec.name for spec in registry.adapters()}


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits  # type: ignore[no-any-return]


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
    research_gpt2: tuple[GPT2LMHeadModel, Any],
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
