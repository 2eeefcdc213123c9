"""TransformerBridge.boot: local directories, hub ids from an offline cache, adapter choice."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import transformers
import transformers.models.gpt2.modeling_gpt2 as modeling_gpt2
from transformers import (
    AttentionInterface,
    AutoTokenizer,
    GPT2LMHeadModel,
    PreTrainedTokenizerBase,
)
from transformers.masking_utils import AttentionMaskInterface

from bridge_adapters import tiny
from bridge_core import (
    AdapterNotFoundError,
    BootError,
    HookPoint,
    InputError,
    TransformerBridge,
    get_registry,
)
from bridge_core import loading as loading_module

TEXT = "The quick brown fox jumps over the lazy dog."


def hf_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits  # type: ignore[no-any-return]


def bridge_logits(bridge: TransformerBridge, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return bridge(ids)  # type: ignore[no-any-return]


# -- local directories ---------------------------------------------------------------------


def test_boot_local_dir_equals_hf_from_pretrained(saved_gpt2: Path, ids: torch.Tensor) -> None:
    bridge = TransformerBridge.boot(saved_gpt2)
    plain = GPT2LMHeadModel.from_pretrained(saved_gpt2)

    assert type(bridge.original_model) is GPT2LMHeadModel
    assert bridge.adapter.name == "gpt2"
    assert bridge.cfg.model_name == str(saved_gpt2)
    assert bridge.cfg.n_layers == plain.config.n_layer
    assert torch.equal(bridge_logits(bridge, ids), hf_logits(plain, ids))


def test_boot_accepts_a_str_path_and_a_device(saved_gpt2: Path, ids: torch.Tensor) -> None:
    bridge = TransformerBridge.boot(str(saved_gpt2), device="cpu")

    assert bridge.device == torch.device("cpu")
    plain = GPT2LMHeadModel.from_pretrained(saved_gpt2)
    assert torch.equal(bridge_logits(bridge, ids), hf_logits(plain, ids))


def test_tokenizer_is_loaded_lazily_and_works(
    saved_gpt2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[str] = []
    load = loading_module.load_tokenizer_and_processor

    def counting_load(source: str) -> tuple[Any, Any]:
        loads.append(source)
        return load(source)

    monkeypatch.setattr(loading_module, "load_tokenizer_and_processor", counting_load)

    bridge = TransformerBridge.boot(saved_gpt2)
    assert loads == [], "boot loaded the tokenizer before it was needed"

    logits = bridge(TEXT)

    assert loads == [str(saved_gpt2)]
    assert isinstance(bridge.tokenizer, PreTrainedTokenizerBase)
    hf_tokenizer = AutoTokenizer.from_pretrained(saved_gpt2)
    ids = hf_tokenizer(hf_tokenizer.bos_token + TEXT, return_tensors="pt")["input_ids"]
    assert torch.equal(bridge.to_tokens(TEXT), ids)  # BOS by default, as TransformerLens
    assert torch.equal(logits, hf_logits(GPT2LMHeadModel.from_pretrained(saved_gpt2), ids))
    assert bridge.to_string(ids[0, 1:]) == TEXT
    bridge.tokenizer  # noqa: B018  (a second use does not load again)
    assert len(loads) == 1


def test_boot_of_a_dir_without_tokenizer_works_on_ids(
    saved_gpt2: Path, tmp_path: Path, ids: torch.Tensor
) -> None:
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (saved_gpt2 / name).exists():
            shutil.copy(saved_gpt2 / name, weights_only / name)

    bridge = TransformerBridge.boot(weights_only)

    plain = GPT2LMHeadModel.from_pretrained(saved_gpt2)
    assert torch.equal(bridge_logits(bridge, ids), hf_logits(plain, ids))
    assert bridge.tokenizer is None, (
        f"a checkpoint without tokenizer files got a tokenizer attached: {bridge.tokenizer!r:.120}"
    )
    with pytest.raises(InputError, match="no tokenizer"):
        bridge(TEXT)


def test_a_processor_that_needs_a_missing_library_leaves_the_tokenizer(
    saved_gpt2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # as Qwen2-VL's processor without torchvision: transformers raises ImportError
    def needs_torchvision(*args: Any, **kwargs: Any) -> Any:
        raise ImportError("Qwen2VLVideoProcessor requires the Torchvision library\nmore text")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", needs_torchvision)
    bridge = TransformerBridge.boot(saved_gpt2)
    with pytest.warns(UserWarning, match=r"requires the Torchvision library\); the bridge has"):
        assert isinstance(bridge.tokenizer, PreTrainedTokenizerBase)
    assert bridge.processor is None
    assert bridge.to_tokens(TEXT).shape[0] == 1


# -- choosing the adapter ------------------------------------------------------------------


@pytest.mark.parametrize("how", ["name", "spec", "toml path", "toml str", "json path"])
def test_adapter_given_as_name_spec_or_file(
    saved_gpt2: Path, tmp_path: Path, ids: torch.Tensor, how: str
) -> None:
    spec = get_registry().adapter("gpt2").model_copy(update={"name": "gpt2-from-file"})
    spec = spec.model_copy(
        update={"hook_aliases": {**spec.hook_aliases, "hook_tokens": "embed.hook_in"}}
    )
    toml_file = tmp_path / "gpt2.toml"
    toml_file.write_text(spec.to_toml())
    json_file = tmp_path / "gpt2.json"
    json_file.write_text(spec.to_json())
    adapter: Any = {
        "name": "gpt2",
        "spec": spec,
        "toml path": toml_file,
        "toml str": str(toml_file),
        "json path": json_file,
    }[how]

    bridge = TransformerBridge.boot(saved_gpt2, adapter=adapter)

    expected = "gpt2" if how == "name" else "gpt2-from-file"
    assert bridge.adapter.name == expected
    assert bridge.cfg.adapter == expected
    plain = GPT2LMHeadModel.from_pretrained(saved_gpt2)
    assert torch.equal(bridge_logits(bridge, ids), hf_logits(plain, ids))
    if how != "name":
        assert bridge.adapter == spec
        _, cache = bridge.run_with_cache(ids, names_filter="hook_tokens")
        assert torch.equal(cache["hook_tokens"], ids)


def test_adapter_spec_file_that_does_not_exist(saved_gpt2: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"

    with pytest.raises(ValueError, match=r"nope\.toml"):
        TransformerBridge.boot(saved_gpt2, adapter=missing)


def test_unclaimed_architecture_in_a_saved_config(saved_gpt2: Path, tmp_path: Path) -> None:
    relabelled = Path(shutil.copytree(saved_gpt2, tmp_path / "classifier"))
    config = json.loads((relabelled / "config.json").read_text())
    config["architectures"] = ["GPT2ForSequenceClassification"]
    (relabelled / "config.json").write_text(json.dumps(config))

    with pytest.raises(AdapterNotFoundError) as error:
        TransformerBridge.boot(relabelled)

    message = str(error.value)
    assert "'GPT2ForSequenceClassification'" in message
    assert "adapter='gpt2'" in message
    assert "Known adapters:" in message


# -- hub ids from an offline cache (fresh processes: huggingface_hub reads HF_HOME at import) --


BOOT_HUB_ID = textwrap.dedent(
    """
    import sys, torch
    from bridge_core import TransformerBridge
    repo_id, ids_path, out_path = sys.argv[1:]
    bridge = TransformerBridge.boot(repo_id)
    with torch.no_grad():
        logits = bridge(torch.load(ids_path))
    torch.save({"logits": logits, "tokens": bridge.to_str_tokens("Hello world")}, out_path)
    print("booted", bridge.adapter.name, bridge.cfg.model_name)
    """
)

BOOT_MISSING_HUB_ID = textwrap.dedent(
    """
    import sys
    from bridge_core import BootError, TransformerBridge
    try:
        TransformerBridge.boot(sys.argv[1])
    except BootError as error:
        print("BootError:", error)
    else:
        sys.exit("boot did not raise BootError")
    """
)


@pytest.fixture(scope="module")
def offline_hub(tmp_path_factory: pytest.TempPathFactory, saved_gpt2: Path) -> Path:
    """An HF_HOME whose hub cache holds the tiny GPT-2 as ``tiny-org/tiny-gpt2``."""
    hf_home = tmp_path_factory.mktemp("hf-home")
    tiny.save_as_hub_cache(saved_gpt2, "tiny-org/tiny-gpt2", hf_home)
    return hf_home


def run_offline(script: str, hf_home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env,
        cwd=hf_home,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_boot_hub_id_from_offline_cache(
    offline_hub: Path, saved_gpt2: Path, tmp_path: Path, ids: torch.Tensor
) -> None:
    ids_path, out_path = tmp_path / "ids.pt", tmp_path / "out.pt"
    torch.save(ids, ids_path)

    result = run_offline(
        BOOT_HUB_ID, offline_hub, "tiny-org/tiny-gpt2", str(ids_path), str(out_path)
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert "booted gpt2 tiny-org/tiny-gpt2" in result.stdout
    got = torch.load(out_path)
    plain = GPT2LMHeadModel.from_pretrained(saved_gpt2)
    assert torch.equal(got["logits"], hf_logits(plain, ids))
    tokenizer = AutoTokenizer.from_pretrained(saved_gpt2)
    with_bos = tokenizer(tokenizer.bos_token + "Hello world")["input_ids"]
    expected = [tokenizer.decode([t]) for t in with_bos]
    assert got["tokens"] == expected


def test_boot_hub_id_missing_from_offline_cache(offline_hub: Path) -> None:
    result = run_offline(BOOT_MISSING_HUB_ID, offline_hub, "tiny-org/not-downloaded")

    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    message = result.stdout
    assert "BootError:" in message
    assert "'tiny-org/not-downloaded'" in message
    assert "HF_HUB_OFFLINE" in message and "cache" in message


def test_boot_loads_the_tokenizer_of_the_revision_and_cache_dir_it_is_given(
    tmp_path: Path, text_models: dict[str, Any]
) -> None:
    """Issue 11: a pinned revision tokenized with main's tokenizer, and cache_dir= left the
    bridge without a tokenizer. Two revisions whose tokenizers differ (main adds a BOS)."""
    model, _ = text_models["gpt2"]
    vocab = model.config.vocab_size
    hub = tmp_path / "hf-home"
    pinned, main = "a" * 40, "b" * 40
    for sha, add_bos in ((pinned, False), (main, True)):  # the last one becomes refs/main
        saved = tiny.save_pretrained(
            model, tiny.build_tokenizer(vocab, add_bos=add_bos), tmp_path / sha
        )
        tiny.save_as_hub_cache(saved, "tiny-org/two-revisions", hub, revision_sha=sha)
    where = {"cache_dir": hub / "hub", "local_files_only": True}  # nothing from the network

    at_pin = TransformerBridge.boot("tiny-org/two-revisions", revision=pinned, **where)
    at_main = TransformerBridge.boot("tiny-org/two-revisions", **where)

    assert at_pin.tokenizer is not None and at_main.tokenizer is not None
    bos = at_main.tokenizer.bos_token_id
    # the tokenizers themselves (to_tokens prepends a BOS by default with either)
    from_pin, from_main = (b.tokenizer("Hello")["input_ids"] for b in (at_pin, at_main))
    assert from_main[0] == bos and from_pin[0] != bos
    assert from_main[1:] == from_pin


# -- bad paths -----------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["Path", "absolute str", "relative str", "home str"])
def test_boot_of_a_path_that_does_not_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    monkeypatch.chdir(tmp_path)
    missing: str | Path = {
        "Path": tmp_path / "no-such-model",
        "absolute str": str(tmp_path / "no-such-model"),
        "relative str": "./checkpoints/no-such-model",
        "home str": "~/no-such-model-for-transformer-bridge",
    }[form]

    with pytest.raises(BootError) as error:
        TransformerBridge.boot(missing)

    assert str(missing) in str(error.value)
    assert "does not exist" in str(error.value)
    assert isinstance(error.value, OSError)


def test_boot_of_a_file_is_an_error(saved_gpt2: Path) -> None:
    with pytest.raises(BootError, match=r"config\.json.*is a file"):
        TransformerBridge.boot(saved_gpt2 / "config.json")


def test_boot_of_a_directory_that_holds_no_model(tmp_path: Path) -> None:
    empty = tmp_path / "not-a-checkpoint"
    empty.mkdir()

    with pytest.raises(BootError) as error:
        TransformerBridge.boot(empty)

    assert str(empty) in str(error.value)
    assert "config.json" in str(error.value)


def test_boot_of_a_directory_with_a_broken_config(saved_gpt2: Path, tmp_path: Path) -> None:
    broken = Path(shutil.copytree(saved_gpt2, tmp_path / "broken-config"))
    (broken / "config.json").write_text('{"model_type": "gpt2",')

    with pytest.raises(BootError) as error:
        TransformerBridge.boot(broken)

    message = str(error.value)
    assert str(broken / "config.json") in message
    assert "not a local directory" not in message, f"misleading for a local directory: {message}"


# -- numerics and globals ------------------------------------------------------------------


def test_dtype_float64(saved_gpt2: Path, ids: torch.Tensor) -> None:
    bridge = TransformerBridge.boot(saved_gpt2, dtype=torch.float64)
    plain64 = GPT2LMHeadModel.from_pretrained(saved_gpt2, dtype=torch.float64)
    plain32 = GPT2LMHeadModel.from_pretrained(saved_gpt2)

    logits, cache = bridge.run_with_cache(
        ids, names_filter=["hook_embed", "blocks.1.hook_resid_post"]
    )

    assert bridge.dtype == torch.float64
    assert logits.dtype == torch.float64
    assert cache["blocks.1.hook_resid_post"].dtype == torch.float64
    assert torch.equal(logits, hf_logits(plain64, ids))
    assert torch.allclose(logits.float(), hf_logits(plain32, ids), atol=1e-4)


def test_attn_implementation_passes_through(saved_gpt2: Path, ids: torch.Tensor) -> None:
    bridge = TransformerBridge.boot(saved_gpt2, attn_implementation="eager")
    plain = GPT2LMHeadModel.from_pretrained(saved_gpt2, attn_implementation="eager")

    assert bridge.original_model.config._attn_implementation == "eager"
    assert torch.equal(bridge_logits(bridge, ids), hf_logits(plain, ids))


def module_snapshot(module: ModuleType) -> dict[str, Any]:
    """Every global of a module and every attribute of its classes, by identity."""
    snapshot: dict[str, Any] = {}
    for name, value in vars(module).items():
        snapshot[name] = value
        if isinstance(value, type):
            for attribute, member in vars(value).items():
                snapshot[f"{name}.{attribute}"] = member
    return snapshot


def test_boot_never_changes_transformers_globals(saved_gpt2: Path, ids: torch.Tensor) -> None:
    from transformers.modeling_utils import PreTrainedModel

    attention = dict(AttentionInterface._global_mapping)
    masks = dict(AttentionMaskInterface._global_mapping)
    modeling = module_snapshot(modeling_gpt2)
    pretrained = dict(vars(PreTrainedModel))
    plain = GPT2LMHeadModel.from_pretrained(saved_gpt2)

    bridge = TransformerBridge.boot(saved_gpt2)
    config = bridge.original_model.config
    assert config._attn_implementation == plain.config._attn_implementation

    def double(tensor: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        return tensor * 2

    with torch.no_grad():
        bridge(ids)
        bridge.run_with_cache(ids, names_filter=lambda n: "pattern" not in n and "scores" not in n)
        bridge.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_post", double)])

    assert dict(AttentionInterface._global_mapping) == attention
    assert dict(AttentionMaskInterface._global_mapping) == masks
    assert module_snapshot(modeling_gpt2) == modeling
    assert dict(vars(PreTrainedModel)) == pretrained
    assert config._attn_implementation == plain.config._attn_implementation

    # pattern hooks switch only this model's config, and only while they are attached
    with torch.no_grad():
        bridge.run_with_cache(ids, names_filter="blocks.0.attn.hook_pattern")
    assert config._attn_implementation == plain.config._attn_implementation
    assert all(AttentionInterface._global_mapping[k] is v for k, v in attention.items())
    assert all(AttentionMaskInterface._global_mapping[k] is v for k, v in masks.items())
    assert module_snapshot(modeling_gpt2) == modeling
    assert torch.equal(bridge_logits(bridge, ids), hf_logits(plain, ids))


def test_wrap_of_a_booted_model_is_the_same_bridge(saved_gpt2: Path, ids: torch.Tensor) -> None:
    booted = TransformerBridge.boot(saved_gpt2)

    wrapped = TransformerBridge.wrap(booted.original_model, tokenizer=booted.tokenizer)

    assert wrapped.adapter == booted.adapter
    assert wrapped.hook_names() == booted.hook_names()
    assert torch.equal(bridge_logits(wrapped, ids), bridge_logits(booted, ids))
