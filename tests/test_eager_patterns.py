"""Models running eager attention: the scores and pattern hooks run inside the kernel itself.

The hooks see the kernel's own tensors (bit for bit what HF returns as ``attentions``), an
edit is computed by the kernel, and the kernel runs once. A kernel that is not understood
gets the pattern computed beside it, as sdpa does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers.models.gpt2 import modeling_gpt2

from bridge_adapters import tiny
from bridge_adapters.families import FAMILIES
from bridge_core import HookPoint, TransformerBridge
from bridge_core.errors import BridgeError
from bridge_core.verify import example_inputs


@pytest.fixture(scope="module")
def eager_models(text_models: dict[str, tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
    """A copy of each text model (conftest's `text_models`) running eager attention."""
    models = {}
    for name, (model, tokenizer) in text_models.items():
        eager = copy.deepcopy(model)
        eager.set_attn_implementation("eager")
        models[name] = (eager, tokenizer)
    return models


@pytest.fixture(params=["gpt2", "llama", "mistral", "qwen2"])
def eager(
    request: pytest.FixtureRequest, eager_models: dict[str, tuple[Any, Any]]
) -> Iterator[tuple[Any, TransformerBridge]]:
    model, tokenizer = eager_models[request.param]
    bridge = TransformerBridge.wrap(model, tokenizer=tokenizer)
    yield model, bridge
    assert not any(p.has_hooks() for p in bridge.hook_dict.values()), "a hook was left behind"
    assert model.config._attn_implementation == "eager"


def test_patterns_are_the_kernels_own(eager: tuple[Any, TransformerBridge]) -> None:
    model, bridge = eager
    ids = torch.randint(3, 500, (2, 7))
    with torch.no_grad():
        reference = model(ids, output_attentions=True)
        logits, cache = bridge.run_with_cache(ids)
    assert torch.equal(logits, reference.logits)
    for layer, attentions in enumerate(reference.attentions):
        assert torch.equal(cache["pattern", layer], attentions), layer
    torch.testing.assert_close(cache["pattern", 0], cache["attn_scores", 0].softmax(-1))


_HF_ATTENTIONS = ("attentions", "encoder_attentions", "decoder_attentions", "cross_attentions")


@pytest.mark.parametrize("name", sorted(set(FAMILIES) - {"falcon"}))
def test_every_familys_eager_patterns_are_hfs_attentions(name: str) -> None:
    # Falcon-7B computes attention in its own forward: its adapter's kernel stands in for it
    # and is compared with HF's weights in test_falcon.py
    model, tokenizer = FAMILIES[name]()
    if name.startswith("falcon"):
        model.config._attn_implementation = "eager"  # Falcon cannot switch it dynamically
    else:
        model.set_attn_implementation("eager")
    bridge = TransformerBridge.wrap(model, tokenizer=tokenizer)
    inputs = example_inputs(bridge)
    with torch.no_grad():
        reference = model(**inputs, output_attentions=True)
        logits, cache = bridge.run_with_cache(**inputs, names_filter=lambda n: "pattern" in n)
    assert torch.equal(logits, reference.logits if hasattr(reference, "logits") else reference[0])
    attentions = [a for k in _HF_ATTENTIONS for a in getattr(reference, k, None) or ()]
    assert attentions and len(attentions) == len(cache)
    for index, expected in enumerate(attentions):
        assert any(torch.equal(p, expected) for p in cache.values()), (name, index)


class _CountSoftmax(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(
        self, func: Any, types: Any, args: Any = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        self.calls += "softmax" in getattr(func, "__name__", "")
        return func(*args, **(kwargs or {}))


def test_the_kernel_computes_each_pattern_once(eager: tuple[Any, TransformerBridge]) -> None:
    model, bridge = eager
    ids = torch.randint(3, 500, (2, 7))
    with torch.no_grad(), _CountSoftmax() as counted:
        bridge.run_with_cache(ids, names_filter=lambda n: n.endswith(("_scores", "_pattern")))
    assert counted.calls == model.config.num_hidden_layers


def test_a_bfloat16_gpt2_pattern_is_its_kernels_own() -> None:
    model, tokenizer = tiny.tiny_gpt2()
    model = model.bfloat16()
    model.set_attn_implementation("eager")  # its softmax runs in bfloat16, not float32
    bridge = TransformerBridge.wrap(model, tokenizer=tokenizer)
    ids = torch.randint(3, 500, (2, 7))
    with torch.no_grad():
        reference = model(ids, output_attentions=True)
        logits, cache = bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("pattern"))
    assert torch.equal(logits, reference.logits)
    for layer, attentions in enumerate(reference.attentions):
        assert cache["pattern", layer].dtype == torch.bfloat16
        assert torch.equal(cache["pattern", layer], attentions), layer


def _zero_pattern_head_1(pattern: torch.Tensor, hook: HookPoint) -> None:
    pattern[:, 1] = 0.0


def _zero_z_head_1(z: torch.Tensor, hook: HookPoint) -> None:
    z[:, :, 1] = 0.0


def test_a_zeroed_pattern_head_is_a_zeroed_z_head(eager: tuple[Any, TransformerBridge]) -> None:
    _, bridge = eager
    ids = torch.randint(3, 500, (2, 7))

    with torch.no_grad():
        by_pattern = bridge.run_with_hooks(
            ids, fwd_hooks=[("blocks.0.attn.hook_pattern", _zero_pattern_head_1)]
        )
        by_z = bridge.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_z", _zero_z_head_1)])
        assert torch.equal(by_pattern, by_z)
        assert not torch.equal(by_pattern, bridge(ids))


def test_patterns_under_inference_mode(eager: tuple[Any, TransformerBridge]) -> None:
    model, bridge = eager
    ids = torch.randint(3, 500, (2, 7))

    def halve(pattern: torch.Tensor, hook: HookPoint) -> None:
        pattern.mul_(0.5)  # in place, on an inference tensor

    with torch.inference_mode():
        reference = model(ids, output_attentions=True)
        logits, cache = bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("pattern"))
        halved = bridge.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_pattern", halve)])
        by_hand = bridge.run_with_hooks(
            ids, fwd_hooks=[("blocks.0.attn.hook_z", lambda z, hook: z * 0.5)]
        )
    assert torch.equal(logits, reference.logits) and cache["pattern", 0].is_inference()
    assert all(torch.equal(cache["pattern", i], a) for i, a in enumerate(reference.attentions))
    torch.testing.assert_close(halved, by_hand)  # half the pattern is half of z
    assert not torch.equal(halved, logits)


def test_edited_scores_go_into_the_kernels_softmax(eager: tuple[Any, TransformerBridge]) -> None:
    _, bridge = eager
    ids = torch.randint(3, 500, (2, 7))

    def only_self(scores: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        keep = torch.eye(scores.shape[-1], dtype=torch.bool)
        return scores.masked_fill(~keep, float("-inf"))

    edit = [("blocks.0.attn.hook_attn_scores", only_self)]
    with torch.no_grad(), bridge.hooks(fwd_hooks=edit):
        _, cache = bridge.run_with_cache(ids, names_filter=lambda n: n.startswith("blocks.0.attn"))
    # each position attends to itself alone: z is v (a key/value head per query group)
    v, z = cache["v", 0], cache["z", 0]
    groups = z.shape[2] // v.shape[2]
    assert torch.equal(z, v.repeat_interleave(groups, dim=2))
    assert torch.equal(cache["pattern", 0], torch.eye(7).expand_as(cache["pattern", 0]))


def test_gradients_reach_the_pattern_of_the_kernel(eager: tuple[Any, TransformerBridge]) -> None:
    model, bridge = eager
    ids = torch.randint(3, 500, (2, 7))
    _, grads = bridge.run_with_cache(
        ids, names_filter="blocks.0.attn.hook_pattern", incl_bwd=True, return_type="loss"
    )
    pattern, grad = grads["blocks.0.attn.hook_pattern"], grads["blocks.0.attn.hook_pattern_grad"]
    model.zero_grad(set_to_none=True)
    sdpa = copy.deepcopy(model)
    sdpa.set_attn_implementation("sdpa")
    beside = TransformerBridge.wrap(sdpa, tokenizer=bridge.tokenizer)
    _, expected = beside.run_with_cache(
        ids, names_filter="blocks.0.attn.hook_pattern", incl_bwd=True, return_type="loss"
    )
    assert pattern.shape == grad.shape and grad.abs().sum() > 0
    torch.testing.assert_close(grad, expected["blocks.0.attn.hook_pattern_grad"])


def _masked_scores(
    query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float | None
) -> torch.Tensor:
    """Scaled dot products plus the additive mask, as GPT-2's eager kernel computes them."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * (scaling or query.size(-1) ** -0.5)
    return scores if mask is None else scores + mask


def _manual_softmax_kernel(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-2's eager kernel with the softmax written out: no softmax call to find."""
    weights = _masked_scores(query, key, attention_mask, scaling)
    weights = (weights - weights.amax(-1, keepdim=True)).exp()
    weights = weights / weights.sum(-1, keepdim=True)
    return torch.matmul(weights, value).transpose(1, 2), weights


def _unused_softmax_kernel(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A kernel that takes the softmax of its scores and then never uses it."""
    weights = torch.matmul(query, key.transpose(-1, -2)).softmax(-1)
    out = nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True)
    return out.transpose(1, 2), weights


def _checking_kernel(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A kernel that reads its float32 softmax's shape and dtype before casting it back."""
    weights = _masked_scores(query, key, attention_mask, scaling)
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32)
    if weights.size(-1) != key.shape[-2] or weights.dtype != torch.float32:
        raise AssertionError("not the softmax asked for")
    weights = weights.to(query.dtype)
    return torch.matmul(weights, value).transpose(1, 2), weights


def _eager_gpt2(
    monkeypatch: pytest.MonkeyPatch,
    kernel: Callable[..., Any],
    dtype: torch.dtype = torch.float32,
) -> tuple[Any, TransformerBridge]:
    monkeypatch.setattr(modeling_gpt2, "eager_attention_forward", kernel)
    model: Any
    model, tokenizer = tiny.tiny_gpt2()
    model = model.to(dtype)
    model.set_attn_implementation("eager")
    return model, TransformerBridge.wrap(model, tokenizer=tokenizer)


def test_a_kernel_without_a_softmax_gets_the_pattern_computed_beside_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, bridge = _eager_gpt2(monkeypatch, _manual_softmax_kernel)
    ids = torch.randint(3, 500, (2, 7))
    with torch.no_grad():
        reference = model(ids, output_attentions=True)
        logits, cache = bridge.run_with_cache(ids)
        assert torch.equal(logits, reference.logits)  # the kernel ran once, unchanged
        for layer, attentions in enumerate(reference.attentions):
            torch.testing.assert_close(cache["pattern", layer], attentions)

        by_pattern = bridge.run_with_hooks(
            ids, fwd_hooks=[("blocks.0.attn.hook_pattern", _zero_pattern_head_1)]
        )
        by_z = bridge.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_z", _zero_z_head_1)])
        torch.testing.assert_close(by_pattern, by_z)  # the edit computed beside the kernel
        assert not torch.allclose(by_pattern, logits)


def test_a_kernel_that_never_uses_its_softmax_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, bridge = _eager_gpt2(monkeypatch, _unused_softmax_kernel)
    ids = torch.randint(3, 500, (2, 7))
    with torch.no_grad(), pytest.raises(BridgeError, match="never used the output of its softmax"):
        bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
    assert not any(p.has_hooks() for p in bridge.hook_dict.values())
    assert model.config._attn_implementation == "eager"
    assert all(not m._forward_hooks for m in model.modules())


def test_the_pattern_is_what_the_kernel_uses_after_reads_of_its_shape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, bridge = _eager_gpt2(monkeypatch, _checking_kernel, torch.bfloat16)
    ids = torch.randint(3, 500, (2, 7))
    seen: list[torch.dtype] = []

    def halve_head_1(pattern: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        seen.append(pattern.dtype)
        return pattern * torch.tensor([1.0, 0.5, 1.0, 1.0], dtype=pattern.dtype)[:, None, None]

    with torch.no_grad():
        reference = model(ids, output_attentions=True)
        _, cache = bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("pattern"))
        edited = bridge.run_with_hooks(
            ids, fwd_hooks=[("blocks.0.attn.hook_pattern", halve_head_1)]
        )
    assert seen == [torch.bfloat16]  # after the cast, not at the read of its size
    assert all(torch.equal(cache["pattern", i], a) for i, a in enumerate(reference.attentions))
    assert not torch.equal(edited, reference.logits)  # the kernel went on with the edit
