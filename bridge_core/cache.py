"""ActivationCache: the activations of one run, by hook name, with TransformerLens helpers."""

from __future__ import annotations

from collections.abc import Callable, ItemsView, Iterator, KeysView, ValuesView
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from bridge_core import slices
from bridge_core.cache_analysis import TransformerLensAnalyses
from bridge_core.errors import HookNameError, InputError, did_you_mean
from bridge_core.naming import NameKeys
from bridge_core.naming import act_name as act_name  # re-exported: TransformerLens's get_act_name
from bridge_core.stacks import Stack, embed_terms, is_stack, stacks_of

if TYPE_CHECKING:
    from bridge_core.config import TransformerBridgeConfig
    from bridge_core.layout import ImageLayout
    from bridge_core.naming import HookNames

PosSlice = slices.SliceInput


class ModuleTree(Protocol):
    """A tree of modules: an nn.Module, or a bridge (`CacheOwner`)."""

    def named_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """The modules of the tree with their dotted paths, as nn.Module has them."""

    def get_submodule(self, target: str) -> nn.Module:
        """A module of the tree by dotted path, as nn.Module has it."""


class CacheOwner(ModuleTree, Protocol):
    """What a cache needs of the bridge whose run it holds (a `TransformerBridge` is one).

    A Protocol, so that the cache, lower in the layers, never imports ``bridge.py``.
    """

    @property
    def cfg(self) -> TransformerBridgeConfig:
        """The bridge's config (``n_layers``, ``normalization_type``, ``eps`` ...)."""

    @property
    def _names(self) -> HookNames:
        """The bridge's hook points and aliases (read, never changed)."""

    def component(self, name: str) -> nn.Module:
        """The component at a dotted bridge path (``"ln_final"``)."""

    def __getattr__(self, name: str) -> Any:
        """Components as attributes, as in TransformerLens (``bridge.blocks[3].attn.W_O``)."""

    def accumulated_bias(
        self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
    ) -> torch.Tensor:
        """The output biases of every layer before `layer`, summed."""

    def tokens_to_residual_directions(self, tokens: str | int | torch.Tensor) -> torch.Tensor:
        """The unembedding direction of each token."""


