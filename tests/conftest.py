"""Shared fixtures: tiny random-weight models built locally, and their bridges."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GPT2LMHeadModel

from bridge_adapters import tiny
from bridge_core import TransformerBridge
from bridge_core.registry import reset_registry

# Tiny models spend their time in thread hand-offs, not arithmetic: one thread is faster, and
# on a shared 2-core machine much faster. Every comparison runs in this one process (the
# offline-boot subprocess takes the parent's thread count), so bitwise checks hold.
torch.set_num_threads(1)

BUILDERS: dict[str, Callable[..., tuple[Any, Any]]] = {
    "gpt2": tiny.tiny_gpt2,
    "llama": tiny.tiny_llama,
    "mistral": tiny.tiny_mistral,
    "qwen2": tiny.tiny_qwen2,
}


@pytest.fixture(scope="session")
def text_models() -> dict[str, tuple[Any, Any]]:
    """One tiny model and tokenizer per built-in text architecture."""
    return {name: build() for name, build in BUILDERS.items()}


@pytest.fixture(params=sorted(BUILDERS))
def arch(request: pytest.FixtureRequest) -> str:
    """Each built-in text architecture in turn."""
    return str(request.param)


@pytest.fixture
def model_and_bridge(
    text_models: dict[str, tuple[Any, Any]], arch: str
) -> Iterator[tuple[Any, TransformerBridge]]:
    """(HF model, its bridge) for each architecture; checks no hook is left behind."""
    model, tokenizer = text_models[arch]
    bridge = TransformerBridge.wrap(model, tokenizer=tokenizer)
    yield model, bridge
    assert not any(p.has_hooks() for p in bridge.hook_dict.values()), "a hook was left behind"


@pytest.fixture(scope="session")
def gpt2_bridge(text_models: dict[str, tuple[Any, Any]]) -> TransformerBridge:
    model, tokenizer = text_models["gpt2"]
    return TransformerBridge.wrap(model, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def llama_bridge(text_models: dict[str, tuple[Any, Any]]) -> TransformerBridge:
    model, tokenizer = text_models["llama"]
    return TransformerBridge.wrap(model, tokenizer=tokenizer)


@pytest.fixture
def ids() -> torch.Tensor:
    """A batch of two random token sequences."""
    return torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def saved_gpt2(tmp_path_factory: pytest.TempPathFactory, text_models: dict[str, Any]) -> Path:
    """The tiny GPT-2 and tokenizer saved with save_pretrained."""
    model, tokenizer = text_models["gpt2"]
    return Path(tiny.save_pretrained(model, tokenizer, tmp_path_factory.mktemp("gpt2")))


@pytest.fixture
def fresh_registry() -> Iterator[None]:
    """A registry loaded afresh for this test, and dropped after it."""
    reset_registry()
    yield
    reset_registry()


class ResearchGPT2(GPT2LMHeadModel):
    """A GPT-2 subclass under a new architecture name, as a research fork would ship it."""


@pytest.fixture
def research_gpt2(text_models: dict[str, tuple[Any, Any]]) -> tuple[GPT2LMHeadModel, Any]:
    """A tiny model whose architecture ("ResearchGPT2") no built-in adapter claims."""
    model, tokenizer = text_models["gpt2"]
    return tiny.init_model(ResearchGPT2, copy.deepcopy(model.config), seed=1), tokenizer
