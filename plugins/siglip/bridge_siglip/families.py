"""How each SigLIP family feeds images to its language model: layout, example inputs, checks.

A `Family` answers for the tower component (`SiglipVisionEncoderBridge` delegates to the one
its spec names): where each image's tokens sit and which patches and pixels they show
(`bridge_core.multimodal.ImageLayout`, built with `bridge_llava.layout`), which hook holds the
per-token features a patching sweep edits (`VisionRoute.feature_hooks`), what `verify` runs
on, and what to check before a forward.

- PaliGemma: one token per patch of the post-layernormed output, the image first.
- Gemma-3: the projector average-pools ``merge x merge`` patches into one token; the route's
  features are the pooled ones (``vision_projector.norm.hook_in``). Pan-and-scan crops are
  further tiles of the same image.
- Idefics3 / SmolVLM: tiles of the image plus a global view, each a run of tokens; a token is
  a 2 x 2 (``scale_factor``) pixel shuffle of patches (`bridge_siglip.idefics3`).
- LLaVA-OneVision: LLaVA-NeXT's any-resolution layout on a tower without CLS.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from bridge_core.errors import InputError
from bridge_core.multimodal import ImageLayout, LayoutRequest, VisionRoute
from bridge_llava import layout, vision
from bridge_llava.layout import Tower as TowerSpec
from bridge_llava.tower import VisionTowerBridge


@dataclass(frozen=True)
class Family:
    """The image handling of one family (the default: PaliGemma's)."""

    name: ClassVar[str] = "paligemma"
    pixel_dims: ClassVar[int] = 4  # pixel_values: [images, channels, height, width]

    def route(self, tower: VisionTowerBridge) -> VisionRoute:
        """The vision layers, the per-token features and the projector."""
        return VisionRoute(
            stack=f"{tower.name}.layers",
            feature_hooks=tuple(tower.selected_hook_names),
            projector=_projector(tower),
        )

    def layout(self, tower: VisionTowerBridge, request: LayoutRequest) -> ImageLayout | None:
        """One tile per image, a token per patch (or pooled patches), the resize inverted."""
        spec = self.tower_spec(tower, request)
        return None if spec is None else layout.build_layout(spec, request)

    def tower_spec(self, tower: VisionTowerBridge, request: LayoutRequest) -> TowerSpec | None:
        """What the layout needs to know of the tower (None: the model names no image token)."""
        token = tower.image_token_id
        if token is None:
            return None
        return layout.Tower(
            tower.image_size,
            tower.patch_size,
            token,
            "full",
            False,
            self.route(tower),
            class_tokens=0,
            merge=self.merge(request.hf_config, tower),
        )

    def merge(self, hf_config: Any, tower: VisionTowerBridge) -> int:
        """Patches per side that one language-model token pools."""
        return 1

    def tokens_per_image(self, tower: VisionTowerBridge) -> int | None:
        """Image tokens per image (or view), where it is fixed: one per patch."""
        return tower.num_patches

    def placeholder(self, processor: Any) -> str:
        """The text that marks an image in a prompt."""
        return str(processor.image_token)

    def example_inputs(
        self, tower: VisionTowerBridge, inputs: dict[str, Any], processor: Any
    ) -> dict[str, Any]:
        """One image per row, through the processor in the family's prompt format.

        Raises:
            InputError: no processor.
        """
        if processor is None:
            raise InputError(
                f"{tower.name}: example inputs for {self.name} need the model's processor "
                "(its prompt format); wrap(model, processor=...) or pass inputs= with "
                "pixel_values"
            )
        rows = inputs["input_ids"].shape[0]
        images = [[vision.example_image(2 * tower.image_size, i)] for i in range(rows)]
        texts = [f"{self.placeholder(processor)} a picture number {i}" for i in range(rows)]
        encoded = dict(processor(text=texts, images=images, return_tensors="pt", padding=True))
        encoded.pop("labels", None)  # PaliGemma's processor adds them; verify needs no loss
        return {**inputs, **encoded}

    def check_inputs(self, tower: VisionTowerBridge, inputs: Mapping[str, Any]) -> None:
        """Pixel values of the tower's size and, where fixed, the image-token count.

        Raises:
            InputError: naming what was expected.
        """
        pixel_values = inputs.get("pixel_values")
        if pixel_values is None:
            tower.check_no_image_tokens(inputs)
            return
        if isinstance(pixel_values, torch.Tensor) and pixel_values.dim() == self.pixel_dims == 5:
            pixel_values = pixel_values.flatten(0, 1)  # [batch, views, ...] -> views
        vision.check_pixel_values(pixel_values, tower.num_channels, tower.image_size)
        ids, token, per_image = inputs.get("input_ids"), tower.image_token_id, None
        if self.pixel_dims == 4:
            per_image = self.tokens_per_image(tower)
        if isinstance(ids, torch.Tensor) and token is not None and per_image is not None:
            vision.check_image_tokens(ids, token, pixel_values.shape[0], per_image)


def _projector(tower: VisionTowerBridge) -> str:
    return str(tower.options.get("projector", "vision_projector"))


@dataclass(frozen=True)
class Gemma3(Family):
    """Gemma-3: pooled tokens; pan-and-scan crops as further tiles of their image."""

    name: ClassVar[str] = "gemma3"

    def route(self, tower: VisionTowerBridge) -> VisionRoute:
        projector = _projector(tower)
        return VisionRoute(f"{tower.name}.layers", (f"{projector}.norm.hook_in",), projector)

    def merge(self, hf_config: Any, tower: VisionTowerBridge) -> int:
        tokens = getattr(hf_config, "mm_tokens_per_image", None)
        side = tower.image_size // tower.patch_size
        return side // math.isqrt(int(tokens)) if tokens else 1

    def tokens_per_image(self, tower: VisionTowerBridge) -> int | None:
        return None  # the config's mm_tokens_per_image; HF checks the count

    def placeholder(self, processor: Any) -> str:
        return str(processor.boi_token)

    def layout(self, tower: VisionTowerBridge, request: LayoutRequest) -> ImageLayout | None:
        from bridge_siglip import gemma3

        spec = self.tower_spec(tower, request)
        return None if spec is None else gemma3.build_layout(spec, request)


@dataclass(frozen=True)
class Idefics3(Family):
    """Idefics3 / SmolVLM: tiles and a global view, pixel-shuffled tokens."""

    name: ClassVar[str] = "idefics3"
    pixel_dims: ClassVar[int] = 5  # [batch, views, channels, height, width]

    def route(self, tower: VisionTowerBridge) -> VisionRoute:
        projector = _projector(tower)
        return VisionRoute(
            f"{tower.name}.layers", (f"{projector}.modality_projection.hook_in",), projector
        )

    def layout(self, tower: VisionTowerBridge, request: LayoutRequest) -> ImageLayout | None:
        from bridge_siglip import idefics3

        token = tower.image_token_id
        if token is None:
            return None
        return idefics3.build_layout(tower, token, self.route(tower), request)


@dataclass(frozen=True)
class LlavaOnevision(Family):
    """LLaVA-OneVision: LLaVA-NeXT's any-resolution layout on SigLIP."""

    name: ClassVar[str] = "llava_onevision"
    pixel_dims: ClassVar[int] = 5

    def route(self, tower: VisionTowerBridge, layer: Any = None) -> VisionRoute:
        chosen = tower.vision_feature_layer if layer is None else layer
        return VisionRoute(
            f"{tower.name}.layers", tuple(tower.feature_hook_names(chosen)), _projector(tower)
        )

    def layout(self, tower: VisionTowerBridge, request: LayoutRequest) -> ImageLayout | None:
        token = tower.image_token_id
        if token is None:
            return None
        inputs = request.inputs
        given = inputs.get("vision_feature_select_strategy")
        strategy = vision.check_strategy(given or tower.vision_feature_select_strategy)
        ratio = getattr(request.hf_config, "vision_aspect_ratio", None) or "anyres_max_9"
        spec = layout.Tower(
            tower.image_size,
            tower.patch_size,
            token,
            strategy,
            True,
            self.route(tower, inputs.get("vision_feature_layer")),
            class_tokens=0,
            max_crops=int(str(ratio).removeprefix("anyres_max_")),
        )
        return layout.build_layout(spec, request)

    def check_inputs(self, tower: VisionTowerBridge, inputs: Mapping[str, Any]) -> None:
        layer = inputs.get("vision_feature_layer")
        chosen = tower.vision_feature_layer if layer is None else layer
        if chosen is not None:
            vision.check_feature_layer(chosen, tower.num_layers)
        given = inputs.get("vision_feature_select_strategy")
        vision.check_strategy(given or tower.vision_feature_select_strategy)
        super().check_inputs(tower, inputs)


FAMILIES: dict[str, Family] = {
    family.name: family for family in (Family(), Gemma3(), Idefics3(), LlavaOnevision())
}
"""The families by the name a spec gives as the tower's ``layout`` option."""


def family_named(name: Any) -> Family:
    """The family a spec names.

    Raises:
        ValueError: an unknown name, naming the known ones.
    """
    if isinstance(name, str) and name in FAMILIES:
        return FAMILIES[name]
    raise ValueError(
        f"options.layout must name how the model lays out its images, one of "
        f"{sorted(FAMILIES)} (got {name!r})"
    )
