"""Bad inputs get our errors, naming what was wrong, where, and what is accepted.

Each test is one row group of the bad-input matrix in docs/errors.md.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from bridge_adapters.tiny import build_tokenizer
from bridge_core import (
    AdapterSpec,
    HookPoint,
    InputError,
    PluginLoadError,
    SpecError,
    TransformerBridge,
    get_registry,
    hookimpl,
)
from bridge_core.registry import Registry


def zero(tensor: torch.Tensor, hook: HookPoint) -> torch.Tensor:
    return torch.zeros_like(tensor)


def no_hooks(bridge: TransformerBridge) -> bool:
    return not any(point.has_hooks() for point in bridge.hook_dict.values())


def returning(value: Any) -> Any:
    """A hook implementation that returns `value`."""

    @hookimpl
    def impl() -> Any:
        return value

    return impl


def gpt2_spec(**update: Any) -> AdapterSpec:
    return get_registry().adapter("gpt2").model_copy(update={"name": "mine", **update})


def test_a_bare_hook_pair_instead_of_a_list_of_pairs(
    gpt2_bridge: TransformerBridge, ids: torch.Tensor
) -> None:
    pair = ("blocks.0.hook_resid_pre", zero)
    fix = r"wrap it in a list, {}=\[\('blocks\.0\.hook_resid_pre', fn\)\]"
    with pytest.raises(InputError, match=fix.format("fwd_hooks")):
        gpt2_bridge.run_with_hooks(ids, fwd_hooks=pair)  # type: ignore[arg-type]  # bad on purpose
    with pytest.raises(InputError, match=fix.format("bwd_hooks")):
        gpt2_bridge.run_with_hooks(ids, bwd_hooks=pair)  # type: ignore[arg-type]  # bad on purpose
    with pytest.raises(InputError, match=fix.format("fwd_hooks")):
        gpt2_bridge.hooks(pair).__enter__()  # type: ignore[arg-type]  # bad on purpose
    with pytest.raises(InputError, match=fix.format("fwd_hooks")):
        gpt2_bridge.generate(ids[:1, :4], max_new_tokens=1, fwd_hooks=pair)
    # the other malformed lists name the entry; a valid pair before it is not left attached
    with pytest.raises(InputError, match=r"fwd_hooks\[1\]: the hook name is None"):
        gpt2_bridge.run_with_hooks(ids, fwd_hooks=[pair, (None, zero)])  # type: ignore[list-item]  # bad on purpose
    with pytest.raises(InputError, match=r"fwd_hooks\[0\]: .* is None, not callable"):
        gpt2_bridge.run_with_hooks(ids, fwd_hooks=[("hook_embed", None)])  # type: ignore[list-item]  # bad on purpose
    with pytest.raises(InputError, match=r"fwd_hooks\[0\] must be a \(hook name or filter"):
        gpt2_bridge.run_with_hooks(ids, fwd_hooks=["hook_embed"])  # type: ignore[list-item]  # bad on purpose
    assert no_hooks(gpt2_bridge)
    # the accepted form still works: the edit reaches the logits
    clean = gpt2_bridge(ids)
    assert not torch.equal(gpt2_bridge.run_with_hooks(ids, fwd_hooks=[pair]), clean)


def test_one_string_in_a_list_needs_no_pad_token(text_models: dict[str, Any]) -> None:
    model, _ = text_models["gpt2"]
    tokenizer = build_tokenizer(model.config.vocab_size, pad=None)  # GPT-2's habit: no pad
    bridge = TransformerBridge.wrap(model, tokenizer=tokenizer)
    ids = tokenizer("hello world", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(ids).logits

    assert torch.equal(bridge(["hello world"], prepend_bos=False), expected)
    assert torch.equal(bridge.to_tokens(["hello world"], prepend_bos=False), ids)
    same_length = ["the cat sat", "the dog sat"]
    assert len({len(row) for row in tokenizer(same_length)["input_ids"]}) == 1
    assert bridge(same_length).shape[0] == 2  # equal lengths: nothing to pad either
    with pytest.raises(InputError, match=r"different lengths \(\d+, \d+ tokens\).*no pad token"):
        bridge(["hello world", "the cat sat on the mat"])


@pytest.mark.parametrize(
    ("key", "alias"),
    [("blocks.0.hook_in", "blocks.0.hook_in"), ("blocks.{i}.hook_in", "blocks.0.hook_in")],
)
def test_an_alias_that_is_a_canonical_name(
    text_models: dict[str, Any], key: str, alias: str
) -> None:
    model, _ = text_models["gpt2"]
    spec = gpt2_spec(hook_aliases={key: key.replace("hook_in", "hook_out")})
    with pytest.raises(SpecError) as error:
        TransformerBridge.wrap(model, adapter=spec)
    message = str(error.value)
    assert f"adapter spec 'mine', hook_aliases.{key}:" in message
    assert f"alias {alias!r} is already a canonical hook name" in message
    assert "Accepted: alias names that are no canonical hook name" in message


@pytest.mark.parametrize(
    ("model_class", "problem"),
    [
        ("GPT2Config", "transformers.GPT2Config is a class, but no PreTrainedModel subclass"),
        ("pipeline", "transformers.pipeline is a function, not a model class"),
        ("GPT2LMHeadModl", "transformers has no 'GPT2LMHeadModl'. Did you mean 'GPT2LMHeadModel'"),
    ],
)
def test_a_model_class_that_is_no_model_class(
    saved_gpt2: Path, model_class: str, problem: str
) -> None:
    with pytest.raises(SpecError) as error:
        TransformerBridge.boot(saved_gpt2, adapter=gpt2_spec(model_class=model_class))
    message = str(error.value)
    assert message.startswith(f"adapter spec 'mine', model_class: {problem}")
    assert "Accepted: the name of a transformers model class (a PreTrainedModel subclass" in message


@pytest.mark.parametrize(
    ("hook", "returned", "message"),
    [
        ("register_adapters", 3, "register_adapters returned int; expected a list of AdapterSpec"),
        ("register_adapters", "gpt2.toml", "register_adapters returned str; expected a list"),
        ("register_adapters", None, "register_adapters returned AdapterSpec.*return \\[spec\\]"),
        ("register_components", ["attention"], "register_components returned list; expected a "),
        ("register_components", {3: object}, "register_components: kind 3 is not a name"),
    ],
)
def test_a_plugin_hook_that_returns_the_wrong_type(hook: str, returned: Any, message: str) -> None:
    registry = Registry(autoload=False)
    before = (registry.adapters(), registry.plugins(), registry.component_kinds())
    if returned is None:  # one spec, not a list of them
        returned = gpt2_spec(architectures=["MineForCausalLM"])
    valid: Any = {
        "register_adapters": [gpt2_spec(name="mine-ok", architectures=["OkForCausalLM"])],
        "register_components": {},
    }
    plugin = SimpleNamespace(
        **{**{k: returning(v) for k, v in valid.items()}, hook: returning(returned)}
    )
    with pytest.raises(PluginLoadError, match=f"plugin 'odd' hook {message}"):
        registry.register(plugin, name="odd")
    # nothing half-registered: not even the valid hook's adapter, and the name is free again
    assert (registry.adapters(), registry.plugins(), registry.component_kinds()) == before
    assert registry.register(SimpleNamespace(), name="odd") == "odd"
