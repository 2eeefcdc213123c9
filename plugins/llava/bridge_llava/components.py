"""Component kinds for LLaVA: the CLIP vision tower, its layers, and the projector.

The tower and its layers know their own structure (the parts below), so a spec only has to say
where the tower is; a spec that lists ``submodules`` of its own replaces the parts it names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from bridge_core.components import (
    AttentionBridge,
    GeneralizedComponent,
    MLPBridge,
    ModuleBridge,
    NormalizationBridge,
)
from bridge_core.components.base import Shape
from bridge_core.errors import InputError
from bridge_core.hooks import Handle, HookPoint, Run, first_tensor, mark_tap, replace_first
from bridge_core.multimodal import ImageLayout, LayoutRequest, VisionRoute
from bridge_llava import layout, vision
from bridge_llava.vision import FeatureLayer, ImageTokens, Strategy

Child = GeneralizedComponent | nn.ModuleList


@dataclass(frozen=True)
class Part:
    """A child component a kind builds by default: its class, candidate paths and options."""

    cls: type[GeneralizedComponent]
    paths: tuple[str, ...]
    options: Mapping[str, Any] = field(default_factory=dict)


class PartsComponent(GeneralizedComponent):
    """A component that builds its own children (`parts`) unless the spec gives them."""

    parts: ClassVar[dict[str, Part]] = {}

    def set_original_component(self, module: nn.Module) -> None:
        """Build the missing parts over `module`'s submodules, then bind as usual.

        Raises:
            AttributeError: no candidate path of a part exists in `module`.
        """
        given = {
            key: child
            for key, child in self.named_children()
            if isinstance(child, GeneralizedComponent | nn.ModuleList)
        }
        for key in given:  # re-added below in forward order: the parts first, then extras
            delattr(self, key)
        for key, part in self.parts.items():
            child = given.pop(key, None)
            self.add_module(key, child if child is not None else self._build(key, part, module))
        for key, child in given.items():
            self.add_module(key, child)
        super().set_original_component(module)

    def _build(self, key: str, part: Part, module: nn.Module) -> Child:
        target = _resolve(module, part.paths, f"{self.name}.{key}")
        name = f"{self.name}.{key}"
        if not part.cls.is_list_item:
            return self._make(part, target, name)
        if not isinstance(target, nn.ModuleList | nn.Sequential):
            raise TypeError(
                f"{name}: {part.cls.__name__} is a list of layers, but "
                f"{type(target).__name__} is not a ModuleList"
            )
        return nn.ModuleList(self._make(part, item, f"{name}.{i}") for i, item in enumerate(target))

    def _make(self, part: Part, module: nn.Module, name: str) -> GeneralizedComponent:
        component = part.cls(name, config=self.config, options=part.options)
        component.set_original_component(module)
        return component


def _resolve(module: nn.Module, paths: Sequence[str], name: str) -> nn.Module:
    for path in paths:
        try:
            return module.get_submodule(path)
        except AttributeError:
            continue
    raise AttributeError(
        f"{name}: none of the paths {list(paths)} exists in {type(module).__name__}"
    )


class CLIPVisionEncoderLayerBridge(PartsComponent):
    """One CLIP encoder layer: layer_norm1, attn (HF's self_attn), layer_norm2, mlp.

    ``hook_in`` / ``hook_out`` are the residual stream before / after the layer, i.e.
    ``hidden_states[i]`` / ``hidden_states[i + 1]`` of the tower's output. The attention is
    the core ``attention`` kind, so ``attn.hook_q/k/v/z`` are per head and
    ``attn.hook_pattern`` / ``hook_attn_scores`` are ``[batch, head, patch, patch]``.
    """

    is_list_item: ClassVar[bool] = True
    hook_aliases: ClassVar[dict[str, str]] = {
        "hook_attn_in": "attn.hook_in",
        "hook_attn_out": "attn.hook_out",
        "hook_mlp_in": "mlp.hook_in",
        "hook_mlp_out": "mlp.hook_out",
        "hook_resid_post": "hook_out",
        "hook_resid_pre": "hook_in",
    }
    parts: ClassVar[dict[str, Part]] = {
        "layer_norm1": Part(NormalizationBridge, ("layer_norm1",)),
        "attn": Part(
            AttentionBridge,
            ("self_attn",),
            {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj", "rotary": False},
        ),
        "layer_norm2": Part(NormalizationBridge, ("layer_norm2",)),
        "mlp": Part(MLPBridge, ("mlp",), {"in": "fc1", "out": "fc2"}),
    }

    @property
    def self_attn(self) -> GeneralizedComponent:
        """The attention component under its HF name (the same object as ``attn``)."""
        attn = self.get_submodule("attn")
        if not isinstance(attn, GeneralizedComponent):
            raise TypeError(f"{self.name}.attn is a {type(attn).__name__}, not a component")
        return attn


@dataclass(frozen=True)
class TowerOutputTap:
    """The last hidden state a vision tower returns.

    An edit replaces ``last_hidden_state`` and, where it is the same tensor,
    ``hidden_states[-1]``, so that a model selecting the last layer's features sees it.
    """

    module: nn.Module

    def attach(self, run: Run) -> Handle:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            old = first_tensor(output)
            new = run(old)
            if new is old:
                return None
            hidden = getattr(output, "hidden_states", None)
            if isinstance(hidden, tuple) and hidden and hidden[-1] is old:
                output["hidden_states"] = (*hidden[:-1], new)
            return replace_first(output, new)

        return self.module.register_forward_hook(mark_tap(hook), prepend=True)


class CLIPVisionEncoderBridge(PartsComponent):
    """The whole CLIP vision tower: embeddings, pre_layernorm, layers[], post_layernorm.

    ``hook_in`` is ``pixel_values``; ``hook_out`` (alias ``hook_vision_out``) the tower's last
    hidden state ``[batch, num_patches + 1, hidden]``; ``embeddings.hook_out`` (alias
    ``hook_vision_embed``) the patch + position embeddings before ``pre_layrnorm``. Works with
    the transformers 5 layout (parts directly on the tower) and the 4.x one (under
    ``vision_model``). It also offers LLaVA's feature selection (`feature_select`,
    `encode_images`) and where the image tokens sit in the language-model sequence.
    """

    hook_aliases: ClassVar[dict[str, str]] = {
        "hook_vision_embed": "embeddings.hook_out",
        "hook_vision_out": "hook_out",
    }
    input_arg: ClassVar[str] = "pixel_values"
    hook_shapes: ClassVar[dict[str, Shape]] = {
        "hook_in": ("images", "channels", "height", "width"),
        "hook_out": ("batch", "pos", "d_model"),
    }
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

    def bind(self, module: nn.Module) -> None:
        """Bind ``hook_out`` to the tower's last hidden state (see `TowerOutputTap`)."""
        self.hook_out.bind(TowerOutputTap(module))
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

    def forward(self, pixel_values: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Run the tower on ``[batch, channels, height, width]`` images.

        Args:
            **kwargs: passed to the HF tower (e.g. ``interpolate_pos_encoding=True``).

        Returns:
            The last hidden state ``[batch, num_patches + 1, hidden]``.

        Raises:
            InputError: `pixel_values` has the wrong shape or number of channels.
        """
        size = None if kwargs.get("interpolate_pos_encoding") else self.image_size
        vision.check_pixel_values(pixel_values, self.num_channels, size)
        return first_tensor(self.tower(pixel_values, **kwargs))

    # -- the tower's facts -----------------------------------------------------------------

    @property
    def tower(self) -> nn.Module:
        """The HF vision tower."""
        if self.original_component is None:
            raise RuntimeError(f"component {self.name!r} is not attached to an HF module")
        return self.original_component

    @property
    def vision_config(self) -> Any:
        """The HF config of the tower (a CLIPVisionConfig)."""
        return self.tower.config

    @property
    def num_layers(self) -> int:
        """Number of encoder layers."""
        layers = self.get_submodule("layers")
        if not isinstance(layers, nn.ModuleList):
            raise TypeError(f"{self.name}.layers is a {type(layers).__name__}, not a ModuleList")
        return len(layers)

    @property
    def image_size(self) -> int:
        """Side of the square images the tower takes."""
        return int(self.vision_config.image_size)

    @property
    def patch_size(self) -> int:
        """Side of one patch."""
        return int(self.vision_config.patch_size)

    @property
    def num_channels(self) -> int:
        """Colour channels of ``pixel_values``."""
        return int(getattr(self.vision_config, "num_channels", 3))

    @property
    def num_patches(self) -> int:
        """Patches per image, ``(image_size // patch_size) ** 2`` (the CLS token not counted)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def hidden_size(self) -> int:
        """Width of the tower's hidden states."""
        return int(self.vision_config.hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the tower's weights."""
        return next(self.tower.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Device of the tower's weights."""
        return next(self.tower.parameters()).device

    @property
    def dummy_feature(self) -> torch.Tensor:
        """A zero feature ``[1, hidden_size]`` (LLaVA's stand-in for a missing image)."""
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    # -- LLaVA's settings ------------------------------------------------------------------

    @property
    def vision_feature_layer(self) -> FeatureLayer:
        """The hidden state(s) LLaVA feeds the projector (the model's config; default -2)."""
        layer = getattr(self.config, "vision_feature_layer", None)
        return -2 if layer is None else layer

    @property
    def vision_feature_select_strategy(self) -> Strategy:
        """The feature strategy: "default" drops the CLS token, "full" keeps it (from config)."""
        strategy = getattr(self.config, "vision_feature_select_strategy", None)
        return vision.check_strategy(strategy or "default")

    @property
    def image_token_id(self) -> int | None:
        """The id of the image placeholder token in the language model, if known."""
        token = getattr(self.config, "image_token_id", None)
        return None if token is None else int(token)

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

    @property
    def selected_hook_names(self) -> list[str]:
        """The hook names of the hidden state(s) LLaVA feeds the projector.

        Hidden state 0 is ``layers.0.hook_resid_pre``, hidden state i the output of layer
        i - 1 (``layers.{i-1}.hook_resid_post``); with the usual ``vision_feature_layer=-2``,
        the output of the second-to-last layer.
        """
        return vision.feature_hook_names(
            f"{self.name}.layers", self.vision_feature_layer, self.num_layers
        )

    # -- features --------------------------------------------------------------------------

    def feature_select(
        self,
        vision_outputs: Any,
        layer: FeatureLayer | None = None,
        strategy: Strategy | None = None,
    ) -> torch.Tensor:
        """Select the features LLaVA projects from the tower's output.

        Args:
            vision_outputs: the tower's output computed with ``output_hidden_states=True``
                (or its tuple of hidden states).
            layer: hidden-state index or indices (concatenated); default the model's
                ``vision_feature_layer``.
            strategy: "default" drops the CLS token, "full" keeps it; default the model's.

        Returns:
            ``[batch, num_patches (+1), hidden_size * number of layers]``

        Raises:
            InputError: no hidden states, or a layer index out of range.
        """
        return vision.select_features(
            vision.hidden_states_of(vision_outputs),
            self.vision_feature_layer if layer is None else layer,
            vision.check_strategy(strategy or self.vision_feature_select_strategy),
            self.num_layers,
        )

    def encode_images(
        self, images: torch.Tensor | Sequence[torch.Tensor], **kwargs: Any
    ) -> torch.Tensor | list[torch.Tensor]:
        """Run the tower and select features, as LLaVA does before its projector.

        Args:
            images: ``[batch, channels, height, width]`` pixel values, or a list of
                ``[channels, height, width]`` images (sizes may differ: position embeddings
                are interpolated for sizes other than `image_size`).
            **kwargs: passed to the HF tower.

        Returns:
            The selected features: one tensor for a batch, a list for a list.

        Raises:
            InputError: images that are not tensors of the expected shape.
        """
        if isinstance(images, torch.Tensor):
            vision.check_pixel_values(images, self.num_channels, None, "images")
            return self.feature_select(self._run(images, **kwargs))
        if isinstance(images, str | bytes) or not isinstance(images, Sequence) or not images:
            raise InputError(
                "encode_images takes pixel values [batch, channels, height, width] or a "
                f"non-empty list of [channels, height, width] tensors (got {images!r:.80})"
            )
        features = []
        for i, image in enumerate(images):
            if not isinstance(image, torch.Tensor):
                raise InputError(
                    f"encode_images got a list mixing tensors and {type(image).__name__} "
                    f"(item {i}); every item must be a [channels, height, width] tensor. "
                    "Preprocess PIL images with bridge.processor.image_processor first"
                )
            batch = image.unsqueeze(0) if image.dim() == 3 else image
            vision.check_pixel_values(batch, self.num_channels, None, f"images[{i}]")
            features.append(self.feature_select(self._run(batch, **kwargs)))
        return features

    def _run(self, pixel_values: torch.Tensor, **kwargs: Any) -> Any:
        if pixel_values.shape[-2:] != (self.image_size, self.image_size):
            kwargs.setdefault("interpolate_pos_encoding", True)
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        return self.tower(pixel_values, output_hidden_states=True, **kwargs)

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

    def dims(self) -> dict[str, int | None]:
        """The tower's own widths; batch (images or crops) and pos (patches) are free."""
        config = self.vision_config
        heads = int(config.num_attention_heads)
        return {
            "d_model": self.hidden_size,
            "n_heads": heads,
            "n_kv_heads": heads,
            "d_head": self.hidden_size // heads,
            "d_mlp": int(config.intermediate_size),
            "batch": None,
            "pos": None,
        }

    def unreachable_hooks(self) -> list[str]:
        """The layers after the last one LLaVA selects, and the pooled post-layernorm.

        Their edits cannot reach the language model: LLaVA projects ``hidden_states[i]`` for
        the selected ``i`` (``-2`` by default) and never the pooled output.
        """
        layers = self.vision_feature_layer
        selected = [layers] if isinstance(layers, int) else list(layers)
        last = max(i % (self.num_layers + 1) for i in selected)  # hidden_states index
        prefixes = [f"{self.name}.layers.{i}." for i in range(last, self.num_layers)]
        prefixes.append(f"{self.name}.post_layernorm.")
        names = [p.name for c in self.modules() if isinstance(c, GeneralizedComponent)
                 for _, p in c.own_hook_points()]  # fmt: skip
        dead = [n for n in names if n.startswith(tuple(prefixes))]
        if last < self.num_layers:
            dead.append(self.hook_out.name)  # the last hidden state, not selected
        return dead

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
            self._check_no_image_tokens(inputs)
            return
        if self.anyres and isinstance(pixel_values, torch.Tensor) and pixel_values.dim() == 5:
            pixel_values = pixel_values.flatten(0, 1)  # [batch, crops, ...] -> crops
        vision.check_pixel_values(pixel_values, self.num_channels, self.image_size)
        token = self.image_token_id
        if self.anyres or token is None or not isinstance(ids, torch.Tensor):
            return  # any-resolution token counts depend on each image's size: HF checks them
        tokens_per_image = self.num_patches + (strategy == "full")
        vision.check_image_tokens(ids, token, pixel_values.shape[0], tokens_per_image)

    def _check_no_image_tokens(self, inputs: Mapping[str, Any]) -> None:
        ids, token = inputs.get("input_ids"), self.image_token_id
        if not isinstance(ids, torch.Tensor) or token is None:
            return
        if inputs.get("past_key_values") is not None or inputs.get("mm_encoder_outputs"):
            return
        found = int((ids == token).sum())
        if found:
            raise InputError(
                f"input_ids has {found} image tokens (id {token}) but no pixel_values were "
                "given; pass the images (pixel_values=... or images=[...] with text)"
            )


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
