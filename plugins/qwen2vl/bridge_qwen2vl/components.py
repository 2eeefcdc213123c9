"""Component kinds for Qwen2-VL and Qwen2.5-VL: the vision transformer, its blocks, the merger.

Qwen2-VL's vision tower takes every image of a forward at once, as one sequence of patches
without a batch dimension, so its activations are ``[patches, ...]``: the images' patches one
after the other, in the order of ``image_grid_thw`` (Qwen2.5-VL: in the order of its attention
windows, see `bridge_qwen2vl.layout`). The blocks run once per forward; only the attention
kernel runs once per image (Qwen2.5-VL: once per window in its windowed layers), so the
kernel's hook points (rotated q/k, scores, pattern) fire once per image or window. The vision
block reuses the LLaVA plugin's layer bridge (its aliases and the way it builds its parts).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from bridge_core.attention import PatternTap, Which
from bridge_core.components import (
    GeneralizedComponent,
    JointQKVAttentionBridge,
    MLPBridge,
    ModuleBridge,
    NormalizationBridge,
)
from bridge_core.components.base import Shape
from bridge_core.hooks import HookPoint
from bridge_core.multimodal import ImageLayout, LayoutRequest, VisionRoute
from bridge_core.views import Select, ViewTap
from bridge_llava.components import CLIPVisionEncoderLayerBridge, Part, PartsComponent
from bridge_llava.tower import TowerComponent
from bridge_qwen2vl import layout, vision

KERNEL_TAPS: dict[str, Which] = {
    "hook_rot_q": "rot_q",
    "hook_rot_k": "rot_k",
    "hook_attn_scores": "scores",
    "hook_pattern": "pattern",
}
PER_CALL = tuple(KERNEL_TAPS)
"""The attention's hook points that fire once per image (or window): the kernel's."""

TOKENS: Shape = ("patches", "d_model")
HEADS: Shape = ("patches", "n_heads", "d_head")


class QwenVisionAttentionBridge(JointQKVAttentionBridge):
    """Vision attention: fused ``qkv`` (``[q | k | v]``), 2-D rotary, output ``proj``.

    ``hook_q/k/v/z`` are ``[patches, head, d_head]`` over every image at once (q and k before
    the rotary embedding). The kernel runs once per image (or window), so ``hook_rot_q/k``
    (``[patches of the image, head, d_head]``) and ``hook_attn_scores`` / ``hook_pattern``
    (``[head, patches of the image, patches of the image]``) fire once per image: HF's kernel
    call has a batch of one, which these points leave out.
    """

    hook_shapes: ClassVar[dict[str, Shape]] = {
        "hook_in": TOKENS,
        "hook_q": HEADS,
        "hook_k": HEADS,
        "hook_v": HEADS,
        "hook_rot_q": ("seq", "n_heads", "d_head"),
        "hook_rot_k": ("seq", "n_heads", "d_head"),
        "hook_attn_scores": ("n_heads", "seq", "seq"),
        "hook_pattern": ("n_heads", "seq", "seq"),
        "hook_z": HEADS,
        "hook_result": ("patches", "n_heads", "d_model"),
        "hook_out": TOKENS,
    }

    def __init__(
        self,
        name: str,
        config: Any | None = None,
        submodules: Mapping[str, nn.Module] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        """Create the component; ``qkv``, ``o`` and ``rotary`` default to Qwen2-VL's."""
        given = {"qkv": "qkv", "o": "proj", "rotary": True, **(options or {})}
        super().__init__(name, config, submodules, given)

    def bind(self, module: nn.Module) -> None:
        """Bind as the fused-qkv kind; the kernel's points drop HF's batch of one."""
        super().bind(module)
        kernel = self.kernel(module)
        for attr, which in KERNEL_TAPS.items():
            point: HookPoint = getattr(self, attr)
            point.bind(ViewTap(PatternTap(kernel, which), (Select(0, 0),)))

    def dims(self) -> dict[str, int | None]:
        """Widths from the HF module itself (its config's ``hidden_size`` may be another's)."""
        values = super().dims()
        module = self.original_component
        if module is not None:
            heads = int(getattr(module, "num_heads"))  # noqa: B009 (an HF attribute)
            values.update(
                d_model=int(getattr(module, "dim")),  # noqa: B009
                n_heads=heads,
                n_kv_heads=heads,
                d_head=self.d_head(module),
            )
        return values


