"""Text in, text out: tokenization, return types and generation match HF."""

from __future__ import annotations

import pytest
import torch

from bridge_core import HookPoint, InputError, TransformerBridge


def test_text_input_equals_hf_on_the_same_tokens(llama_bridge: TransformerBridge) -> None:
    tokenizer = llama_bridge.tokenizer
    encoded = tokenizer("The cat sat on the mat", return_tensors="pt")
    with torch.no_grad():
        expected = llama_bridge.original_model(**encoded).logits
        assert torch.equal(llama_bridge("The cat sat on the mat"), expected)
    assert encoded["input_ids"][0, 0] == tokenizer.bos_token_id  # Llama tokenizers add BOS


def test_to_tokens_and_back(llama_bridge: TransformerBridge) -> None:
    tokens = llama_bridge.to_tokens("hello world")
    assert tokens.shape[0] == 1 and tokens[0, 0] == llama_bridge.tokenizer.bos_token_id
    assert llama_bridge.to_tokens("hello world", prepend_bos=False).shape[1] == tokens.shape[1] - 1
    assert "hello world" in str(llama_bridge.to_string(tokens[0]))
    strs = llama_bridge.to_str_tokens("hello world")
    assert len(strs) == tokens.shape[1] and "".join(strs[1:]).strip() == "hello world"


def test_prepend_bos_for_gpt2_style_tokenizer(gpt2_bridge: TransformerBridge) -> None:
    plain = gpt2_bridge.to_tokens("hello", prepend_bos=False)
    with_bos = gpt2_bridge.to_tokens("hello", prepend_bos=True)
    assert with_bos[0, 0] == gpt2_bridge.tokenizer.bos_token_id
    assert torch.equal(with_bos[:, 1:], plain)
    assert gpt2_bridge.cfg.default_prepend_bos  # TransformerLens's default: BOS for GPT-2 too
    assert torch.equal(gpt2_bridge.to_tokens("hello"), with_bos)


def test_batch_of_texts_is_padded_with_a_mask(llama_bridge: TransformerBridge) -> None:
    texts = ["a short one", "a somewhat longer sentence than that"]
    encoded = llama_bridge.prepare_inputs(texts)
    assert encoded["input_ids"].shape[0] == 2 and bool((encoded["attention_mask"] == 0).any())
    with torch.no_grad():
        expected = llama_bridge.original_model(**encoded).logits
        assert torch.equal(llama_bridge(texts), expected)


def test_return_types(gpt2_bridge: TransformerBridge) -> None:
    ids = torch.randint(3, 500, (1, 6))
    with torch.no_grad():
        logits, loss = gpt2_bridge(ids, return_type="both")
        raw = gpt2_bridge(ids, return_type="raw")
        expected = gpt2_bridge.original_model(ids, labels=ids)
    assert torch.equal(logits, expected.logits) and torch.equal(loss, expected.loss)
    assert torch.equal(raw.logits, expected.logits)
    assert gpt2_bridge(ids, return_type=None) is None
    with pytest.raises(InputError, match="return_type"):
        gpt2_bridge(ids, return_type="probs")  # type: ignore[arg-type]  # bad on purpose


def test_generate_matches_hf_greedy(llama_bridge: TransformerBridge) -> None:
    prompt = "Once upon a time"
    encoded = llama_bridge.tokenizer(prompt, return_tensors="pt")
    expected = llama_bridge.original_model.generate(**encoded, max_new_tokens=6, do_sample=False)
    tokens = llama_bridge.generate(encoded["input_ids"], max_new_tokens=6)
    assert torch.equal(tokens, expected)
    text = llama_bridge.generate(prompt, max_new_tokens=6)
    assert isinstance(text, str) and text.startswith(prompt)


def test_generate_runs_hooks_at_every_step(gpt2_bridge: TransformerBridge) -> None:
    steps: list[int] = []
    ids = torch.randint(3, 500, (1, 4))
    gpt2_bridge.generate(
        ids, max_new_tokens=3, fwd_hooks=[("hook_embed", lambda t, hook: steps.append(t.shape[1]))]
    )
    assert steps == [4, 1, 1]
    assert not any(p.has_hooks() for p in gpt2_bridge.hook_dict.values())


def test_generate_tells_hooks_the_step_and_positions(llama_bridge: TransformerBridge) -> None:
    seen: list[tuple[int, list[int]]] = []

    def record(resid: torch.Tensor, hook: HookPoint) -> None:
        seen.append((hook.ctx["step"], hook.ctx["positions"].tolist()))

    llama_bridge.generate(
        ["a b c d e", "a"], max_new_tokens=3, fwd_hooks=[("blocks.1.hook_resid_post", record)]
    )
    n = len(seen[0][1])  # the prompt, left-padded to the longer text
    assert seen == [(0, list(range(n))), (1, [n]), (2, [n + 1])]
    assert all(not p.ctx for p in llama_bridge.hook_dict.values())


def test_input_given_twice_is_an_error(gpt2_bridge: TransformerBridge) -> None:
    ids = torch.randint(3, 500, (1, 4))
    with pytest.raises(InputError, match="twice"):
        gpt2_bridge(ids, input_ids=ids)
