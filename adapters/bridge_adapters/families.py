"""One tiny random-weight model per built-in text adapter, for tests, verify runs and docs.

`FAMILIES` maps each adapter name to a builder returning ``(model, tokenizer)``: the HF class
that adapter claims, built from its config class with a few layers and small widths (and the
family's characteristic settings: parallel residual, post-norm, grouped-query attention ...),
seeded, float32, in eval mode, with the byte-level BPE tokenizer of `bridge_adapters.tiny`.
Adding a built-in adapter means adding its builder here; the test suite runs every one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForMaskedLM,
    BertModel,
    FalconConfig,
    FalconForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GPTBigCodeConfig,
    GPTBigCodeForCausalLM,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    RobertaConfig,
    RobertaForMaskedLM,
    StableLmConfig,
    StableLmForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
    XLMRobertaConfig,
    XLMRobertaModel,
)

from bridge_adapters import tiny

Builder = Callable[[], tuple[PreTrainedModel, Any]]

WIDTH: Final = 64
HEADS: Final = 4
LAYERS: Final = 2
VOCAB: Final = 512


def _text(
    config_cls: Callable[..., Any], model_cls: Callable[[Any], PreTrainedModel], **config: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    tokenizer = tiny.build_tokenizer(VOCAB)
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    model = tiny.init_model(model_cls, config_cls(vocab_size=VOCAB, **ids, **config), seed=0)
    return model, tokenizer


def tiny_gpt_neox() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """GPT-NeoX as Pythia: parallel residual, partial rotary, per-head fused qkv."""
    return _text(
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        hidden_size=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=4 * WIDTH,
        use_parallel_residual=True,
        rotary_pct=0.25,
        max_position_embeddings=128,
    )


def tiny_opt() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """OPT as opt-125m: pre-LayerNorm, learned positions, ReLU MLP on the block."""
    return _text(
        OPTConfig,
        OPTForCausalLM,
        hidden_size=WIDTH,
        word_embed_proj_dim=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        ffn_dim=4 * WIDTH,
        max_position_embeddings=128,
    )


def tiny_bert() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """BERT as a masked LM: post-LayerNorm blocks, token types."""
    return _text(
        BertConfig,
        BertForMaskedLM,
        hidden_size=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=4 * WIDTH,
        max_position_embeddings=128,
    )


def tiny_phi3() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Phi-3: fused [q | k | v] with grouped-query attention, fused [gate | up] MLP."""
    return _text(
        Phi3Config,
        Phi3ForCausalLM,
        hidden_size=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        intermediate_size=2 * WIDTH,
        max_position_embeddings=128,
    )


# -- mixture of experts: 4 experts, 2 per token, width 32. On verify's generated inputs
# (`bridge_core.verify.example_inputs`: 2 x 8 tokens) every expert of every layer gets tokens,
# so verify edits every per-expert hook point (tests/test_families.py checks that none fired
# with an empty tensor only, which verify would report as a skipped check).

MOE: Final = {
    "hidden_size": 32,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 128,
}


def tiny_mixtral() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Mixtral: grouped-query attention, 4 experts of width 48, top-2 renormalised."""
    return _text(
        MixtralConfig,
        MixtralForCausalLM,
        **MOE,
        num_key_value_heads=2,
        intermediate_size=48,
        num_local_experts=4,
    )


def tiny_qwen2_moe() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Qwen2-MoE: q/k/v biases, 4 experts of width 48 (not renormalised), a shared expert."""
    return _text(
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
        **MOE,
        num_key_value_heads=2,
        intermediate_size=64,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=64,
        num_experts=4,
    )


def tiny_qwen3_moe() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Qwen3-MoE: per-head q/k norms, 4 experts of width 48, top-2 renormalised."""
    return _text(
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
        **MOE,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        moe_intermediate_size=48,
        num_experts=4,
        norm_topk_prob=True,
    )


def tiny_olmoe() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """OLMoE: q/k norms over all heads, 4 experts of width 48 (not renormalised)."""
    return _text(
        OlmoeConfig,
        OlmoeForCausalLM,
        **MOE,
        num_key_value_heads=HEADS,
        intermediate_size=48,
        num_experts=4,
    )


# -- dense decoder-only families (issue 10) ----------------------------------------------------


def tiny_falcon() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Falcon as falcon-7b: parallel attention and MLP, multi-query, one LayerNorm, rotary."""
    return _text(
        FalconConfig,
        FalconForCausalLM,
        hidden_size=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        multi_query=True,
        parallel_attn=True,
        new_decoder_architecture=False,
        max_position_embeddings=128,
    )


def tiny_falcon_40b() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Falcon as falcon-40b: new decoder architecture, ln_attn / ln_mlp, 2 kv groups."""
    return _text(
        FalconConfig,
        FalconForCausalLM,
        hidden_size=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_kv_heads=2,
        new_decoder_architecture=True,
        max_position_embeddings=128,
    )


def tiny_gptj() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """GPT-J: parallel attention and MLP, rotary on a quarter of each head (rotate_every_two)."""
    return _text(
        GPTJConfig,
        GPTJForCausalLM,
        n_embd=WIDTH,
        n_layer=LAYERS,
        n_head=HEADS,
        rotary_dim=4,
        n_positions=128,
    )


def tiny_phi() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Phi as phi-2: parallel attention and MLP, half of each head rotary, biases everywhere."""
    return _text(
        PhiConfig,
        PhiForCausalLM,
        hidden_size=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=4 * WIDTH,
        max_position_embeddings=128,
    )


def tiny_gpt_bigcode() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """GPT-BigCode as StarCoder: multi-query attention, learned positions."""
    return _text(
        GPTBigCodeConfig,
        GPTBigCodeForCausalLM,
        n_embd=WIDTH,
        n_layer=LAYERS,
        n_head=HEADS,
        multi_query=True,
        n_positions=128,
    )