class QwenVisionBlockBridge(CLIPVisionEncoderLayerBridge):
    """One Qwen2-VL vision block: norm1, attn, norm2, mlp; the CLIP layer's aliases.

    ``hook_resid_pre`` / ``hook_resid_post`` are ``[patches, d_model]``; ``hook_resid_mid``
    (``norm2.hook_in``) is the stream between attention and MLP.
    """

    hook_aliases: ClassVar[dict[str, str]] = {
        **CLIPVisionEncoderLayerBridge.hook_aliases,
        "hook_resid_mid": "norm2.hook_in",
    }
    hook_shapes: ClassVar[dict[str, Shape]] = {"hook_in": TOKENS, "hook_out": TOKENS}
    parts: ClassVar[dict[str, Part]] = {
        "norm1": Part(NormalizationBridge, ("norm1",)),
        "attn": Part(QwenVisionAttentionBridge, ("attn",)),
        "norm2": Part(NormalizationBridge, ("norm2",)),
        "mlp": Part(MLPBridge, ("mlp",), {"in": "fc1", "out": "fc2"}),
    }


class Qwen25VisionBlockBridge(QwenVisionBlockBridge):
    """One Qwen2.5-VL vision block: as Qwen2-VL's, with RMSNorms and a gated MLP."""

    parts: ClassVar[dict[str, Part]] = {
        **QwenVisionBlockBridge.parts,
        "mlp": Part(
            MLPBridge, ("mlp",), {"gate": "gate_proj", "up": "up_proj", "out": "down_proj"}
        ),
    }


