"""The stacks of layers of a bridge, as a cache reads them: hook names of the residual stream
between layers, the norms that read it, and the terms of the first layer's input.

`Stack` serves `ActivationCache`'s residual helpers (``accumulated_resid``, ``decompose_resid``,
``apply_ln_to_stack``) for the language model's ``blocks`` and for any other stack (a vision
tower's ``vision_encoder.layers``, an encoder-decoder's ``encoder``/``decoder``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from bridge_core.errors import HookNameError, InputError, did_you_mean

if TYPE_CHECKING:
    from bridge_core.cache import ActivationCache, ModuleTree


@dataclass(frozen=True)
class Stack:
    """A list of layers of the bridge, and the hook names of its residual stream."""

    cache: ActivationCache
    path: str
    n_layers: int

    @classmethod
    def of(cls, cache: ActivationCache, path: str) -> Stack:
        layers = module_at(cache.model, path)
        if not isinstance(layers, nn.ModuleList):
            stacks = [n for n, m in cache.model.named_modules() if isinstance(m, nn.ModuleList)]
            hint = did_you_mean(path, stacks)
            raise HookNameError(
                f"stack {path!r} is not a list of layers of this bridge.{hint} Stacks: {stacks}"
            )
        return cls(cache, path, len(layers))

    def index(self, layer: int, helper: str) -> int:
        """A residual helper's `layer` as 0..n_layers (n_layers: after the last layer);
        negative counts from the end (-1 is n_layers), as in TransformerLens.

        Raises:
            InputError: out of range, naming the helper, the stack and the range.
        """
        n = self.n_layers
        if not isinstance(layer, int) or not -(n + 1) <= layer <= n:
            raise InputError(
                f"{helper}(layer={layer!r}): {self.path!r} has {n} layers. Accepted: 0..{n} "
                f"({n}: after the last layer), -{n + 1}..-1 counted from the end, or None"
            )
        return layer % (n + 1)

    @property
    def is_language_model(self) -> bool:
        return self.path == "blocks"

    def name(self, layer: int, hook: str) -> str:
        return f"{self.path}.{layer}.{hook}"

    def norms(self, layer: int) -> list[str]:
        """The normalization components that read a layer's residual stream, in order.

        ``ln1``, ``ln2`` (and a decoder's ``ln3``) where the layer has them (TransformerLens's
        names); else its norms in forward order (a vision tower's ``layer_norm1``,
        ``layer_norm2``). Norms of a sublayer's output (``ln1_post``, ``ln2_post``) never read
        the stream.
        """
        prefix, names = f"{self.path}.{layer}.", self.cache.model._names
        found = [
            name.removesuffix(".hook_normalized")
            for name in [*names.points, *names.aliases]  # a norm's point (an alias in plugins)
            if name.startswith(prefix)
            and name.endswith(".hook_normalized")
            and name[len(prefix) :].count(".") == 1
        ]
        conventional = [f"{prefix}ln1", f"{prefix}ln2", f"{prefix}ln3"]  # ln3: a decoder's MLP
        if any(name in found for name in conventional):
            return [name for name in conventional if name in found]
        return [name for name in found if not name.endswith("_post")]

    def resid_mid(self, layer: int) -> str:
        """The stream between attention and MLP: ``hook_resid_mid``, or the second norm's input."""
        name = self.name(layer, "hook_resid_mid")
        if name in self.cache.model._names.aliases or len(self.norms(layer)) < 2:
            return name
        return self.norms(layer)[1] + ".hook_in"

    def has(self, layer: int, hook: str) -> bool:
        """Whether the layer has the hook point or alias (a decoder's cross-attention ones)."""
        names = self.cache.model._names
        return self.name(layer, hook) in names.points or self.name(layer, hook) in names.aliases

    def mlp_input(self, layer: int) -> str:
        """The stream the MLP reads: after cross-attention in a decoder, else ``resid_mid``."""
        if self.has(layer, "hook_resid_mid_cross"):
            return self.name(layer, "hook_resid_mid_cross")
        return self.resid_mid(layer)

    def norm(self, layer: int | None, mlp_input: bool) -> str:
        """The norm component that reads the stream at `layer` (the final norm for None):
        ``ln_final`` after ``blocks``, ``<stack>_final_ln`` after another stack (TransformerLens's
        ``encoder_final_ln`` and ``decoder_final_ln``)."""
        layer = None if layer is None else self.index(layer, "apply_ln_to_stack")
        if layer is None or layer == self.n_layers:
            final = "ln_final" if self.is_language_model else f"{self.path}_final_ln"
            if module_at(self.cache.model, final) is not None:
                return final
            raise InputError(
                f"no norm of {self.path!r} reads the output of its last layer; pass a layer "
                f"below {self.n_layers}"
            )
        norms = self.norms(layer)
        if len(norms) < 1 + int(mlp_input):
            wanted = f"{self.path}.{layer}.ln{1 + int(mlp_input)}.hook_in"
            raise HookNameError(
                f"no norm reads the residual stream of layer {layer} of {self.path!r} (looked "
                f"for {wanted!r}; its norms: {norms or 'none'}), so there is no scale to apply"
            )
        return norms[-1] if mlp_input else norms[0]  # a decoder's MLP reads ln3

    def norm_kind(self, norm: str) -> tuple[str, float]:
        """("LN" or "RMS", eps) of a norm component."""
        cfg = self.cache.model.cfg
        module = self.cache.model.component(norm).original_component
        eps = getattr(module, "eps", None) or getattr(module, "variance_epsilon", None)
        if self.is_language_model:
            return cfg.normalization_type or "RMS", float(cfg.eps or eps or 1e-5)
        return ("LN" if isinstance(module, nn.LayerNorm) else "RMS"), float(eps or 1e-5)


def embed_terms(cache: ActivationCache, layers: Stack) -> list[tuple[str, torch.Tensor]]:
    """The terms of the first layer's input: embeddings, and image features if any."""
    if not layers.is_language_model:
        return [("embed", cache[layers.name(0, "hook_resid_pre")])]
    terms = [
        (name.removeprefix("hook_"), cache[name])
        for name in ("hook_embed", "hook_pos_embed")
        if name in cache
    ]
    layout = cache.image_layout
    if layout is None or not bool(layout.image_mask.any()):
        return terms
    first = layers.name(0, "hook_resid_pre")
    if first not in cache:
        raise InputError(
            f"decompose_resid of a run with images needs {first!r} (the stream once the "
            "image features are in): cache it too (names_filter)"
        )
    resid = cache[first]
    mask = layout.image_mask.to(resid.device)
    mask = (mask if cache.has_batch_dim else mask[0]).unsqueeze(-1)
    zero = torch.zeros((), dtype=resid.dtype, device=resid.device)
    terms = [(n, torch.where(mask, zero, t) if n == "embed" else t) for n, t in terms]
    rest = resid - sum((t for _, t in terms), torch.zeros_like(resid))
    return [*terms, ("image", torch.where(mask, rest, zero))]


def is_stack(model: ModuleTree, path: str) -> bool:
    return isinstance(module_at(model, path), nn.ModuleList)


def stacks_of(model: ModuleTree) -> list[str]:
    """The stacks of layers of a bridge: its lists of components not inside a layer."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and name
        and not any(part.isdigit() for part in name.split("."))
        and not name.startswith("original_model")
    ]


def module_at(model: ModuleTree, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None
