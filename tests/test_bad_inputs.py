"""Bad inputs get our errors, naming what was wrong, where, and what is accepted.

Each test is one row group of the bad-input matrix in docs/errors.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from bridge_adapters.families import tiny_roberta
from bridge_adapters.tiny import build_tokenizer
from bridge_core import (
    AdapterSpec,
    HookNameError,
    HookPoint,
    HookReturnError,
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


def test_an_empty_prompt_is_our_error_or_runs_with_a_bos(gpt2_bridge: TransformerBridge) -> None:
    """Issue 11: an empty prompt failed deep inside HF ("cannot reshape tensor of 0 elements")."""
    bos = gpt2_bridge.tokenizer.bos_token_id
    with torch.no_grad():  # with a BOS (the default, as TransformerLens), "" is one token
        expected = gpt2_bridge.original_model(torch.tensor([[bos]])).logits
    assert gpt2_bridge.cfg.default_prepend_bos
    assert torch.equal(gpt2_bridge(""), expected)
    assert torch.equal(gpt2_bridge("", prepend_bos=True), expected)
    no_bos = r"the text input {} tokenizes to no tokens, .* or prepend_bos=True"
    with pytest.raises(InputError, match=no_bos.format("''")):
        gpt2_bridge("", prepend_bos=False)
    with pytest.raises(InputError, match=no_bos.format(r"\[''\]")):
        gpt2_bridge.run_with_cache([""], prepend_bos=False)
    with pytest.raises(InputError, match=r"input_ids has no positions \(shape \(1, 0\)\)"):
        gpt2_bridge(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(InputError, match="an empty list of texts"):
        gpt2_bridge([])
    assert no_hooks(gpt2_bridge)


def test_a_prompt_longer_than_the_learned_positions_is_our_error(
    gpt2_bridge: TransformerBridge, llama_bridge: TransformerBridge
) -> None:
    """Issue 11: GPT-2 with more than n_ctx tokens failed with "index out of range in self"."""
    n_ctx = gpt2_bridge.cfg.n_ctx
    assert n_ctx == 128
    too_long = torch.randint(3, 500, (1, n_ctx + 1))
    with pytest.raises(InputError, match=r"input_ids has 129 positions, but the model's learned "
                       r"position embeddings cover 128 \(cfg.n_ctx\)"):  # fmt: skip
        gpt2_bridge.run_with_cache(too_long)
    with pytest.raises(InputError, match=r"max_new_tokens=5 would make 131.*cover 128"):
        gpt2_bridge.generate(too_long[:, :126], max_new_tokens=5)
    assert gpt2_bridge(too_long[:, :n_ctx]).shape == (1, n_ctx, 512)  # n_ctx itself runs
    # RoBERTa's positions start after the padding id: n_ctx is what the table has left
    roberta = TransformerBridge.wrap(tiny_roberta()[0])
    config = roberta.original_model.config
    assert roberta.cfg.n_ctx == config.max_position_embeddings - config.pad_token_id - 1
    no_pad = too_long.clamp(min=config.pad_token_id + 1)
    assert roberta(no_pad[:, : roberta.cfg.n_ctx]).shape[1] == roberta.cfg.n_ctx
    with pytest.raises(InputError, match="learned position embeddings cover"):
        roberta(no_pad[:, : roberta.cfg.n_ctx + 1])
    # rotary positions run past n_ctx in HF, and so they do here
    ids = too_long.clamp(max=llama_bridge.cfg.d_vocab - 1)
    with torch.no_grad():
        expected = llama_bridge.original_model(ids).logits
    assert torch.equal(llama_bridge(ids), expected)
    assert no_hooks(gpt2_bridge)


def test_a_hook_returning_a_tensor_on_another_device_is_our_error(
    gpt2_bridge: TransformerBridge, ids: torch.Tensor
) -> None:
    """Issue 11: "Tensor on device cpu is not on the expected device meta!" from inside torch."""

    def elsewhere(tensor: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        return tensor.to("meta")

    with pytest.raises(HookReturnError) as error:
        gpt2_bridge.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_pre", elsewhere)])
    message = str(error.value)
    assert "on 'blocks.0.hook_in' returned a tensor on meta; the activation is on cpu" in message
    assert "Accepted: a tensor on the activation's device" in message
    assert no_hooks(gpt2_bridge)


def test_incl_bwd_under_no_grad_computes_the_gradients(
    gpt2_bridge: TransformerBridge, ids: torch.Tensor
) -> None:
    """Issue 11: "element 0 of tensors does not require grad" from inside torch."""
    names = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post"]
    kwargs: dict[str, Any] = {"names_filter": names, "incl_bwd": True, "return_type": "loss"}
    _, expected = gpt2_bridge.run_with_cache(ids, **kwargs)
    with torch.no_grad():
        _, cache = gpt2_bridge.run_with_cache(ids, **kwargs)
        assert not torch.is_grad_enabled()  # the caller's mode is back
    for name in names:
        assert torch.equal(cache[f"{name}_grad"], expected[f"{name}_grad"])
    with torch.inference_mode(), pytest.raises(InputError, match=r"forbids.*inference_mode"):
        gpt2_bridge.run_with_cache(ids, **kwargs)
    assert no_hooks(gpt2_bridge)


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


# -- specs are data (issue 11) ------------------------------------------------------------


def _gpt2_data(**update: Any) -> dict[str, Any]:
    data: dict[str, Any] = gpt2_spec().model_dump(mode="json", exclude_defaults=True)
    data.update(update)
    return data


def _nested(depth: int) -> dict[str, Any]:
    """The gpt2 spec with a component whose submodules nest `depth` levels deep."""
    data = _gpt2_data()
    leaf: dict[str, Any] = {"kind": "module", "path": "."}
    for _ in range(depth):
        leaf = {"kind": "module", "path": ".", "submodules": {"inner": leaf}}
    data["components"]["deep"] = leaf
    return data


def _write_json(path: Path, data: dict[str, Any]) -> Path:
    import json

    path.write_text(json.dumps(data))
    return path


def _write_toml(path: Path, data: dict[str, Any]) -> Path:
    import tomli_w

    path.write_text(tomli_w.dumps(data))
    return path


def _validate(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``transformer-bridge spec validate PATH``: (exit code, the error line)."""
    from bridge_core.cli import main

    code = main(["spec", "validate", str(path)])
    return code, capsys.readouterr().err.strip()