class QwenVisionEncoderBridge(TowerComponent):
    """Qwen2-VL's vision transformer: patch_embed, then the blocks as ``layers``.

    ``hook_in`` is ``pixel_values`` (``[patches, channels * temporal_patch * patch**2]``, as
    the processor flattens them); ``patch_embed.hook_out`` (alias ``hook_vision_embed``) the
    patch embeddings, the 3-D convolution of each patch; ``hook_out`` (alias
    ``hook_vision_out``) the last block's output as the tower returns it — the merger
    (`vision_projector`) has read it by then, so an edit there reaches nothing (edit
    ``layers.{n-1}.hook_resid_post``). Every hook point fires once per run of the tower (one
    for the images, one more for videos), except the attention kernel's, once per image.
    """

    hook_aliases: ClassVar[dict[str, str]] = {
        "hook_vision_embed": "patch_embed.hook_out",
        "hook_vision_out": "hook_out",
    }
    hook_shapes: ClassVar[dict[str, Shape]] = {
        "hook_in": ("patches", "d_patch"),
        "hook_out": TOKENS,
    }
    parts: ClassVar[dict[str, Part]] = {
        "patch_embed": Part(ModuleBridge, ("patch_embed",)),
        "layers": Part(QwenVisionBlockBridge, ("blocks",)),
    }
    windowed: ClassVar[bool] = False

    def set_original_component(self, module: nn.Module) -> None:
        """Build the parts, then declare each point's shape without a batch dimension, how
        often it fires and how a cache keeps its calls."""
        super().set_original_component(module)
        embed = self.get_submodule("patch_embed")
        for attr, shape in (("hook_in", ("patches", "d_patch")), ("hook_out", TOKENS)):
            point = getattr(embed, attr)
            if isinstance(point, HookPoint):
                point.shape = shape
        windowed = {f"{self.name}.layers.{i}" for i in self.windowed_layers}
        for component in self.modules():
            if not isinstance(component, GeneralizedComponent):
                continue
            in_window = component.name.rsplit(".", 1)[0] in windowed
            per_call = vision.PER_WINDOW if in_window else vision.PER_IMAGE
            for attr, point in component.own_hook_points():
                point.shape = _unbatched(point.shape)
                vision.declare(point, attr, per_call if attr in PER_CALL else None)

    # -- the tower's facts -----------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        """Number of vision blocks."""
        return int(self.vision_config.depth)

    @property
    def patch_size(self) -> int:
        """Side of one patch, in pixels of the resized image."""
        return int(self.vision_config.patch_size)

    @property
    def merge_size(self) -> int:
        """Side of the blocks of patches the merger turns into one language-model token (2)."""
        return int(self.vision_config.spatial_merge_size)

    @property
    def temporal_patch_size(self) -> int:
        """Frames per patch (an image is repeated to fill them)."""
        return int(self.vision_config.temporal_patch_size)

    @property
    def num_channels(self) -> int:
        """Colour channels."""
        return int(self.vision_config.in_channels)

    @property
    def hidden_size(self) -> int:
        """Width of the vision blocks."""
        return int(getattr(self.vision_config, "embed_dim", self.vision_config.hidden_size))

    @property
    def full_attention_layers(self) -> list[int]:
        """The layers that attend over each whole image (all of them in Qwen2-VL)."""
        return list(range(self.num_layers))

    @property
    def windowed_layers(self) -> list[int]:
        """The layers that attend within windows (none in Qwen2-VL)."""
        if not self.windowed:
            return []
        full = set(self.full_attention_layers)
        return [i for i in range(self.num_layers) if i not in full]

    @property
    def image_token_id(self) -> int | None:
        """The id of ``<|image_pad|>`` in the language model, if known."""
        token = getattr(self.config, "image_token_id", None)
        return None if token is None else int(token)

    @property
    def selected_hook_names(self) -> list[str]:
        """The hook name of the features the merger is fed: the last block's output."""
        return [f"{self.name}.layers.{self.num_layers - 1}.hook_resid_post"]

    def grid(self) -> vision.Grid:
        """How the tower cuts and merges images, and the order its sequence takes them in."""
        window = None
        if self.windowed:
            window = int(self.vision_config.window_size) // self.merge_size // self.patch_size
        return vision.Grid(self.patch_size, self.merge_size, self.temporal_patch_size, window)

    # -- what verify and the toolkit need -------------------------------------------------------

    def dims(self) -> dict[str, int | None]:
        """The tower's own widths; ``patches`` (and ``seq``, per image) are free."""
        heads = int(self.vision_config.num_heads)
        patch = self.num_channels * self.temporal_patch_size * self.patch_size**2
        return {
            "d_model": self.hidden_size,
            "n_heads": heads,
            "n_kv_heads": heads,
            "d_head": self.hidden_size // heads,
            "d_patch": patch,
            "batch": None,
            "pos": None,
        }

    def unreachable_hooks(self) -> list[str]:
        """The tower's ``hook_out``: returned after the merger has read the last block."""
        return [self.hook_out.name]

    def call_counts(self, inputs: Mapping[str, Any]) -> dict[str, int]:
        """Runs of the tower and calls of its attention kernel for `inputs` (see `vision`)."""
        return vision.call_counts(inputs, self.grid())

    def example_inputs(self, inputs: dict[str, Any], processor: Any = None) -> dict[str, Any]:
        """One image per row of `inputs`, of different sizes, through the processor if any."""
        grid, token = self.grid(), self.image_token_id
        return vision.example_inputs(inputs, processor, grid, token, self.num_channels)

    def image_layout(self, request: LayoutRequest) -> ImageLayout | None:
        """Each image's tokens, grid of merged blocks, tower tokens and pixel boxes.

        Raises:
            InputError: image tokens that do not match ``image_grid_thw``.
        """
        token = self.image_token_id
        if token is None:
            return None
        route = VisionRoute(
            stack=f"{self.name}.layers",
            feature_hooks=tuple(self.selected_hook_names),
            projector=str(self.options.get("projector", "vision_projector")),
        )
        return layout.build_layout(self.grid(), token, route, request)

    def check_inputs(self, inputs: Mapping[str, Any]) -> None:
        """Check pixel values, grids and image tokens before the model runs.

        Raises:
            InputError: naming what was expected.
        """
        vision.check_inputs(inputs, self.grid(), self.num_channels, self.image_token_id)


class Qwen25VisionEncoderBridge(QwenVisionEncoderBridge):
    """Qwen2.5-VL's vision transformer: windowed attention except in its full-attention layers.

    Qwen2.5-VL reorders the patches into its attention windows right after the patch
    embedding, so the blocks' activations (and the merger's) are in window order: windows of
    ``window_size`` pixels, each a run of whole 2x2 blocks (`bridge_qwen2vl.layout` maps them).
    ``patch_embed.hook_out`` is still in the processor's order.
    """

    parts: ClassVar[dict[str, Part]] = {
        **QwenVisionEncoderBridge.parts,
        "layers": Part(Qwen25VisionBlockBridge, ("blocks",)),
    }
    windowed: ClassVar[bool] = True

    @property
    def hidden_size(self) -> int:
        """Width of the vision blocks."""
        return int(self.vision_config.hidden_size)

    @property
    def full_attention_layers(self) -> list[int]:
        """The layers that attend over each whole image (``fullatt_block_indexes``)."""
        return [int(i) for i in self.vision_config.fullatt_block_indexes]


