"""Vision towers (ViT encoders) as bridge components, shared by the vision-language plugins.

A tower kind knows its own structure: it builds its parts (`Part`: the patch embeddings, the
list of encoder layers, the norms) over the HF module, so a spec only says where the tower is.
`VisionTowerBridge` holds what every ViT tower has (its facts, the feature selection of
LLaVA-style models, what `verify` needs); `bridge_llava.components` makes CLIP of it, and
other plugins (``bridge_siglip``) make SigLIP of it. The layers of CLIP, SigLIP and Idefics3
have the same parts under the same names, so one layer kind serves them all.
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
    NormalizationBridge,
)
from bridge_core.components.base import Shape
from bridge_core.errors import InputError
from bridge_core.hooks import (
    Handle,
    Run,
    first_tensor,
    replace_first,
)
from bridge_core.torch_hooks import forward_hook
from bridge_llava import vision
from bridge_llava.vision import FeatureLayer, Strategy

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


class VisionEncoderLayerBridge(PartsComponent):
    """One ViT encoder layer: layer_norm1, attn (HF's self_attn), layer_norm2, mlp.

    CLIP, SigLIP and Idefics3 name these parts alike. ``hook_in`` / ``hook_out`` are the
    residual stream before / after the layer, i.e. ``hidden_states[i]`` /
    ``hidden_states[i + 1]`` of the tower's output. The attention is the core ``attention``
    kind, so ``attn.hook_q/k/v/z`` are per head and ``attn.hook_pattern`` /
    ``hook_attn_scores`` are ``[batch, head, patch, patch]``.
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

        return forward_hook(self.module, hook)


class TowerComponent(PartsComponent):
    """A component over an HF vision tower: the tower and its config (every plugin's tower
    bridge derives from it)."""

    @property
    def tower(self) -> nn.Module:
        """The HF vision tower."""
        if self.original_component is None:
            raise RuntimeError(f"component {self.name!r} is not attached to an HF module")
        return self.original_component

    @property
    def vision_config(self) -> Any:
        """The HF config of the tower (a CLIPVisionConfig, SiglipVisionConfig ...)."""
        return self.tower.config


class VisionTowerBridge(TowerComponent):
    """A ViT vision tower: its facts, the features a VLM takes from it, what verify needs.

    ``hook_in`` is ``pixel_values``; ``hook_out`` (alias ``hook_vision_out``) the tower's last
    hidden state ``[batch, tokens, hidden]``; ``embeddings.hook_out`` (alias
    ``hook_vision_embed``) the patch + position embeddings. Subclasses give the `parts`, the
    number of class tokens in front of the patches (`class_tokens`), and which hidden state a
    model feeds its projector when its config does not say (`default_feature_layer`; None
    means the tower's output, ``last_hidden_state``).
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
    class_tokens: ClassVar[int] = 0
    default_feature_layer: ClassVar[int | None] = None
    output_is_normalized: ClassVar[bool] = False
    """Whether ``last_hidden_state`` is the post-layernorm of the last layer's output (SigLIP),
    not that output itself (CLIP, whose post-layernorm sees the pooled CLS token only)."""

    def bind(self, module: nn.Module) -> None:
        """Bind ``hook_out`` to the tower's last hidden state (see `TowerOutputTap`)."""
        self.hook_out.bind(TowerOutputTap(module))

    def forward(self, pixel_values: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Run the tower on ``[batch, channels, height, width]`` images.

        Args:
            **kwargs: passed to the HF tower (e.g. ``interpolate_pos_encoding=True``).

        Returns:
            The last hidden state ``[batch, tokens, hidden]``.

        Raises:
            InputError: `pixel_values` has the wrong shape or number of channels.
        """
        size = None if kwargs.get("interpolate_pos_encoding") else self.image_size
        vision.check_pixel_values(pixel_values, self.num_channels, size)
        return first_tensor(self.tower(pixel_values, **kwargs))

    # -- the tower's facts -----------------------------------------------------------------

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
        """Patches per image, ``(image_size // patch_size) ** 2`` (class tokens not counted)."""
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

    @property
    def image_token_id(self) -> int | None:
        """The id of the image placeholder token in the language model, if known."""
        token = getattr(self.config, "image_token_id", None)
        return None if token is None else int(token)

    # -- which features the model takes --------------------------------------------------

    @property
    def vision_feature_layer(self) -> FeatureLayer | None:
        """The hidden state(s) the model feeds its projector: the config's, else the kind's
        default; None for the tower's output (``last_hidden_state``)."""
        layer = getattr(self.config, "vision_feature_layer", None)
        return self.default_feature_layer if layer is None else layer

    @property
    def vision_feature_select_strategy(self) -> Strategy:
        """The feature strategy: "default" drops the first token, "full" keeps it (config)."""
        strategy = getattr(self.config, "vision_feature_select_strategy", None)
        return vision.check_strategy(strategy or "default")

    @property
    def selected_hook_names(self) -> list[str]:
        """The hook names of the hidden state(s) the model feeds its projector.

        Hidden state 0 is ``layers.0.hook_resid_pre``, hidden state i the output of layer
        i - 1 (``layers.{i-1}.hook_resid_post``); with the usual ``vision_feature_layer=-2``,
        the output of the second-to-last layer. A model that takes the tower's output
        (``vision_feature_layer`` None) gets ``hook_out``.
        """
        return self.feature_hook_names(self.vision_feature_layer)

    def feature_hook_names(self, layer: FeatureLayer | None) -> list[str]:
        """The hook names of hidden state(s) `layer` (None: the tower's output)."""
        if layer is None:
            return [self.hook_out.name]
        return vision.feature_hook_names(f"{self.name}.layers", layer, self.num_layers)

    def feature_select(
        self,
        vision_outputs: Any,
        layer: FeatureLayer | None = None,
        strategy: Strategy | None = None,
    ) -> torch.Tensor:
        """Select the features the model projects from the tower's output.

        Args:
            vision_outputs: the tower's output computed with ``output_hidden_states=True``
                (or its tuple of hidden states).
            layer: hidden-state index or indices (concatenated); default the model's
                ``vision_feature_layer``.
            strategy: "default" drops the first (CLS) token, "full" keeps it; default the
                model's.

        Returns:
            ``[batch, tokens, hidden_size * number of layers]``; a model that takes the
            tower's output gets ``last_hidden_state`` when `layer` is not given.

        Raises:
            InputError: no hidden states, or a layer index out of range.
        """
        chosen = self.vision_feature_layer if layer is None else layer
        if chosen is None:
            return _last_hidden_state(vision_outputs)
        return vision.select_features(
            vision.hidden_states_of(vision_outputs),
            chosen,
            vision.check_strategy(strategy or self.vision_feature_select_strategy),
            self.num_layers,
        )

    def encode_images(
        self, images: torch.Tensor | Sequence[torch.Tensor], **kwargs: Any
    ) -> torch.Tensor | list[torch.Tensor]:
        """Run the tower and select features, as the model does before its projector.

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
        """The layers after the last one the model selects, and the post-layernorm.

        Their edits cannot reach the language model: the model projects ``hidden_states[i]``
        for the selected ``i`` (``-2`` for LLaVA) and never the post-layernorm's output. A
        model that takes the tower's output reaches it from everywhere.
        """
        layer = self.vision_feature_layer
        if layer is None:
            return []
        last = max(i % (self.num_layers + 1) for i in vision.layer_list(layer))  # hidden state
        prefixes = [f"{self.name}.layers.{i}." for i in range(last, self.num_layers)]
        prefixes.append(f"{self.name}.post_layernorm.")
        names = [p.name for c in self.modules() if isinstance(c, GeneralizedComponent)
                 for _, p in c.own_hook_points()]  # fmt: skip
        dead = [n for n in names if n.startswith(tuple(prefixes))]
        if last < self.num_layers or self.output_is_normalized:
            dead.append(self.hook_out.name)  # the last hidden state, not selected
        return dead

    # -- input checks --------------------------------------------------------------------

    def check_no_image_tokens(self, inputs: Mapping[str, Any]) -> None:
        """Refuse image tokens in ``input_ids`` of a first forward without images.

        Raises:
            InputError: naming the count of image tokens found.
        """
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


def _last_hidden_state(vision_outputs: Any) -> torch.Tensor:
    state = getattr(vision_outputs, "last_hidden_state", vision_outputs)
    if not isinstance(state, torch.Tensor):
        raise InputError(
            "feature_select needs the vision tower's output (with its last_hidden_state)"
        )
    return state