MALFORMED_SPECS: dict[str, tuple[Any, str]] = {
    # name: (writer(tmp_path) -> path, what the SpecError says after the file or spec name)
    "nested too deep (JSON)": (
        lambda d: d.joinpath("deep.json").write_text('{"name": ' + "[" * 5000 + "]" * 5000 + "}"),
        r"deep\.json, key 'name' \(line 1, column \d+\): nested deeper than 64 levels",
    ),
    "nested too deep (TOML)": (
        lambda d: d.joinpath("deep.toml").write_text("name = " + "[" * 5000 + "]" * 5000),
        r"deep\.toml, key 'name' \(line 1, column \d+\): nested deeper than 64 levels",
    ),
    "submodules nested too deep": (
        lambda d: _write_json(d / "deep.json", _nested(70)),
        r"deep\.json(, key 'inner' \(line 1, column \d+\))?: nested deeper than 64 levels",
    ),
    "not UTF-8": (
        lambda d: d.joinpath("latin1.toml").write_bytes(b'name = "caf\xe9"\n'),
        r"latin1\.toml, key 'name' \(line 1, column 12\): byte 0xe9 is not UTF-8",
    ),
    "duplicate JSON key": (
        lambda d: d.joinpath("dup.json").write_text(
            '{"name": "a", "architectures": [], "name": "b", "components": {}}'
        ),
        r"dup\.json, key 'name': given twice in one JSON object",
    ),
    "component named like a hook point": (
        lambda d: _write_toml(
            d / "hook.toml",
            _gpt2_data(
                components={
                    **_gpt2_data()["components"],
                    "hook_embed": {"kind": "embedding", "path": "x"},
                }
            ),
        ),
        r"components: .*component names \['hook_embed'\] are not accepted",
    ),
    "component named like a kind's attribute": (
        lambda d: _write_toml(
            d / "attr.toml",
            _gpt2_data(
                components={
                    **_gpt2_data()["components"],
                    "ln_final": {
                        "kind": "normalization",
                        "path": "transformer.ln_f",
                        "submodules": {"forward": {"kind": "module", "path": "."}},
                    },
                }
            ),
        ),
        r"components\.ln_final\.submodules\.forward: component name 'forward' is taken by an "
        r"attribute of NormalizationBridge",
    ),
    "component named like a bridge attribute": (
        lambda d: _write_toml(
            d / "cfg.toml",
            _gpt2_data(
                components={
                    **_gpt2_data()["components"],
                    "cfg": {"kind": "module", "path": "lm_head"},
                }
            ),
        ),
        r"components\.cfg: component name 'cfg' is taken by an attribute of TransformerBridge",
    ),
    "an alias defined twice once templates expand": (
        lambda d: _write_toml(
            d / "twice.toml",
            _gpt2_data(
                hook_aliases={
                    "blocks.{i}.hook_stream": "blocks.{i}.hook_out",
                    "blocks.1.hook_stream": "blocks.1.hook_in",
                }
            ),
        ),
        r"hook_aliases\.blocks\.1\.hook_stream: defines the same alias as "
        r"hook_aliases\.blocks\.\{i\}\.hook_stream",
    ),
    "a placeholder other than {i}": (
        lambda d: _write_toml(
            d / "j.toml", _gpt2_data(hook_aliases={"blocks.{j}.hook_stream": "blocks.{j}.hook_out"})
        ),
        r"hook_aliases: .*\{j\} is no placeholder",
    ),
    "an alias template with a fixed target": (
        lambda d: _write_toml(
            d / "fixed.toml",
            _gpt2_data(hook_aliases={"blocks.{i}.hook_final": "ln_final.hook_out"}),
        ),
        r"hook_aliases: .*'blocks\.\{i\}\.hook_final' = 'ln_final\.hook_out': a template has "
        r"'\{i\}' in both the alias and the target",
    ),
    "aliases in a circle": (
        lambda d: _write_toml(
            d / "circle.toml",
            _gpt2_data(hook_aliases={"stream_a": "stream_b", "stream_b": "stream_a"}),
        ),
        r"hook_aliases\.stream_a: aliases point at each other in a circle "
        r"\(stream_a -> stream_b -> stream_a\)",
    ),
    "a fixed config value that does not validate": (
        lambda d: _write_toml(
            d / "fixed.toml",
            _gpt2_data(config={**_gpt2_data()["config"], "fixed": {"normalization_type": "BN"}}),
        ),
        r"normalization_type: Input should be 'LN' or 'RMS' \(got 'BN'\)",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_SPECS))