class PatchMergerBridge(PartsComponent):
    """The patch merger (`vision_projector`): ln_q, then an MLP over each 2x2 block of patches.

    ``hook_in`` is the last vision block's output ``[patches, vision d_model]``;
    ``mlp.hook_in`` the normalized patches four by four, ``[tokens, 4 * vision d_model]``;
    ``hook_out`` the image features ``[tokens, d_model]`` that replace the ``<|image_pad|>``
    tokens (Qwen2.5-VL: in window order, which the model undoes before it writes them in).
    """

    input_arg: ClassVar[str] = "x"
    hook_shapes: ClassVar[dict[str, Shape]] = {
        "hook_in": ("patches", "d_vision"),
        "hook_out": ("tokens", "d_model"),
    }
    parts: ClassVar[dict[str, Part]] = {
        "ln_q": Part(NormalizationBridge, ("ln_q",)),
        "mlp": Part(MLPBridge, ("mlp",), {"in": "0", "out": "2"}),
    }

    def set_original_component(self, module: nn.Module) -> None:
        """Build the parts; every point fires once per run of the vision tower."""
        super().set_original_component(module)
        shapes: dict[str, Shape] = {
            "ln_q.hook_in": ("patches", "d_vision"),
            "ln_q.hook_scale": ("patches", 1),
            "ln_q.hook_normalized": ("patches", "d_vision"),
            "ln_q.hook_out": ("patches", "d_vision"),
            "mlp.hook_in": ("tokens", "d_merged"),
            "mlp.hook_pre": ("tokens", "d_merged"),
            "mlp.hook_post": ("tokens", "d_merged"),
            "mlp.hook_out": ("tokens", "d_model"),
        }
        for path, shape in shapes.items():
            owner, _, attr = path.rpartition(".")
            point = getattr(self.get_submodule(owner), attr, None)
            if isinstance(point, HookPoint):
                point.shape = shape
        for component in self.modules():
            if isinstance(component, GeneralizedComponent):
                for attr, point in component.own_hook_points():
                    vision.declare(point, attr, None)

    def dims(self) -> dict[str, int | None]:
        """The vision width it reads and the merged width; ``tokens`` is free."""
        module = self.original_component
        merged = int(getattr(module, "hidden_size", 0)) or None
        norm = getattr(module, "ln_q", None)
        weight = getattr(norm, "weight", None)
        width = int(weight.shape[0]) if isinstance(weight, torch.Tensor) else None
        return {"d_vision": width, "d_merged": merged, "batch": None, "pos": None}

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Merge ``[..., patches, vision d_model]`` into ``[..., patches / 4, d_model]``.

        Any leading dimensions (a stack of layers, for the vision logit lens) are merged
        separately; the tokens keep the order of the patches.
        """
        merger = self.original_component
        if merger is None:
            raise RuntimeError(f"component {self.name!r} is not attached to an HF module")
        merged: torch.Tensor = merger(x.reshape(-1, x.shape[-1]), **kwargs)
        return merged.reshape(*x.shape[:-2], -1, merged.shape[-1])


def _unbatched(shape: tuple[int | str, ...] | None) -> tuple[int | str, ...] | None:
    """A ``[batch, pos, ...]`` shape as the tower has it: ``[patches, ...]``."""
    if shape is not None and shape[:2] in (("batch", "pos"), ("batch", "kpos")):
        return ("patches", *shape[2:])
    return shape


KINDS: dict[str, type[GeneralizedComponent]] = {
    "qwen2_vl_vision_encoder": QwenVisionEncoderBridge,
    "qwen2_5_vl_vision_encoder": Qwen25VisionEncoderBridge,
    "qwen2_vl_vision_block": QwenVisionBlockBridge,
    "qwen2_5_vl_vision_block": Qwen25VisionBlockBridge,
    "qwen2_vl_vision_attention": QwenVisionAttentionBridge,
    "patch_merger": PatchMergerBridge,
}
