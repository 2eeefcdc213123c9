"""HookedTransformer's forward options on the bridge, checked against the plain HF model.

Each reported bug of issue 12 that concerns a forward call has its regression test here:
unknown keywords, left padding, masked tokens in the loss, 1-D ids, backward hooks returning
``(grad,)``, in-place head edits through GPT-2's fused qkv, ``decompose_resid(layer=-1)``,
``hook_pos_embed``'s batch dimension and GPT-2's default BOS.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bridge_core import HookPoint, InputError, TransformerBridge

TEXTS = ["hello world", "the quick brown fox jumps over"]


def test_stop_at_layer_returns_the_residual_stream_before_that_block(
    model_and_bridge: tuple[Any, TransformerBridge], ids: torch.Tensor
) -> None:
    model, bridge = model_and_bridge
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
        n = bridge.cfg.n_layers
        assert torch.equal(bridge(ids, stop_at_layer=0), hidden[0])
        assert torch.equal(bridge(ids, stop_at_layer=1), hidden[1])
        assert torch.equal(bridge(ids, stop_at_layer=-1), hidden[n - 1])
        _, cache = bridge.run_with_cache(ids)
        assert torch.equal(bridge(ids, stop_at_layer=n), cache["resid_post", n - 1])


def test_stop_at_layer_does_not_run_later_blocks(
    gpt2_bridge: TransformerBridge, ids: torch.Tensor
) -> None:
    fired: list[str] = []

    def record(tensor: torch.Tensor, hook: HookPoint) -> None:
        fired.append(hook.name)

    resid_pre = [f"blocks.{i}.hook_resid_pre" for i in range(2)]
    gpt2_bridge.run_with_hooks(ids, stop_at_layer=1, fwd_hooks=[(n, record) for n in resid_pre])
    assert fired == ["blocks.0.hook_in"]  # block 1 never ran, as in HookedTransformer


def test_start_at_layer_continues_from_a_residual_stream(
    model_and_bridge: tuple[Any, TransformerBridge], ids: torch.Tensor
) -> None:
    _, bridge = model_and_bridge
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(ids)
        resumed = bridge(cache["resid_pre", 1], start_at_layer=1)
        loss = bridge(cache["resid_pre", 1], start_at_layer=-1, tokens=ids, return_type="loss")
        both = bridge(cache["resid_pre", 1], start_at_layer=1, stop_at_layer=2)
    assert torch.equal(resumed, logits)
    assert torch.equal(loss, bridge(ids, return_type="loss"))
    assert torch.equal(both, cache["resid_post", 1])
    with pytest.raises(InputError, match="residual stream"):
        bridge(ids, start_at_layer=1)
    with pytest.raises(InputError, match="outside this model's 2 layers"):
        bridge(ids, stop_at_layer=5)


def test_unknown_keywords_are_refused_and_hf_keywords_pass(
    gpt2_bridge: TransformerBridge, ids: torch.Tensor
) -> None:
    with pytest.raises(InputError, match=r"'stop_at_layr' \(Did you mean 'stop_at_layer'"):
        gpt2_bridge(ids, stop_at_layr=1)
    with pytest.raises(InputError, match="'made_up'"):
        gpt2_bridge.run_with_cache(ids, made_up=True)
    with pytest.raises(InputError, match="'made_up'"):
        gpt2_bridge.run_with_hooks(ids, made_up=True)
    with pytest.raises(InputError, match=r"past_kv_cache.*past_key_values"):
        gpt2_bridge(ids, past_kv_cache=None)
    with pytest.raises(InputError, match="pass it to run_with_cache"):
        gpt2_bridge(ids, names_filter="hook_embed")
    raw = gpt2_bridge(ids, return_type="raw", output_hidden_states=True, use_cache=False)
    assert len(raw.hidden_states) == 3  # HF keywords still reach the model


def test_one_dimensional_ids_are_one_sequence(
    gpt2_bridge: TransformerBridge, ids: torch.Tensor
) -> None:
    with torch.no_grad():
        assert torch.equal(gpt2_bridge(ids[0]), gpt2_bridge(ids[:1]))
        assert gpt2_bridge(ids[0], return_type="loss").dim() == 0


def test_left_padded_batch_matches_each_sequence_alone(
    text_models: dict[str, Any], arch: str
) -> None:
    model, tokenizer = text_models[arch]
    bridge = TransformerBridge.wrap(model, tokenizer=tokenizer)
    batch = bridge.to_tokens(TEXTS, padding_side="left")
    mask = (batch != tokenizer.pad_token_id).long()
    with torch.no_grad():
        logits = bridge(batch, attention_mask=mask)
        for row, text in enumerate(TEXTS):
            alone = bridge(text)[0]
            assert torch.allclose(logits[row, -alone.shape[0] :], alone, atol=1e-5)
        # what HF's generate passes: positions counted over the mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        positions = torch.where(mask.bool(), positions, torch.arange(batch.shape[1]))
        expected = model(batch, attention_mask=mask, position_ids=positions).logits
    assert torch.equal(logits, expected)
    right = bridge.to_tokens(TEXTS, padding_side="right")
    right_mask = (right != tokenizer.pad_token_id).long()
    with torch.no_grad():  # right padding: exactly the plain HF forward
        assert torch.equal(
            bridge(right, attention_mask=right_mask), model(right, attention_mask=right_mask).logits
        )


def test_text_batches_are_padded_and_positioned_by_their_mask(
    gpt2_bridge: TransformerBridge,
) -> None:
    with torch.no_grad():
        batch = gpt2_bridge(TEXTS, padding_side="left")
        alone = gpt2_bridge(TEXTS[0])[0]
    assert torch.allclose(batch[0, -alone.shape[0] :], alone, atol=1e-5)


def test_masked_tokens_are_left_out_of_the_loss(gpt2_bridge: TransformerBridge) -> None:
    batch = gpt2_bridge.to_tokens(TEXTS, padding_side="left")
    mask = (batch != gpt2_bridge.tokenizer.pad_token_id).long()
    with torch.no_grad():
        logits, loss = gpt2_bridge(batch, attention_mask=mask, return_type="both")
        per_token = gpt2_bridge(batch, attention_mask=mask, return_type="loss", loss_per_token=True)
    log_probs = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch[:, 1:, None])[..., 0]
    keep = (mask[:, :-1] * mask[:, 1:]).bool()
    assert torch.allclose(loss, -log_probs[keep].mean(), atol=1e-6)
    assert per_token.shape == (2, batch.shape[1] - 1)
    assert torch.allclose(per_token[keep], -log_probs[keep], atol=1e-5)
    assert bool((per_token[~keep] == 0).all())
    short = gpt2_bridge.to_tokens(TEXTS[0])
    with torch.no_grad():
        alone = gpt2_bridge(short, return_type="loss")
    n_first = int(keep[0].sum())
    assert torch.allclose(per_token[0][keep[0]].sum() / n_first, alone, atol=1e-5)


def test_loss_without_a_mask_is_hfs_loss(
    model_and_bridge: tuple[Any, TransformerBridge], ids: torch.Tensor
) -> None:
    model, bridge = model_and_bridge
    with torch.no_grad():
        assert torch.equal(bridge(ids, return_type="loss"), model(ids, labels=ids).loss)
        per_token = bridge(ids, return_type="loss", loss_per_token=True)
        assert torch.allclose(per_token.mean(), model(ids, labels=ids).loss, atol=1e-6)


def test_backward_hooks_may_return_a_one_tuple(
    gpt2_bridge: TransformerBridge, ids: torch.Tensor
) -> None:
    grads: dict[str, torch.Tensor] = {}

    def double(grad: torch.Tensor, hook: HookPoint) -> tuple[torch.Tensor]:
        return (grad * 2,)  # PyTorch's module-hook convention, accepted as TL accepts it

    def save(grad: torch.Tensor, hook: HookPoint) -> None:
        grads[hook.name] = grad

    gpt2_bridge.zero_grad()
    loss = gpt2_bridge.run_with_hooks(
        ids, return_type="loss", bwd_hooks=[("blocks.1.hook_resid_pre", save)]
    )
    loss.backward()
    plain = grads.pop("blocks.1.hook_in")
    loss = gpt2_bridge.run_with_hooks(
        ids,
        return_type="loss",
        bwd_hooks=[("blocks.1.hook_resid_post", double), ("blocks.1.hook_resid_pre", save)],
    )
    loss.backward()
    gpt2_bridge.zero_grad()
    assert torch.allclose(grads["blocks.1.hook_in"], 2 * plain)


def test_in_place_head_edit_through_fused_qkv_with_autograd(
    gpt2_bridge: TransformerBridge, ids: torch.Tensor
) -> None:
    def zero_head_0(v: torch.Tensor, hook: HookPoint) -> None:
        v[:, :, 0] = 0  # TransformerLens habit: edit the head in place

    def plain_torch(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        d = output.shape[-1] // 3
        output[..., 2 * d : 2 * d + d // 4] = 0  # v of head 0 in GPT-2's [q | k | v]
        return output

    model = gpt2_bridge.original_model
    assert torch.is_grad_enabled()
    edited = gpt2_bridge.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_v", zero_head_0)])
    edited.sum().backward()  # autograd went through the in-place edit
    gpt2_bridge.zero_grad()
    handle = model.transformer.h[0].attn.c_attn.register_forward_hook(plain_torch)
    try:
        expected = model(ids).logits
    finally:
        handle.remove()
    assert torch.equal(edited, expected)


def test_decompose_resid_layer_minus_one_is_the_whole_stream(
    gpt2_bridge: TransformerBridge, ids: torch.Tensor
) -> None:
    _, cache = gpt2_bridge.run_with_cache(ids)
    parts, labels = cache.decompose_resid(layer=-1, return_labels=True)
    assert labels == ["embed", "pos_embed", "0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]
    assert torch.allclose(parts.sum(0), cache["resid_post", 1], atol=1e-5)
    assert torch.equal(parts, cache.decompose_resid())


def test_hook_pos_embed_has_the_batch_dimension(
    gpt2_bridge: TransformerBridge, ids: torch.Tensor
) -> None:
    _, cache = gpt2_bridge.run_with_cache(ids, names_filter=["hook_pos_embed", "hook_embed"])
    assert cache["hook_pos_embed"].shape == cache["hook_embed"].shape == (2, 12, 64)
    wpe = gpt2_bridge.original_model.transformer.wpe.weight
    assert torch.equal(cache["hook_pos_embed"][1], wpe[:12])


def test_gpt2_text_gets_a_bos_token_by_default(
    gpt2_bridge: TransformerBridge, llama_bridge: TransformerBridge
) -> None:
    bos = gpt2_bridge.tokenizer.bos_token_id
    assert gpt2_bridge.cfg.default_prepend_bos is True
    assert gpt2_bridge.to_tokens("hello")[0, 0] == bos
    assert gpt2_bridge.to_tokens("hello", prepend_bos=False)[0, 0] != bos
    llama_ids = llama_bridge.to_tokens("hello")  # the tokenizer adds it: not twice
    assert int((llama_ids == llama_bridge.tokenizer.bos_token_id).sum()) == 1
    padded = gpt2_bridge.to_tokens(TEXTS, padding_side="left")
    first_real = (padded != gpt2_bridge.tokenizer.pad_token_id).long().argmax(-1)
    assert bool((padded[torch.arange(2), first_real] == bos).all())  # BOS after the padding
