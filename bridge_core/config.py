"""TransformerBridgeConfig: the TransformerLens-style facts about a bridged model."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, PositiveFloat, PositiveInt, model_validator


class TransformerBridgeConfig(BaseModel):
    """Dimensions and conventions of a bridged model, derived from its HF config by the adapter.

    Field names follow TransformerLens (``d_model``, ``n_layers``, ``n_heads`` ...). Fields
    that do not apply to an architecture stay ``None``.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, defer_build=True)

    model_name: str | None = None
    architecture: str | None = None
    adapter: str | None = None

    d_model: PositiveInt
    n_layers: PositiveInt
    n_heads: PositiveInt
    d_head: PositiveInt | None = None
    n_key_value_heads: PositiveInt | None = None
    d_mlp: PositiveInt | None = None
    d_vocab: PositiveInt | None = None
    n_ctx: PositiveInt | None = None
    act_fn: str | None = None
    eps: PositiveFloat | None = None
    normalization_type: Literal["LN", "RMS"] | None = None
    positional_embedding_type: Literal["standard", "rotary", "alibi", "relative", "none"] = (
        "standard"
    )
    rotary_base: PositiveFloat | None = None
    tie_word_embeddings: bool | None = None
    num_experts: PositiveInt | None = None
    """Experts per sparse MoE layer (TransformerLens's name)."""
    experts_per_token: PositiveInt | None = None
    """Experts each token is routed to, the router's top-k (TransformerLens's name)."""
    default_prepend_bos: bool = True
    """Whether text gets a BOS token when ``prepend_bos`` is not given (TransformerLens's
    default: True; the model's tokenizer may add it already)."""
    block_layout: Literal["pre_norm", "parallel", "post_norm"] = "pre_norm"
    """How a block adds to the residual stream (`verify` checks it): ``pre_norm``
    (``resid_mid = resid_pre + attn_out``, ``resid_post = resid_mid + mlp_out``), ``parallel``
    (``resid_post = resid_pre + attn_out + mlp_out``) or ``post_norm`` (BERT, with
    TransformerLens's names: ``resid_post = ln1(resid_mid) + mlp_out``)."""

    is_multimodal: bool = False
    vision_d_model: PositiveInt | None = None
    vision_n_layers: PositiveInt | None = None
    vision_n_heads: PositiveInt | None = None
    vision_d_mlp: PositiveInt | None = None
    vision_image_size: PositiveInt | None = None
    vision_patch_size: PositiveInt | None = None
    vision_feature_layer: int | list[int] | None = None
    vision_feature_select_strategy: Literal["default", "full"] | None = None
    image_token_id: int | None = None

    @model_validator(mode="after")
    def _derive_and_check(self) -> Self:
        if self.d_head is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"d_model must be divisible by n_heads when d_head is not given "
                    f"(got d_model={self.d_model}, n_heads={self.n_heads})"
                )
            object.__setattr__(self, "d_head", self.d_model // self.n_heads)
        if self.n_key_value_heads is None:
            object.__setattr__(self, "n_key_value_heads", self.n_heads)
        elif self.n_heads % self.n_key_value_heads:
            raise ValueError(
                f"n_heads must be a multiple of n_key_value_heads "
                f"(got n_heads={self.n_heads}, n_key_value_heads={self.n_key_value_heads})"
            )
        image, patch = self.vision_image_size, self.vision_patch_size
        if image and patch and image % patch:
            raise ValueError(
                f"vision_image_size must be divisible by vision_patch_size "
                f"(got vision_image_size={image}, vision_patch_size={patch})"
            )
        return self

    @property
    def parallel_attn_mlp(self) -> bool:
        """TransformerLens's name: attention and MLP read the same residual stream."""
        return self.block_layout == "parallel"

    @property
    def vision_num_patches(self) -> int | None:
        """Patches per image side squared, or None for a text-only model."""
        if self.vision_image_size is None or self.vision_patch_size is None:
            return None
        return (self.vision_image_size // self.vision_patch_size) ** 2
