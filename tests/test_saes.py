"""SAELens interop: SAEs (random weights, built from configs; nothing downloaded) spliced into
the bridge at their hook_name, checked against the same computation done by hand on the HF model.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from bridge_core import HookNameError, HookPoint, InputError, TransformerBridge

HAS_SAE_LENS = importlib.util.find_spec("sae_lens") is not None


@dataclass
class Metadata:
    hook_name: str
    hook_name_out: str | None = None


@dataclass
class Config:
    d_in: int
    d_sae: int
    metadata: Metadata = field(default_factory=lambda: Metadata(""))


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class TinySAE(nn.Module):
    """Just SAELens's interface (cfg.metadata.hook_name, encode, decode, use_error_term and the
    hook modules), with random weights: the interop needs nothing more."""

    def __init__(self, cfg: Config, seed: int = 0) -> None:
        super().__init__()
        self.cfg, self.use_error_term = cfg, False
        generator = torch.Generator().manual_seed(seed)
        self.W_enc = nn.Parameter(torch.randn(cfg.d_in, cfg.d_sae, generator=generator) / 8)
        self.W_dec = nn.Parameter(torch.randn(cfg.d_sae, cfg.d_in, generator=generator) / 8)
        for name in ("input", "acts_pre", "acts_post", "recons", "error", "output"):
            setattr(self, f"hook_sae_{name}", Identity())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.hook_sae_acts_pre(self.hook_sae_input(x) @ self.W_enc)
        return self.hook_sae_acts_post(torch.relu(pre))

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        return self.hook_sae_recons(acts @ self.W_dec)


def make_sae(hook_name: str, d_in: int = 64, d_sae: int = 128, seed: int = 0) -> Any:
    if HAS_SAE_LENS:
        from sae_lens import StandardSAE, StandardSAEConfig
        from sae_lens.saes.sae import SAEMetadata

        torch.manual_seed(seed)
        cfg = StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook_name))
        sae = StandardSAE(cfg)
        with torch.no_grad():  # SAELens starts b_enc at zero; give the features some spread
            sae.b_enc.normal_(0, 0.1)
        return sae
    return TinySAE(Config(d_in, d_sae, Metadata(hook_name)), seed)


@pytest.fixture
def bridge(gpt2_bridge: TransformerBridge) -> Iterator[TransformerBridge]:
    yield gpt2_bridge
    assert gpt2_bridge.acts_to_saes == {}, "an SAE was left spliced in"
    assert not any(".hook_sae_" in n for n in gpt2_bridge.hook_names())


def with_replaced_block_output(model: Any, fn: Any, ids: torch.Tensor) -> torch.Tensor:
    """The HF model's logits with block 0's output replaced by fn(output), by a torch hook."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        new = fn(hidden)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = model.transformer.h[0].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("hook_name", ["blocks.0.hook_resid_post", "blocks.0.hook_out"])
def test_sae_replaces_the_activation(
    bridge: TransformerBridge, ids: torch.Tensor, hook_name: str
) -> None:
    sae = make_sae(hook_name)
    model = bridge.original_model
    with torch.no_grad():
        logits = bridge.run_with_saes(ids, saes=[sae])
        expected = with_replaced_block_output(model, lambda h: sae.decode(sae.encode(h)), ids)
        assert torch.allclose(logits, expected, atol=1e-6)
        assert not torch.allclose(logits, model(ids).logits, atol=1e-3)
        _, cache = bridge.run_with_cache_with_saes(ids, saes=sae)
    acts = cache[f"{hook_name}.hook_sae_acts_post"]
    assert acts.shape == (2, 12, 128)
    assert torch.allclose(cache[f"{hook_name}.hook_sae_recons"], acts @ sae.W_dec + _b_dec(sae))
    assert torch.equal(cache["blocks.0.hook_resid_post"], cache[f"{hook_name}.hook_sae_output"])


def _b_dec(sae: Any) -> Any:
    return getattr(sae, "b_dec", 0)


def test_error_term_keeps_outputs_exact_until_a_feature_is_edited(
    bridge: TransformerBridge, ids: torch.Tensor
) -> None:
    sae = make_sae("blocks.0.hook_resid_post")
    model = bridge.original_model
    with torch.no_grad():
        plain = model(ids).logits
        assert torch.equal(bridge.run_with_saes(ids, saes=[sae], use_error_term=True), plain)

    def kill_feature_3(acts: torch.Tensor, hook: HookPoint) -> None:
        acts[..., 3] = 0

    def by_hand(h: torch.Tensor) -> torch.Tensor:
        acts = sae.encode(h)
        error = h - sae.decode(acts)
        acts[..., 3] = 0
        return sae.decode(acts) + error

    with torch.no_grad():
        edited = bridge.run_with_hooks_with_saes(
            ids,
            saes=[sae],
            fwd_hooks=[("blocks.0.hook_resid_post.hook_sae_acts_post", kill_feature_3)],
            use_error_term=True,
        )
    assert torch.allclose(edited, with_replaced_block_output(model, by_hand, ids), atol=1e-6)
    assert not torch.allclose(edited, plain, atol=1e-4)


