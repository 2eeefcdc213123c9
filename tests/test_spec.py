"""Adapter specs: round trips, and errors that name the file, key, path and model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bridge_core import AdapterSpec, SpecError, TransformerBridge, get_registry


@pytest.fixture
def gpt2_spec() -> AdapterSpec:
    return get_registry().adapter("gpt2")


@pytest.mark.parametrize("fmt", ["toml", "json"])
def test_round_trip(gpt2_spec: AdapterSpec, tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"spec.{fmt}"
    path.write_text(gpt2_spec.to_toml() if fmt == "toml" else gpt2_spec.to_json())
    assert AdapterSpec.from_file(path) == gpt2_spec


def test_spec_from_file_boots_the_same_bridge(
    gpt2_spec: AdapterSpec, text_models: dict[str, Any], tmp_path: Path
) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(gpt2_spec.model_copy(update={"name": "mine"}).to_toml())
    model, _ = text_models["gpt2"]
    bridge = TransformerBridge.wrap(model, adapter=str(path))
    assert bridge.adapter.name == "mine" and len(bridge.hook_dict) == 56  # 2 opt-in


def test_invalid_toml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('name = "x"\narchitectures = [A]\n')
    with pytest.raises(SpecError, match=r"broken\.toml is not valid TOML.*line 2"):
        AdapterSpec.from_file(path)


def test_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "name": "x",\n  "architectures": [}\n')
    with pytest.raises(SpecError, match=r"broken\.json is not valid JSON.*line 3"):
        AdapterSpec.from_file(path)


def test_invalid_field_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\narchitectures = "A"\n[components.embed]\nkind = "embedding"\n')
    with pytest.raises(
        SpecError, match=r"bad\.toml(.|\n)*architectures(.|\n)*components\.embed\.path"
    ):
        AdapterSpec.from_file(path)


def _broken(spec: AdapterSpec, **changes: Any) -> AdapterSpec:
    data = spec.model_dump()
    block = data["components"]["blocks"]["submodules"]
    for key, value in changes.items():
        block["attn"][key] = value
    return AdapterSpec.model_validate(data)


def test_unknown_kind_names_spec_key_and_kinds(
    gpt2_spec: AdapterSpec, text_models: dict[str, Any]
) -> None:
    model, _ = text_models["gpt2"]
    with pytest.raises(
        SpecError,
        match=r"'gpt2', components\.blocks\.submodules\.attn\.kind: .*'atention'.*"
        r"Did you mean 'attention'.*\(model GPT2LMHeadModel\)",
    ):
        TransformerBridge.wrap(model, adapter=_broken(gpt2_spec, kind="atention"))


def test_missing_path_names_path_and_model_class(
    gpt2_spec: AdapterSpec, text_models: dict[str, Any]
) -> None:
    model, _ = text_models["gpt2"]
    hooks_before = sum(len(m._forward_hooks) for m in model.modules())
    with pytest.raises(SpecError, match=r"path 'atn' does not exist in GPT2Block.*'attn'"):
        TransformerBridge.wrap(model, adapter=_broken(gpt2_spec, path="atn"))
    with pytest.raises(SpecError, match=r"options\.qkv.*'c_atn' does not exist in GPT2Attention"):
        TransformerBridge.wrap(
            model, adapter=_broken(gpt2_spec, options={"qkv": "c_atn", "o": "c_proj"})
        )
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks_before


def test_config_that_does_not_validate_quotes_values(
    gpt2_spec: AdapterSpec, text_models: dict[str, Any]
) -> None:
    model, _ = text_models["gpt2"]
    data = gpt2_spec.model_dump()
    data["config"]["fixed"]["n_heads"] = 5
    with pytest.raises(
        SpecError,
        match=r"divisible by n_heads when d_head is not given \(got d_model=64, n_heads=5\)",
    ):
        TransformerBridge.wrap(model, adapter=AdapterSpec.model_validate(data))


def test_unknown_config_field_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown TransformerBridgeConfig field.*d_modle"):
        AdapterSpec.model_validate(
            {
                "name": "x",
                "architectures": ["A"],
                "components": {},
                "config": {"from_hf": {"d_modle": "n_embd"}},
            }
        )


def test_candidate_paths_take_the_first_that_exists(
    gpt2_spec: AdapterSpec, text_models: dict[str, Any]
) -> None:
    model, _ = text_models["gpt2"]
    data = gpt2_spec.model_dump()
    data["components"]["embed"]["path"] = ["model.embed_tokens", "transformer.wte"]
    bridge = TransformerBridge.wrap(model, adapter=AdapterSpec.model_validate(data))
    assert bridge.component("embed").original_component is model.transformer.wte