def test_a_malformed_spec_is_a_spec_error_from_wrap_and_from_spec_validate(
    case: str,
    tmp_path: Path,
    text_models: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Issue 11: nested, non-UTF-8, colliding, template and duplicate-key specs raised bare
    Python errors (or passed `spec validate` and failed in `wrap`)."""
    write, message = MALFORMED_SPECS[case]
    write(tmp_path)
    (path,) = tmp_path.iterdir()
    model, _ = text_models["gpt2"]

    with pytest.raises(SpecError, match=message):
        TransformerBridge.wrap(model, adapter=path)
    code, line = _validate(path, capsys)
    assert code == 1 and re.search(message, line), line
    assert str(path) in line


def test_alias_resolution_does_not_depend_on_table_order(text_models: dict[str, Any]) -> None:
    """Issue 11: an alias pointing at an alias defined later in the table was 'no hook point'."""
    model, _ = text_models["gpt2"]
    chain = [
        ("stream_in", "first_stream"),
        ("first_stream", "blocks.0.hook_in"),
        ("blocks.{i}.mid", "blocks.{i}.stream"),
        ("blocks.{i}.stream", "blocks.{i}.ln2.hook_in"),
    ]
    resolved = []
    for order in (chain, chain[::-1]):
        bridge = TransformerBridge.wrap(model, adapter=gpt2_spec(hook_aliases=dict(order)))
        resolved.append(bridge.hook_aliases())
    assert resolved[0] == resolved[1]
    assert resolved[0]["stream_in"] == "blocks.0.hook_in"
    assert resolved[0]["blocks.1.mid"] == "blocks.1.ln2.hook_in"


def test_a_spec_dict_nested_too_deep_names_the_key_path() -> None:
    """A plugin's dict spec is checked without recursion, so no RecursionError anywhere."""
    registry = Registry(autoload=False)
    deep = {**_nested(200), "name": "deep", "architectures": ["DeepForCausalLM"]}
    plugin = SimpleNamespace(register_adapters=returning([deep]))
    with pytest.raises(PluginLoadError) as error:
        registry.register(plugin, name="deep")
    message = str(error.value)
    assert "plugin 'deep' hook register_adapters" in message
    assert "nests deeper than 64 levels at components.deep.submodules.inner" in message


def test_a_residual_helper_layer_out_of_range_names_the_range(
    gpt2_bridge: TransformerBridge, ids: torch.Tensor
) -> None:
    """Issue 11: accumulated_resid(layer=5) on a 2-layer model wrapped around to layer 2."""
    _, cache = gpt2_bridge.run_with_cache(ids)
    accepted = r"'blocks' has 2 layers\. Accepted: 0\.\.2 \(2: after the last layer\), -3\.\.-1"
    with pytest.raises(InputError, match=r"accumulated_resid\(layer=5\): " + accepted):
        cache.accumulated_resid(layer=5)
    with pytest.raises(InputError, match=r"decompose_resid\(layer=-4\): " + accepted):
        cache.decompose_resid(layer=-4)
    with pytest.raises(InputError, match=r"apply_ln_to_stack\(layer=3\): " + accepted):
        cache.apply_ln_to_stack(cache.accumulated_resid(), layer=3)
    with pytest.raises(InputError, match=r"stack_activation\(layer=7\): " + accepted):
        cache.stack_activation("resid_pre", layer=7)
    # in range, negative layers count from the end as in TransformerLens
    assert torch.equal(cache.accumulated_resid(layer=-1), cache.accumulated_resid())
    assert torch.equal(cache.accumulated_resid(layer=-2), cache.accumulated_resid(layer=1))


def test_cache_keys_of_the_wrong_form(gpt2_bridge: TransformerBridge, ids: torch.Tensor) -> None:
    """Issue 11: cache[0] raised AttributeError; ("resid_pre",) in cache raised."""
    _, cache = gpt2_bridge.run_with_cache(ids, names_filter="blocks.0.hook_resid_pre")
    wrong_form = r"cache keys are hook names or \(name, layer\) tuples; got int 0\. Accepted: "
    with pytest.raises(HookNameError, match=wrong_form + r"cache\['blocks\.0\.hook_resid_pre'\]"):
        cache[0]  # type: ignore[index]  # on purpose
    with pytest.raises(HookNameError, match=r"layer -3 is out of range for the 2 layers"):
        cache["resid_pre", -3]
    assert ("resid_pre",) not in cache  # no layer: not in the cache, no error
    assert ("resid_pre", 0) in cache and ("resid_pre", -2) in cache  # -2 of 2 is layer 0
    assert ("resid_pre", 1) not in cache
    assert 0 not in cache and ("resid_pre", 0, None, "blocks", "extra") not in cache
    assert torch.equal(cache["resid_pre", -2], cache["blocks.0.hook_resid_pre"])
