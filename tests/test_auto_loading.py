"""Checkpoints whose architecture is no transformers class load through the task's Auto class."""

from __future__ import annotations

import json
import shutil
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers.dynamic_module_utils
from transformers import LlamaForCausalLM

from bridge_adapters import tiny
from bridge_adapters.families import tiny_bert_model, tiny_t5
from bridge_core import (
    AdapterNotFoundError,
    AdapterSpec,
    BootError,
    TransformerBridge,
    get_registry,
    hookimpl,
)
from bridge_core.loading import task_for


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tokenizer = tiny.tiny_llama()
    return tiny.save_pretrained(model, tokenizer, tmp_path_factory.mktemp("llama"))


def _relabelled(saved: Path, target: Path, architecture: str, **extra: object) -> Path:
    """A copy of a saved model whose config.json names `architecture` (and `extra` keys)."""
    copy = Path(shutil.copytree(saved, target))
    config = json.loads((copy / "config.json").read_text())
    config.update(architectures=[architecture], **extra)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def _logits(bridge: TransformerBridge, saved: Path, ids: torch.Tensor) -> None:
    plain = LlamaForCausalLM.from_pretrained(saved)
    with torch.no_grad():
        assert torch.equal(bridge(ids), plain(ids).logits)


def test_a_renamed_architecture_loads_through_the_adapters_auto_class(
    saved_llama: Path, tmp_path: Path, ids: torch.Tensor
) -> None:
    renamed = _relabelled(saved_llama, tmp_path / "renamed", "MyLabLlamaForCausalLM")
    with pytest.raises(AdapterNotFoundError, match="adapter='llama'"):
        TransformerBridge.boot(renamed)  # no adapter claims the name: the error says which fits

    bridge = TransformerBridge.boot(renamed, adapter="llama")

    assert type(bridge.original_model) is LlamaForCausalLM  # AutoModelForCausalLM's choice
    assert bridge.cfg.architecture == "LlamaForCausalLM"
    _logits(bridge, saved_llama, ids)


def _plugin(*specs: AdapterSpec) -> SimpleNamespace:
    @hookimpl
    def register_adapters() -> list[AdapterSpec]:
        return list(specs)

    return SimpleNamespace(register_adapters=register_adapters)


@pytest.mark.usefixtures("fresh_registry")
def test_an_adapter_claiming_a_non_transformers_architecture_boots_it(
    saved_llama: Path, tmp_path: Path, ids: torch.Tensor
) -> None:
    renamed = _relabelled(saved_llama, tmp_path / "lab", "LabDecoder")  # its name tells nothing
    registry = get_registry()
    claim = registry.adapter("llama").model_copy(
        update={"name": "lab", "architectures": ["LabDecoder"]}
    )
    # the task comes from the spec's architectures that transformers knows: none here
    registry.register(_plugin(claim), "lab")
    with pytest.raises(BootError, match=r"cannot tell which HF class.*'LabDecoder'.*task"):
        TransformerBridge.boot(renamed)
    registry.unregister("lab")

    registry.register(_plugin(claim.model_copy(update={"task": "causal-lm"})), "lab")
    bridge = TransformerBridge.boot(renamed)

    assert bridge.adapter.name == "lab"
    assert type(bridge.original_model) is LlamaForCausalLM
    _logits(bridge, saved_llama, ids)


REMOTE_CODE = textwrap.dedent(
    """
    from transformers import LlamaForCausalLM


    class CustomLlamaForCausalLM(LlamaForCausalLM):
        remote_code_ran = True
    """
)


@pytest.fixture
def modules_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """transformers copies remote code into HF_MODULES_CACHE: a temporary one here."""
    cache = tmp_path / "hf-modules"
    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(cache))
    yield cache


def test_remote_code_runs_only_when_the_user_trusts_it(
    saved_llama: Path, tmp_path: Path, modules_cache: Path, ids: torch.Tensor
) -> None:
    auto_map = {"AutoModelForCausalLM": "modeling_custom.CustomLlamaForCausalLM"}
    remote = _relabelled(
        saved_llama, tmp_path / "remote", "CustomLlamaForCausalLM", auto_map=auto_map
    )
    (remote / "modeling_custom.py").write_text(REMOTE_CODE)

    untrusted = TransformerBridge.boot(remote, adapter="llama")
    assert type(untrusted.original_model) is LlamaForCausalLM  # transformers' own class
    assert not modules_cache.exists()  # the file was never copied, let alone imported

    trusted = TransformerBridge.boot(remote, adapter="llama", trust_remote_code=True)
    assert type(trusted.original_model).__name__ == "CustomLlamaForCausalLM"
    assert getattr(trusted.original_model, "remote_code_ran", False)
    _logits(trusted, saved_llama, ids)


@pytest.mark.parametrize(
    ("build", "architecture", "loaded"),
    [
        (tiny_bert_model, "SentenceEncoderModel", "BertModel"),  # "...Model": base
        (tiny_t5, "MyT5", "T5ForConditionalGeneration"),  # the spec's task: seq2seq-lm
    ],
)
def test_the_task_follows_the_name_or_the_adapters_architectures(
    build: object, architecture: str, loaded: str, tmp_path: Path
) -> None:
    assert callable(build)
    model, tokenizer = build()
    saved = tiny.save_pretrained(model, tokenizer, tmp_path / "saved")
    renamed = _relabelled(saved, tmp_path / "renamed", architecture)
    adapter = "bert" if loaded == "BertModel" else "t5"

    bridge = TransformerBridge.boot(renamed, adapter=adapter)

    assert type(bridge.original_model).__name__ == loaded
    assert task_for(bridge.adapter, architecture) == ("base" if adapter == "bert" else "seq2seq-lm")