def test_feature_gradients_flow_through_the_exact_error_term(
    bridge: TransformerBridge, ids: torch.Tensor
) -> None:
    sae = make_sae("blocks.0.hook_resid_post")
    _, cache = bridge.run_with_cache_with_saes(
        ids,
        saes=[sae],
        use_error_term=True,
        return_type="loss",
        incl_bwd=True,
        names_filter=lambda n: "hook_sae_acts_post" in n,
    )
    bridge.zero_grad()
    sae.zero_grad()
    grad = cache["blocks.0.hook_resid_post.hook_sae_acts_post_grad"]
    assert grad.shape == (2, 12, 128) and bool(grad.abs().sum() > 0)


def test_add_reset_and_context_restore(bridge: TransformerBridge, ids: torch.Tensor) -> None:
    first, second = make_sae("blocks.1.hook_resid_pre"), make_sae("blocks.1.hook_in", seed=1)
    bridge.add_sae(first)
    try:
        assert list(bridge.acts_to_saes) == ["blocks.1.hook_resid_pre"]
        assert "blocks.1.hook_resid_pre.hook_sae_acts_post" in bridge.hook_dict
        assert "blocks.1.hook_in.hook_sae_acts_post" in bridge.hook_dict  # canonical prefix too
        with bridge.saes(saes=[second]):  # the same hook point: replaces the first for a while
            assert bridge.acts_to_saes == {"blocks.1.hook_in": second}
        assert bridge.acts_to_saes == {"blocks.1.hook_resid_pre": first}
        with torch.no_grad():
            spliced = bridge(ids)
    finally:
        bridge.reset_saes()
    with torch.no_grad():
        assert not torch.allclose(bridge(ids), spliced)
    with pytest.raises(InputError, match="no SAE is spliced in"):
        bridge.reset_saes("blocks.1.hook_resid_pre")


def test_bad_saes_are_refused(bridge: TransformerBridge) -> None:
    with pytest.raises(HookNameError, match="Did you mean"):
        bridge.add_sae(make_sae("blocks.0.hook_resid_pst"))
    with pytest.raises(InputError, match="hook_name"):
        bridge.add_sae(nn.Linear(2, 2))
    transcoder = TinySAE(Config(64, 8, Metadata("blocks.0.hook_mlp_in", "blocks.0.hook_mlp_out")))
    with pytest.raises(InputError, match="transcoder"):
        bridge.add_sae(transcoder)


def test_a_duck_typed_sae_works_as_well(bridge: TransformerBridge, ids: torch.Tensor) -> None:
    sae = TinySAE(Config(64, 32, Metadata("blocks.1.hook_resid_post")))
    with torch.no_grad():
        _, cache = bridge.run_with_cache_with_saes(ids, saes=[sae], use_error_term=True)
    assert cache["blocks.1.hook_resid_post.hook_sae_acts_post"].shape == (2, 12, 32)
    assert "blocks.1.hook_resid_post.hook_sae_error" in cache


@pytest.mark.skipif(
    importlib.util.find_spec("bridge_llava") is None, reason="the LLaVA plugin is not installed"
)
def test_sae_on_a_vision_hook() -> None:
    from bridge_llava.tiny import tiny_image, tiny_llava

    model, processor = tiny_llava()
    bridge = TransformerBridge.wrap(model, processor=processor)
    name = "vision_encoder.layers.0.hook_resid_post"
    width = bridge.vision_encoder.hidden_size
    sae = make_sae(name, d_in=width, d_sae=2 * width)
    inputs = dict(
        processor(
            text="USER: <image>\nWhat? ASSISTANT:", images=[tiny_image(64)], return_tensors="pt"
        )
    )
    with torch.no_grad():
        exact, cache = bridge.run_with_cache_with_saes(**inputs, saes=[sae], use_error_term=True)
        replaced = bridge.run_with_saes(**inputs, saes=[sae])
        assert torch.equal(exact, model(**inputs).logits)
    assert cache[f"{name}.hook_sae_acts_post"].shape[-1] == 2 * width
    assert not torch.allclose(replaced, exact, atol=1e-4)
