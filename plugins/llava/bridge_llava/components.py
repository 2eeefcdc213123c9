"""Component kinds for LLaVA: the CLIP vision tower, its layers, and the projector.

The tower and its layers know their own structure (the parts below), so a spec only has to say
where the tower is; a spec that lists ``submodules`` of its own replaces the parts it names.
What CLIP shares with other ViT towers (the parts mechanism, the layer, the output tap, feature
selection) is in `bridge_llava.tower`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from bridge_core.components import GeneralizedComponent, ModuleBridge, NormalizationBridge
from bridge_core.components.base import Shape
from bridge_core.errors import InputError
from bridge_core.hooks import HookPoint
from bridge_core.multimodal import ImageLayout, LayoutRequest, VisionRoute
from bridge_llava import layout, vision
from bridge_llava.tower import (
    Part,
    PartsComponent,
    TowerOutputTap,
    VisionEncoderLayerBridge,
    VisionTowerBridge,
)
from bridge_llava.vision import FeatureLayer, ImageTokens

__all__ = [
    "CLIPVisionEncoderBridge",
    "CLIPVisionEncoderLayerBridge",
    "KINDS",
    "Part",
    "PartsComponent",
    "TowerOutputTap",
    "VisionProjectorBridge",
]


class CLIPVisionEncoderLayerBridge(VisionEncoderLayerBridge):
    """One CLIP encoder layer: layer_norm1, attn (HF's self_attn), layer_norm2, mlp.

    ``hook_in`` / ``hook_out`` are the residual stream before / after the layer, i.e.
    ``hidden_states[i]`` / ``hidden_states[i + 1]`` of the tower's output. The attention is
    the core ``attention`` kind, so ``attn.hook_q/k/v/z`` are per head and
    ``attn.hook_pattern`` / ``hook_attn_scores`` are ``[batch, head, patch, patch]``.
    """


class CLIPVisionEncoderBridge(VisionTowerBridge):
    """The whole CLIP vision tower: embeddings, pre_layernorm, layers[], post_layernorm.

    ``hook_in`` is ``pixel_values``; ``hook_out`` (alias ``hook_vision_out``) the tower's last
    hidden state ``[batch, num_patches + 1, hidden]``; ``embeddings.hook_out`` (alias
    ``hook_vision_embed``) the patch + position embeddings before ``pre_layrnorm``. Works with
    the transformers 5 layout (parts directly on the tower) and the 4.x one (under
    ``vision_model``). It also offers LLaVA's feature selection (`feature_select`,
    `encode_images`) and where the image tokens sit in the language-model sequence.
    """

    class_tokens: ClassVar[int] = 1
    default_feature_layer: ClassVar[int | None] = -2
    parts: ClassVar[dict[str, Part]] = {
        "embeddings": Part(ModuleBridge, ("embeddings", "vision_model.embeddings")),
        "pre_layernorm": Part(NormalizationBridge, ("pre_layrnorm", "vision_model.pre_layrnorm")),
        "layers": Part(
            CLIPVisionEncoderLayerBridge, ("encoder.layers", "vision_model.encoder.layers")
        ),
        "post_layernorm": Part(
            NormalizationBridge, ("post_layernorm", "vision_model.post_layernorm")
        ),
    }

    def bind(self, module: torch.nn.Module) -> None:
        """Bind ``hook_out`` to the last hidden state; the post-layernorm sees the CLS only."""
        super().bind(module)
        post = self.get_submodule("post_layernorm")
        pooled: dict[str, Shape] = {  # it normalizes the pooled CLS token only
            "hook_in": ("batch", "d_model"),
            "hook_scale": ("batch", 1),
            "hook_normalized": ("batch", "d_model"),
            "hook_out": ("batch", "d_model"),
        }
        for attr, shape in pooled.items():
            point = getattr(post, attr, None)
            if isinstance(point, HookPoint):
                point.shape = shape

    # -- LLaVA's settings ------------------------------------------------------------------

    @property
    def vision_feature_layer(self) -> FeatureLayer:
        """The hidden state(s) LLaVA feeds the projector (the model's config; default -2)."""
        layer = getattr(self.config, "vision_feature_layer", None)
        return -2 if layer is None else layer

    @property
    def anyres(self) -> bool:
        """Whether images are tiled into several crops (LLaVA-NeXT), set by the spec."""
        return self.options.get("image_tiling") == "anyres"

    @property
    def num_image_tokens(self) -> int | None:
        """Language-model tokens one image takes (None where it depends on the image size)."""
        if self.anyres:
            return None
        return self.num_patches + (self.vision_feature_select_strategy == "full")

    # -- where the image tokens are -------------------------------------------------------

    def image_token_positions(
        self, input_ids: torch.Tensor, image_token_id: int | None = None
    ) -> list[ImageTokens]:
        """Where each image's tokens sit in the language-model sequence, row by row.

        Works with left and right padding alike (the tokens are found, not assumed).

        Args:
            input_ids: ``[batch, pos]`` ids with the image tokens expanded (as the processor
                makes them).
            image_token_id: default the model's.

        Returns:
            One `ImageTokens` (``image``, ``batch``, ``positions``) per image, in the order
            the model fills in image features.
        """
        token = image_token_id if image_token_id is not None else self.image_token_id
        if token is None:
            raise InputError("this model's config names no image token; pass image_token_id=")
        return vision.image_token_positions(input_ids, token, self.num_image_tokens)

    # -- what verify needs -------------------------------------------------------------------

    def example_inputs(self, inputs: dict[str, Any], processor: Any = None) -> dict[str, Any]:
        """Put one image (and its image tokens) in each row of `inputs`.

        With the model's processor, through it (any-resolution crops included); without, as
        pixel values of the tower's size (plain LLaVA only).

        Raises:
            InputError: an any-resolution model without a processor.
        """
        ids: torch.Tensor = inputs["input_ids"]
        if processor is not None and hasattr(processor, "image_token"):
            images = [vision.example_image(2 * self.image_size, i) for i in range(ids.shape[0])]
            texts = [f"{processor.image_token} a picture number {i}" for i in range(len(images))]
            encoded = processor(text=texts, images=images, return_tensors="pt", padding=True)
            return {**inputs, **dict(encoded)}
        if self.anyres or self.num_image_tokens is None or self.image_token_id is None:
            raise InputError(
                f"{self.name}: example inputs for an any-resolution model need its processor; "
                "wrap(model, processor=...) or pass inputs= with pixel_values"
            )
        tokens = torch.full((ids.shape[0], self.num_image_tokens), self.image_token_id)
        ids = torch.cat([ids[:, :1], tokens, ids[:, 1:]], dim=1)
        size = (ids.shape[0], self.num_channels, self.image_size, self.image_size)
        pixels = torch.randn(size, generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        return {**inputs, "input_ids": ids, "attention_mask": mask, "pixel_values": pixels}

    def image_layout(self, request: LayoutRequest) -> ImageLayout | None:
        """Each image's tokens, patch grid(s) and pixel boxes (see `bridge_llava.layout`).

        Raises:
            InputError: image tokens that do not match the images.
        """
        token = self.image_token_id
        if token is None:
            return None
        inputs = request.inputs
        layer = inputs.get("vision_feature_layer")
        given = inputs.get("vision_feature_select_strategy")
        strategy = vision.check_strategy(given or self.vision_feature_select_strategy)
        route = VisionRoute(
            stack=f"{self.name}.layers",
            feature_hooks=tuple(
                vision.feature_hook_names(
                    f"{self.name}.layers",
                    self.vision_feature_layer if layer is None else layer,
                    self.num_layers,
                )
            ),
            projector=str(self.options.get("projector", "vision_projector")),
            skip_tokens=1 if strategy == "default" else 0,
        )
        tower = layout.Tower(self.image_size, self.patch_size, token, strategy, self.anyres, route)
        return layout.build_layout(tower, request)

    # -- input checks (called by the bridge before every forward) ----------------------

    def check_inputs(self, inputs: Mapping[str, Any]) -> None:
        """Check pixel values, feature selection and image-token count before LLaVA runs.

        Raises:
            InputError: naming what was expected.
        """
        layer = inputs.get("vision_feature_layer")
        vision.check_feature_layer(
            self.vision_feature_layer if layer is None else layer, self.num_layers
        )
        given = inputs.get("vision_feature_select_strategy")
        strategy = vision.check_strategy(given or self.vision_feature_select_strategy)
        pixel_values = inputs.get("pixel_values")
        ids = inputs.get("input_ids")
        if pixel_values is None:
            self.check_no_image_tokens(inputs)
            return
        if self.anyres and isinstance(pixel_values, torch.Tensor) and pixel_values.dim() == 5:
            pixel_values = pixel_values.flatten(0, 1)  # [batch, crops, ...] -> crops
        vision.check_pixel_values(pixel_values, self.num_channels, self.image_size)
        token = self.image_token_id
        if self.anyres or token is None or not isinstance(ids, torch.Tensor):
            return  # any-resolution token counts depend on each image's size: HF checks them
        tokens_per_image = self.num_patches + (strategy == "full")
        vision.check_image_tokens(ids, token, pixel_values.shape[0], tokens_per_image)


class VisionProjectorBridge(GeneralizedComponent):
    """LLaVA's multi-modal projector.

    ``hook_in`` is the selected vision features ``[images (or crops), tokens, vision hidden *
    layers]``, ``hook_out`` the projected ones ``[..., d_model]`` that replace the image tokens
    in the language model's input.
    """

    input_arg: ClassVar[str] = "image_features"
    hook_shapes: ClassVar[dict[str, Shape]] = {
        "hook_in": ("images", "tokens", "features"),
        "hook_out": ("images", "tokens", "d_model"),
    }


KINDS: dict[str, type[GeneralizedComponent]] = {
    "clip_vision_encoder": CLIPVisionEncoderBridge,
    "clip_vision_encoder_layer": CLIPVisionEncoderLayerBridge,
    "vision_projector": VisionProjectorBridge,
}
