"""The SigLIP vision tower as a bridge component (kind ``siglip_vision_encoder``).

SigLIP is a ViT without a CLS token and without a pre-layernorm; its post-layernorm normalizes
every token, and most models feed that output (``last_hidden_state``) to their projector. The
tower is `bridge_llava.tower.VisionTowerBridge` with SigLIP's parts; Idefics3's tower (SigLIP
with NaViT-style position ids) has the same parts under the same names. How a model places the
tower's features in its language model's sequence differs by family: the spec names it with
the option ``layout`` (`bridge_siglip.families`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import nn

from bridge_core.components import GeneralizedComponent, ModuleBridge, NormalizationBridge
from bridge_core.components.base import Shape
from bridge_core.multimodal import ImageLayout, LayoutRequest
from bridge_llava.tower import Part, VisionEncoderLayerBridge, VisionTowerBridge
from bridge_siglip.families import FAMILIES, Family, family_named


class VisionEmbeddingsBridge(ModuleBridge):
    """Patch embeddings (a convolution) plus position embeddings: pixels in, tokens out."""

    input_arg: ClassVar[str] = "pixel_values"
    hook_shapes: ClassVar[dict[str, Shape]] = {
        "hook_in": ("images", "channels", "height", "width"),
        "hook_out": ("batch", "pos", "d_model"),
    }


class SiglipVisionEncoderBridge(VisionTowerBridge):
    """The SigLIP vision tower: embeddings, layers[], post_layernorm (no CLS, no pre-norm).

    ``hook_in`` is ``pixel_values`` (the images or tiles the tower runs on, in one batch);
    ``embeddings.hook_out`` (``hook_vision_embed``) the patch + position embeddings
    ``[images, patches, hidden]``; ``layers.{i}`` the encoder layers with the same names as
    CLIP's; ``hook_out`` (``hook_vision_out``) the post-layernormed last hidden state, which
    PaliGemma, Gemma-3 and Idefics3 project (LLaVA-OneVision takes a layer's output instead).

    Options:
        layout: the family whose image layout, example inputs and input checks apply
            (``paligemma``, ``gemma3``, ``idefics3``, ``llava_onevision``).
        projector: the component that projects the features (default ``vision_projector``).
    """

    required_options: ClassVar[tuple[str, ...]] = ("layout",)
    class_tokens: ClassVar[int] = 0
    default_feature_layer: ClassVar[int | None] = None
    output_is_normalized: ClassVar[bool] = True
    parts: ClassVar[dict[str, Part]] = {
        "embeddings": Part(VisionEmbeddingsBridge, ("embeddings", "vision_model.embeddings")),
        "layers": Part(VisionEncoderLayerBridge, ("encoder.layers", "vision_model.encoder.layers")),
        "post_layernorm": Part(
            NormalizationBridge, ("post_layernorm", "vision_model.post_layernorm")
        ),
    }

    def set_original_component(self, module: nn.Module) -> None:
        """Check the ``layout`` option, then build the parts and bind.

        Raises:
            ValueError: an unknown layout, naming the known ones.
        """
        family_named(self.options.get("layout"))
        super().set_original_component(module)

    @property
    def family(self) -> Family:
        """How this model feeds the tower's features to its language model."""
        return family_named(self.options.get("layout"))

    def image_layout(self, request: LayoutRequest) -> ImageLayout | None:
        """Each image's tokens, grid(s) and pixel boxes, as the family lays them out.

        Raises:
            InputError: image tokens that do not match the images.
        """
        return self.family.layout(self, request)

    def example_inputs(self, inputs: dict[str, Any], processor: Any = None) -> dict[str, Any]:
        """One image per row of `inputs`, made by the model's processor in its prompt format.

        Raises:
            InputError: no processor (the family's prompt format needs it).
        """
        return self.family.example_inputs(self, inputs, processor)

    def check_inputs(self, inputs: Mapping[str, Any]) -> None:
        """Check pixel values and image tokens before the model runs.

        Raises:
            InputError: naming what was expected.
        """
        self.family.check_inputs(self, inputs)


KINDS: dict[str, type[GeneralizedComponent]] = {"siglip_vision_encoder": SiglipVisionEncoderBridge}

__all__ = ["FAMILIES", "KINDS", "SiglipVisionEncoderBridge", "VisionEmbeddingsBridge"]