class ActivationCache(TransformerLensAnalyses):
    """Activations by canonical hook name; aliases and ``cache["resid_pre", 3]`` also work.

    An aliased activation is stored once, under its canonical name. A hook point that fired
    several times in the forward (once per image, per expert) keeps every call:
    `calls(name)` lists them, and ``cache[name]`` is them stacked or concatenated as its
    adapter declares (an error that points at `calls` where they are kept as a list only).
    """

    def __init__(
        self,
        cache_dict: dict[str, torch.Tensor],
        model: CacheOwner,
        has_batch_dim: bool = True,
        calls: dict[str, list[torch.Tensor]] | None = None,
    ) -> None:
        """Wrap `cache_dict` (canonical name -> tensor) of a run of `model`.

        Args:
            calls: every call of the hook points that fired more than once, by name.
        """
        self.cache_dict = cache_dict
        self.model = model
        self.has_batch_dim = has_batch_dim
        self.call_lists: dict[str, list[torch.Tensor]] = dict(calls or {})
        self._image_layout: ImageLayout | None = None
        self._layout_source: Callable[[], ImageLayout] | None = None

    @property
    def image_layout(self) -> ImageLayout | None:
        """Where the run's images sit in the sequence (`bridge_core.multimodal`), or None.

        `run_with_cache` sets it for inputs with images; it is computed when first read.
        """
        if self._layout_source is not None:
            source, self._layout_source = self._layout_source, None
            self._image_layout = source()
        return self._image_layout

    def set_image_layout(self, layout: ImageLayout | Callable[[], ImageLayout] | None) -> None:
        """Set the image layout, or a function that computes it when first read."""
        if callable(layout):
            self._image_layout, self._layout_source = None, layout
        else:
            self._image_layout, self._layout_source = layout, None

    # -- mapping -------------------------------------------------------------------------

    def _key(self, key: str | tuple[Any, ...]) -> str:
        if not _is_key(key):
            raise HookNameError(
                f"cache keys are hook names or (name, layer) tuples; got {type(key).__name__} "
                f"{key!r:.60}. Accepted: cache['blocks.0.hook_resid_pre'], an alias, or "
                "TransformerLens's cache['resid_pre', 0] (cache.keys() lists the names)"
            )
        name = self._act_name(key) if isinstance(key, tuple) else key
        for candidate in (name, self._canonical(name)):
            if candidate in self.cache_dict or candidate in self.call_lists:
                return candidate
        if isinstance(key, str) and "." not in key and not key.startswith("hook_"):
            try:  # TransformerLens shorthand without a layer: "embed", "normalized"
                return self._key(act_name(key))
            except InputError:
                pass
        known = [*self.cache_dict, *self.model._names.aliases]
        raise HookNameError(
            f"{name!r} is not in this cache.{did_you_mean(name, known)} "
            f"Pass it in names_filter to cache it.{self._stack_hint(name)}"
        )

    def _act_name(self, key: tuple[Any, ...]) -> str:
        """``(name, layer[, sublayer][, stack])`` as a hook name; see `__getitem__`."""
        name, *rest = key
        layer = rest[0] if rest else None
        sublayer = rest[1] if len(rest) > 1 else None
        stack = rest[2] if len(rest) > 2 else "blocks"
        if len(rest) == 2 and isinstance(sublayer, str) and is_stack(self.model, sublayer):
            sublayer, stack = None, sublayer  # cache["resid_pre", 3, "decoder"]
        if isinstance(layer, int) and layer < 0:  # from the end of the stack
            n_layers = Stack.of(self, stack).n_layers
            if layer < -n_layers:
                raise HookNameError(
                    f"cache[{key!r}]: layer {layer} is out of range for the {n_layers} layers "
                    f"of {stack!r}. Accepted: 0..{n_layers - 1}, or -{n_layers}..-1 from the end"
                )
            layer += n_layers
        return act_name(name, layer, sublayer, stack)

    def _stack_hint(self, name: str) -> str:
        if not name.startswith("blocks.") or is_stack(self.model, "blocks"):
            return ""
        stacks = stacks_of(self.model)
        example = f'cache["resid_pre", 0, {stacks[-1]!r}]' if stacks else ""
        return (
            f" This bridge has no 'blocks'; name the stack of layers, e.g. {example} "
            f"(its stacks: {', '.join(stacks)})"
        )

    def _canonical(self, name: str) -> str:
        """The canonical name of an alias (also of ``<alias>_grad``)."""
        aliases = self.model._names.aliases
        base = name.removesuffix("_grad")
        if base != name and base in aliases:
            return aliases[base] + "_grad"
        return aliases.get(name, name)

    def __getitem__(self, key: str | tuple[Any, ...]) -> torch.Tensor:
        """The activation `key` names: a hook name or alias, or TransformerLens's shorthand.

        ``cache["resid_pre", 3]`` is ``blocks.3.hook_resid_pre`` (a negative layer counts from
        the last); ``cache["normalized", 3, "ln2"]`` names a sublayer as in TransformerLens;
        and a stack of layers other than ``blocks`` comes after the layer, or after the
        sublayer: ``cache["resid_pre", 3, "decoder"]`` (``decoder.3.hook_resid_pre``),
        ``cache["q", -1, "attn", "encoder"]``, ``cache["resid_post", 0,
        "vision_encoder.layers"]``.
        """
        name = self._key(key)
        if name not in self.cache_dict:
            calls = self.call_lists[name]
            raise InputError(
                f"{name!r} fired {len(calls)} times in this forward with shapes "
                f"{[tuple(c.shape) for c in calls]}, which its adapter keeps as a list: "
                f"use cache.calls({name!r})"
            )
        return self.cache_dict[name]

    def calls(self, key: str | tuple[Any, ...]) -> list[torch.Tensor]:
        """Every call of a hook point in this forward, in order (one item for most points)."""
        name = self._key(key)
        return list(self.call_lists.get(name) or [self.cache_dict[name]])

    def __contains__(self, key: object) -> bool:
        if not _is_key(key):
            return False
        try:
            self._key(key)  # type: ignore[arg-type]  # _is_key checked it
        except (HookNameError, InputError):  # ("resid_pre",) lacks its layer: not in the cache
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def __len__(self) -> int:
        return len(self.cache_dict)

    def keys(self) -> KeysView[str]:
        """Canonical names of the cached activations (TransformerLens names are in it too:
        ``"blocks.0.hook_resid_pre" in cache.keys()``, while each activation is listed once)."""
        return NameKeys(self.cache_dict, self.__contains__)

    def values(self) -> ValuesView[torch.Tensor]:
        """The cached tensors."""
        return self.cache_dict.values()

    def items(self) -> ItemsView[str, torch.Tensor]:
        """(canonical name, tensor) pairs."""
        return self.cache_dict.items()

    def __repr__(self) -> str:
        lists = [k for k in self.call_lists if k not in self.cache_dict]
        more = f" and call lists {lists}" if lists else ""
        return f"ActivationCache with keys {list(self.cache_dict)}{more}"

    # -- storage -------------------------------------------------------------------------

    def to(self, device: str | torch.device) -> ActivationCache:
        """Move the cached tensors (not the model) to `device`; returns self."""
        self.cache_dict = {k: v.to(device) for k, v in self.cache_dict.items()}
        self.call_lists = {k: [v.to(device) for v in c] for k, c in self.call_lists.items()}
        return self

    def remove_batch_dim(self) -> ActivationCache:
        """Drop the batch dimension of a batch-of-one cache; returns self."""
        if not self.has_batch_dim:
            return self
        sizes = {v.shape[0] for v in self.cache_dict.values()}
        if sizes - {1}:
            raise InputError(
                f"remove_batch_dim needs a batch of one (batch sizes: {sorted(sizes)})"
            )
        self.cache_dict = {k: v[0] for k, v in self.cache_dict.items()}
        self.has_batch_dim = False
        return self

    def unique_nbytes(self) -> int:
        """Bytes held by the cache, each underlying storage counted once."""
        storages: dict[int, int] = {}
        for tensor in self.cache_dict.values():
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    # -- residual-stream analysis ---------------------------------------------------------
    # Every helper takes `stack`: the bridge path of a list of layers whose components have
    # the TransformerLens residual names (`hook_resid_pre`, `hook_attn_out` ...): the language
    # model's `blocks` by default, or e.g. a vision tower's `vision_encoder.layers`.

    def stack_activation(
        self,
        activation_name: str,
        layer: int = -1,
        sublayer_type: str | None = None,
        stack: str = "blocks",
    ) -> torch.Tensor:
        """Stack one activation over layers 0..layer-1 (all if -1): ``[n_layers, ...]``."""
        layers = Stack.of(self, stack)
        n = layers.n_layers if layer == -1 else layers.index(layer, "stack_activation")
        return torch.stack(
            [self[act_name(activation_name, i, sublayer_type, stack)] for i in range(n)]
        )

    def accumulated_resid(
        self,
        layer: int | None = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: PosSlice = None,
        mlp_input: bool = False,
        return_labels: bool = False,
        stack: str = "blocks",
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """The residual stream before each layer up to `layer` (and after the last if None).

        Returns:
            ``[n, batch, pos, d_model]`` (and the labels, if asked).
        """
        layers = Stack.of(self, stack)
        n_layers = layers.n_layers
        layer = n_layers if layer is None else layers.index(layer, "accumulated_resid")
        parts: list[torch.Tensor] = []
        labels: list[str] = []
        for i in range(layer):
            parts.append(self[layers.name(i, "hook_resid_pre")])
            labels.append(f"{i}_pre")
            if incl_mid:
                parts.append(self[layers.resid_mid(i)])
                labels.append(f"{i}_mid")
                if layers.has(i, "hook_resid_mid_cross"):  # a decoder: after cross-attention
                    parts.append(self[layers.mlp_input(i)])
                    labels.append(f"{i}_mid_cross")
        if layer == n_layers:
            parts.append(self[layers.name(n_layers - 1, "hook_resid_post")])
            labels.append("final_post")
        else:
            parts.append(self[layers.name(layer, "hook_resid_pre")])
            labels.append(f"{layer}_pre")
            if mlp_input:
                parts.append(self[layers.mlp_input(layer)])
                cross = layers.has(layer, "hook_resid_mid_cross")
                labels.append(f"{layer}_mid_cross" if cross else f"{layer}_mid")
        result = _slice_pos(torch.stack(parts), pos_slice)
        if apply_ln:
            result = self.apply_ln_to_stack(result, layer, mlp_input, pos_slice, stack=stack)
        return (result, labels) if return_labels else result

    def decompose_resid(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        mode: str = "all",
        apply_ln: bool = False,
        pos_slice: PosSlice = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
        stack: str = "blocks",
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """The outputs that sum to the residual stream at `layer`: embeddings, attn and mlp.

        The terms add up at every position: in a run with images, ``embed`` is zero at the
        image tokens and ``image`` is what the model put there (the image features), so the
        sum is ``blocks.0.hook_resid_pre`` plus the block outputs. For another `stack`,
        ``embed`` is its first layer's input; a decoder's cross-attention outputs
        (``{i}_cross_attn_out``) count as attention.

        Args:
            mode: "all", "attn" or "mlp": which block outputs to include.
        """
        if mode not in ("all", "attn", "mlp"):
            raise InputError(f"mode must be 'all', 'attn' or 'mlp' (got {mode!r})")
        layers = Stack.of(self, stack)
        n_layers = layers.n_layers
        layer = n_layers if layer is None else layers.index(layer, "decompose_resid")  # -1: all
        terms = embed_terms(self, layers) if incl_embeds else []
        for i in range(layer + int(mlp_input and layer < n_layers)):
            if mode in ("all", "attn"):
                terms.append((f"{i}_attn_out", self[layers.name(i, "hook_attn_out")]))
                if layers.has(i, "hook_cross_attn_out"):  # a decoder's cross-attention
                    cross = self[layers.name(i, "hook_cross_attn_out")]
                    terms.append((f"{i}_cross_attn_out", cross))
            if mode in ("all", "mlp") and i < layer:
                terms.append((f"{i}_mlp_out", self[layers.name(i, "hook_mlp_out")]))
        if not terms:
            raise InputError(f"decompose_resid(layer={layer}) selects no component")
        shape = max((t.shape for _, t in terms), key=lambda s: s.numel())  # pos_embed: [1, pos, d]
        result = _slice_pos(torch.stack([t.expand(shape) for _, t in terms]), pos_slice)
        if apply_ln:
            result = self.apply_ln_to_stack(result, layer, mlp_input, pos_slice, stack=stack)
        labels = [label for label, _ in terms]
        return (result, labels) if return_labels else result

    def apply_ln_to_stack(
        self,
        residual_stack: torch.Tensor,
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice: PosSlice = None,
        has_batch_dim: bool = True,
        stack: str = "blocks",
    ) -> torch.Tensor:
        """Centre (LayerNorm only) and divide by the scale of the norm that reads `layer`.

        The scale is the one the model used in this run (from the norm's cached input), so
        the map is linear in the stack's components, as in TransformerLens. The norm's
        weight and bias are not applied; `logit_lens` applies the whole final norm.
        """
        layers = Stack.of(self, stack)
        norm = layers.norm(layer, mlp_input)
        resid = _slice_pos(self[f"{norm}.hook_in"], pos_slice)
        if not has_batch_dim:
            resid = resid[0]
        kind, eps = layers.norm_kind(norm)
        if kind == "LN":
            residual_stack = residual_stack - residual_stack.mean(-1, keepdim=True)
            scale = (resid.var(-1, keepdim=True, unbiased=False) + eps).sqrt()
        else:
            scale = (resid.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        return residual_stack / scale

    def logit_lens(self, residual_stack: torch.Tensor, stack: str = "blocks") -> torch.Tensor:
        """Apply the final norm and the unembedding to each element of a residual stack.

        With a vision `stack` (``"vision_encoder.layers"``), the tokens the model feeds go
        through the projector first (`vision_logit_lens`).
        """
        model = self.model
        if stack != "blocks" and not model.cfg.is_multimodal:  # an encoder-decoder's stack
            raise InputError(
                f"logit_lens goes from the language model's 'blocks' (or a vision tower "
                f"feeding them); for {stack!r} apply its final norm (if any) and then "
                "bridge.unembed yourself (T5 with tied embeddings also scales by "
                "d_model ** -0.5 between them)"
            )
        if stack != "blocks":
            return vision_logit_lens(self, residual_stack, stack)
        with torch.no_grad():
            normalized = model.component("ln_final")(residual_stack)
            logits: torch.Tensor = model.component("unembed")(normalized)
            return logits


def layout_of(cache: ActivationCache) -> ImageLayout:
    """The image layout of a cached run, or a clear error if the run had none."""
    layout = cache.image_layout
    if layout is None:
        raise InputError(
            "this cache has no image layout: run_with_cache sets one for inputs with images "
            "(text and images=[...], or input_ids and pixel_values)"
        )
    return layout


def vision_logit_lens(
    cache: ActivationCache, residual_stack: torch.Tensor, stack: str | None = None
) -> torch.Tensor:
    """Logits of vision hidden states: fed tokens -> projector -> final norm -> unembed.

    Args:
        residual_stack: ``[..., tokens, vision_d_model]`` vision residual states; over the
            tower's whole sequence, the tokens the model does not feed (a dropped CLS) are
            removed first.
        stack: the vision layers the states come from (default: the tower feeding the LM).

    Returns:
        ``[..., fed tokens, d_vocab]``

    Raises:
        InputError: the cache has no image layout, or `stack` does not feed the LM.
    """
    route = layout_of(cache).vision
    if route is None:
        raise InputError("this model's plugin does not say how image features reach the LM")
    if stack is not None and stack != route.stack:
        raise InputError(
            f"the logit lens goes from the language model's 'blocks' or from {route.stack!r} "
            f"(the vision layers that feed it); got stack={stack!r}"
        )
    model = cache.model
    tower_len = cache[f"{route.stack}.0.hook_resid_pre"].shape[-2]
    if route.skip_tokens and residual_stack.shape[-2] == tower_len:
        residual_stack = residual_stack[..., route.skip_tokens :, :]
    projector = model.component(route.projector)
    features = cache[route.projector + ".hook_in"]
    if features.shape[-1] != residual_stack.shape[-1]:
        raise InputError(
            f"{route.projector} takes features of width {features.shape[-1]} (several vision "
            f"layers concatenated?), the stack has width {residual_stack.shape[-1]}; the "
            "vision logit lens sends one layer's states through the projector"
        )
    with torch.no_grad():
        resid: torch.Tensor = projector(residual_stack)
        normalized = model.component("ln_final")(resid)
        logits: torch.Tensor = model.component("unembed")(normalized)
    return logits


def _is_key(key: object) -> bool:
    """A hook name, or a (name, layer[, sublayer[, stack]]) tuple of TransformerLens's form."""
    if isinstance(key, str):
        return True
    return isinstance(key, tuple) and 1 <= len(key) <= 4 and isinstance(key[0], str)


def _slice_pos(x: torch.Tensor, pos_slice: PosSlice) -> torch.Tensor:
    """Index the position dimension (second to last) of `x` with a TransformerLens slice
    input (`bridge_core.slices`: an int drops the dimension)."""
    return slices.apply(x, pos_slice, -2)