def _gemma(
    config_cls: Callable[..., Any], model_cls: Callable[[Any], PreTrainedModel], **config: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    return _text(
        config_cls,
        model_cls,
        hidden_size=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=2 * WIDTH,
        max_position_embeddings=128,
        **config,
    )


def tiny_gemma() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Gemma: embeddings scaled by sqrt(d_model), GeGLU, grouped-query attention."""
    return _gemma(GemmaConfig, GemmaForCausalLM)


def tiny_gemma2() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Gemma-2: pre- and post-norms, soft-capping, a 4-position window on layer 0."""
    return _gemma(
        Gemma2Config,
        Gemma2ForCausalLM,
        sliding_window=4,
        query_pre_attn_scalar=16,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
    )


def tiny_gemma3() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Gemma-3 (text): q/k norms, a local (4-position window) and a global layer."""
    return _gemma(
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        sliding_window=4,
        query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"],
    )


def tiny_qwen3() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Qwen3: per-head q/k RMSNorms, grouped-query attention."""
    return _text(
        Qwen3Config,
        Qwen3ForCausalLM,
        hidden_size=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=2 * WIDTH,
        max_position_embeddings=128,
    )


def tiny_olmo2() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """OLMo-2: norms after attention and MLP only, q/k norms over all heads."""
    return _text(
        Olmo2Config,
        Olmo2ForCausalLM,
        hidden_size=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=2 * WIDTH,
        max_position_embeddings=128,
    )


def tiny_stablelm() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """StableLM-2 as the 12B: parallel residual, per-head q/k LayerNorms, a quarter rotary."""
    return _text(
        StableLmConfig,
        StableLmForCausalLM,
        hidden_size=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        intermediate_size=2 * WIDTH,
        max_position_embeddings=128,
        use_parallel_residual=True,
        qk_layernorm=True,
    )


# -- encoders and encoder-decoders ---------------------------------------------------------

_ENCODER: Final[dict[str, Any]] = dict(
    hidden_size=WIDTH,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    intermediate_size=4 * WIDTH,
    max_position_embeddings=128,
)


def tiny_bert_model() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A headless BERT (BertModel, as all-MiniLM): the last hidden state is the output."""
    return _text(BertConfig, BertModel, **_ENCODER)


def tiny_roberta() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """RoBERTa as a masked LM: BERT's layout, positions counted from the padding index."""
    return _text(RobertaConfig, RobertaForMaskedLM, **_ENCODER)


def tiny_xlm_roberta_model() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A headless XLM-RoBERTa (XLMRobertaModel), with its pooler."""
    return _text(XLMRobertaConfig, XLMRobertaModel, **_ENCODER)


def _t5(**config: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    model, tokenizer = _text(
        T5Config,
        T5ForConditionalGeneration,
        d_model=WIDTH,
        d_kv=WIDTH // HEADS,
        d_ff=2 * WIDTH,
        num_layers=LAYERS,
        num_heads=HEADS,
        relative_attention_num_buckets=8,
        **config,
    )
    # as T5's checkpoints: decoding starts at the padding token
    model.config.decoder_start_token_id = tokenizer.pad_token_id
    model.generation_config.decoder_start_token_id = tokenizer.pad_token_id
    return model, tokenizer


def tiny_t5() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """T5 as t5-small: ReLU MLP (wi, wo), tied embeddings, relative position buckets."""
    return _t5()


def tiny_t5_gated() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """T5 v1.1 / Flan-T5: gated-GELU MLP (wi_0, wi_1, wo), untied head."""
    return _t5(feed_forward_proj="gated-gelu", tie_word_embeddings=False)


def tiny_bart() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """BART: post-LayerNorm encoder and decoder, learned positions, cross-attention."""
    return _text(
        BartConfig,
        BartForConditionalGeneration,
        d_model=WIDTH,
        encoder_layers=LAYERS,
        decoder_layers=LAYERS,
        encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS,
        encoder_ffn_dim=2 * WIDTH,
        decoder_ffn_dim=2 * WIDTH,
        max_position_embeddings=128,
    )


FAMILIES: Final[dict[str, Builder]] = {
    "gpt2": tiny.tiny_gpt2,
    "llama": tiny.tiny_llama,
    "mistral": tiny.tiny_mistral,
    "qwen2": tiny.tiny_qwen2,
    "gpt_neox": tiny_gpt_neox,
    "opt": tiny_opt,
    "bert": tiny_bert,
    "phi3": tiny_phi3,
    "mixtral": tiny_mixtral,
    "qwen2_moe": tiny_qwen2_moe,
    "qwen3_moe": tiny_qwen3_moe,
    "olmoe": tiny_olmoe,
    # dense decoder-only families (issue 10)
    "falcon": tiny_falcon,
    "falcon_40b": tiny_falcon_40b,
    "gptj": tiny_gptj,
    "phi": tiny_phi,
    "gpt_bigcode": tiny_gpt_bigcode,
    "gemma": tiny_gemma,
    "gemma2": tiny_gemma2,
    "gemma3_text": tiny_gemma3,
    "qwen3": tiny_qwen3,
    "olmo2": tiny_olmo2,
    "stablelm": tiny_stablelm,
    # encoders and encoder-decoders
    "BertModel": tiny_bert_model,
    "roberta": tiny_roberta,
    "XLMRobertaModel": tiny_xlm_roberta_model,
    "t5": tiny_t5,
    "t5_gated": tiny_t5_gated,
    "bart": tiny_bart,
}
"""Builder of a tiny model per family, by name (the adapter's, or the architecture's)."""
