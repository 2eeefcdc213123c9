"""Models placed by accelerate (``boot(..., device_map=..., offload_folder=...)``).

On a CPU machine some layers are offloaded to CPU memory and some to disk (their weights are
"meta" until their forward); the bridge's outputs, cache and harvest must equal HF's model
loaded with the same device_map, and the model must stay where accelerate put it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

from bridge_adapters import tiny
from bridge_core import BootError, TransformerBridge
from bridge_core.harvest import harvest

DEVICE_MAP = {
    "model.embed_tokens": "disk",  # the first parameter is offloaded: inputs still find a device
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "lm_head": "cpu",
}


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tokenizer = tiny.tiny_llama()
    return tiny.save_pretrained(model, tokenizer, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def offloaded(saved_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> TransformerBridge:
    folder = tmp_path_factory.mktemp("offload")
    return TransformerBridge.boot(saved_llama, device_map=DEVICE_MAP, offload_folder=folder)


def meta_parameters(model: Any) -> list[str]:
    return [n for n, p in model.named_parameters() if p.device.type == "meta"]


def test_outputs_and_cache_equal_hf_with_the_same_device_map(
    saved_llama: Path, offloaded: TransformerBridge, tmp_path: Path
) -> None:
    hf = LlamaForCausalLM.from_pretrained(
        saved_llama, device_map=DEVICE_MAP, offload_folder=tmp_path
    )
    ids = torch.randint(3, 500, (2, 11), generator=torch.Generator().manual_seed(1))
    seen: list[torch.Tensor] = []
    mlp = hf.model.layers[1].mlp
    handle = mlp.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        expected = hf(input_ids=ids, output_hidden_states=True)
        handle.remove()
        offloaded_before = meta_parameters(offloaded.original_model)
        logits, cache = offloaded.run_with_cache(input_ids=ids, device="cpu")
    assert torch.equal(logits, expected.logits)
    for i in range(2):
        assert torch.equal(cache["resid_pre", i], expected.hidden_states[i])
    assert torch.equal(cache["blocks.1.hook_mlp_out"], seen[0])
    with torch.no_grad():
        _, where_they_ran = offloaded.run_with_cache(input_ids=ids)
    # hooks see each layer's activations where it executes (here the CPU), never on "meta"
    assert {t.device.type for t in where_they_ran.values()} == {"cpu"}
    # the cache was gathered without moving the model: offloaded weights are still offloaded
    assert offloaded_before and meta_parameters(offloaded.original_model) == offloaded_before


def test_text_input_goes_to_the_execution_device(
    offloaded: TransformerBridge, text_models: dict[str, Any]
) -> None:
    model, tokenizer = text_models["llama"]
    assert offloaded.device == torch.device("cpu")  # not "meta", where the embedding sits
    plain = TransformerBridge.wrap(model, tokenizer=tokenizer)
    with torch.no_grad():
        assert torch.equal(offloaded("The quick brown fox"), plain("The quick brown fox"))


def test_harvest_of_an_offloaded_model_equals_the_plain_model(
    offloaded: TransformerBridge, text_models: dict[str, Any], tmp_path: Path
) -> None:
    model, tokenizer = text_models["llama"]
    rows = [{"text": t} for t in ("Hello world!", "The cat sat at the window.", "One, two.")]
    hooks = ["blocks.1.hook_resid_post", "blocks.1.attn.hook_z"]
    a = harvest(offloaded, rows, hooks, tmp_path / "a", batch_size=2, progress=False)
    plain = TransformerBridge.wrap(model, tokenizer=tokenizer)
    b = harvest(plain, rows, hooks, tmp_path / "b", batch_size=2, progress=False)
    for hook in hooks:
        assert torch.equal(a[hook].tensor(), b[hook].tensor())


def test_device_and_device_map_together_are_refused(saved_llama: Path) -> None:
    with pytest.raises(BootError, match="pass one"):
        TransformerBridge.boot(saved_llama, device="cpu", device_map={"": "cpu"})
