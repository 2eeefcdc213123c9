"""TransformerLens's ActivationCache analyses: per-head and per-neuron decompositions, logit
attributions, batch slicing.

Functions of an `ActivationCache` (its methods of the same names call them), with
TransformerLens's arguments and semantics: ``layer=None`` or ``-1`` is the whole residual stream
(the unembedding's input), a stack is ``[component, *batch_and_pos, d_model]``, slice inputs
follow `bridge_core.slices` (an int drops its dimension). Head results come from the cache's
``hook_result`` when cached, else from ``hook_z`` and ``W_O``; neuron results from
``mlp.hook_post`` and ``W_out``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from bridge_core import slices
from bridge_core.errors import InputError
from bridge_core.naming import act_name

if TYPE_CHECKING:
    from bridge_core.cache import ActivationCache

Stack = torch.Tensor | tuple[torch.Tensor, list[str]]


def _layer(cache: ActivationCache, layer: int | None) -> int:
    n_layers = cache.model.cfg.n_layers
    if layer is None or layer == -1:
        return n_layers
    if not 0 <= layer <= n_layers:
        raise InputError(f"layer must be in 0..{n_layers}, or None / -1 for all (got {layer})")
    return layer


def _labelled(stack: torch.Tensor, labels: list[str], return_labels: bool) -> Stack:
    return (stack, labels) if return_labels else stack


def apply_slice_to_batch_dim(cache: ActivationCache, batch_slice: slices.SliceInput) -> Any:
    """A new cache with every activation indexed on the batch dimension (an int drops it)."""
    if not cache.has_batch_dim:
        if batch_slice is None:
            return cache
        raise InputError("this cache has no batch dimension to slice (remove_batch_dim)")
    tensors = {k: slices.apply(v, batch_slice, 0) for k, v in cache.cache_dict.items()}
    calls = {k: [slices.apply(v, batch_slice, 0) for v in c] for k, c in cache.call_lists.items()}
    return type(cache)(tensors, cache.model, slices.keeps_dim(batch_slice), calls)


def compute_head_results(cache: ActivationCache) -> None:
    """Store each head's output ``[batch, pos, head, d_model]`` as ``blocks.{i}.attn.hook_result``
    (from ``hook_z`` and ``W_O``), unless the cache has it already."""
    for layer in range(cache.model.cfg.n_layers):
        name = act_name("result", layer)
        if name in cache.cache_dict:
            continue
        z = cache[act_name("z", layer)]
        W_O = cache.model.blocks[layer].attn.W_O.detach()
        cache.cache_dict[name] = torch.einsum("...hd,hdm->...hm", z, W_O.to(z.dtype))


def stack_head_results(
    cache: ActivationCache,
    layer: int = -1,
    return_labels: bool = False,
    incl_remainder: bool = False,
    pos_slice: slices.SliceInput = None,
    apply_ln: bool = False,
) -> Stack:
    """Every head's output in the layers before `layer`: ``[layer * n_heads, ..., d_model]``,
    labels ``L{layer}H{head}`` (and ``remainder``: the rest of the residual stream)."""
    layer = _layer(cache, layer)
    compute_head_results(cache)
    parts = [slices.apply(cache[act_name("result", i)], pos_slice, -3) for i in range(layer)]
    labels = [f"L{i}H{h}" for i in range(layer) for h in range(cache.model.cfg.n_heads)]
    stack = _stacked(cache, parts, pos_slice)
    if incl_remainder:
        stack, labels = _with_remainder(cache, stack, labels, layer, pos_slice)
    if apply_ln:
        stack = cache.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
    return _labelled(stack, labels, return_labels)


def get_neuron_results(
    cache: ActivationCache,
    layer: int,
    neuron_slice: slices.SliceInput = None,
    pos_slice: slices.SliceInput = None,
) -> torch.Tensor:
    """Each neuron's output of MLP `layer`: ``[..., neuron, d_model]`` (activation times its
    row of ``W_out``)."""
    acts = slices.apply(cache[act_name("post", layer)], pos_slice, -2)
    acts = slices.apply(acts, neuron_slice, -1)
    W_out = slices.apply(cache.model.blocks[layer].mlp.W_out.detach(), neuron_slice, 0)
    return acts[..., None] * W_out.to(acts.dtype)


def stack_neuron_results(
    cache: ActivationCache,
    layer: int,
    pos_slice: slices.SliceInput = None,
    neuron_slice: slices.SliceInput = None,
    return_labels: bool = False,
    incl_remainder: bool = False,
    apply_ln: bool = False,
) -> Stack:
    """Every neuron's output in the layers before `layer`: ``[layer * n_neurons, ...,
    d_model]``, labels ``L{layer}N{neuron}``."""
    layer = _layer(cache, layer)
    parts = []
    for i in range(layer):
        result = get_neuron_results(cache, i, neuron_slice, pos_slice)
        parts.append(result if slices.keeps_dim(neuron_slice) else result.unsqueeze(-2))
    d_mlp = cache.model.blocks[0].mlp.W_out.shape[0]
    neurons = torch.arange(d_mlp)
    chosen = slices.apply(neurons, neuron_slice, 0).reshape(-1).tolist()
    labels = [f"L{i}N{n}" for i in range(layer) for n in chosen]
    stack = _stacked(cache, parts, pos_slice)
    if incl_remainder:
        stack, labels = _with_remainder(cache, stack, labels, layer, pos_slice)
    if apply_ln:
        stack = cache.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
    return _labelled(stack, labels, return_labels)


def _stacked(
    cache: ActivationCache, parts: list[torch.Tensor], pos_slice: slices.SliceInput
) -> torch.Tensor:
    """Parts ``[..., k, d_model]`` concatenated on k, which becomes the first dimension."""
    if parts:
        return torch.cat(parts, dim=-2).movedim(-2, 0)
    shape = slices.apply(cache[act_name("resid_pre", 0)], pos_slice, -2).shape
    reference = cache[act_name("resid_pre", 0)]
    return torch.zeros((0, *shape), dtype=reference.dtype, device=reference.device)


def _with_remainder(
    cache: ActivationCache,
    stack: torch.Tensor,
    labels: list[str],
    layer: int,
    pos_slice: slices.SliceInput,
) -> tuple[torch.Tensor, list[str]]:
    """The stack with one more term: the residual stream at `layer` less the stack's sum."""
    resid = cache.accumulated_resid(layer, pos_slice=pos_slice)[-1]
    assert isinstance(resid, torch.Tensor)
    remainder = resid - stack.sum(0)
    return torch.cat([stack, remainder[None]]), [*labels, "remainder"]


def get_full_resid_decomposition(
    cache: ActivationCache,
    layer: int | None = None,
    mlp_input: bool = False,
    expand_neurons: bool = True,
    apply_ln: bool = False,
    pos_slice: slices.SliceInput = None,
    return_labels: bool = False,
) -> Stack:
    """The residual stream at `layer` as every head, every neuron (or MLP), the embeddings and
    the summed biases; the terms add up to it."""
    layer = _layer(cache, layer)
    heads, labels = stack_head_results(
        cache, layer + int(mlp_input), return_labels=True, pos_slice=pos_slice
    )
    parts = [heads]
    if layer > 0 and expand_neurons:
        neurons, neuron_labels = stack_neuron_results(cache, layer, pos_slice, return_labels=True)
        parts.append(neurons)
        labels = [*labels, *neuron_labels]
    elif layer > 0:
        mlps, mlp_labels = cache.decompose_resid(
            layer, mode="mlp", incl_embeds=False, pos_slice=pos_slice, return_labels=True
        )
        parts.append(mlps)
        labels = [*labels, *mlp_labels]
    for name in ("embed", "pos_embed"):
        if f"hook_{name}" in cache:
            embedding = slices.apply(cache[f"hook_{name}"], pos_slice, -2)
            parts.append(embedding.expand(heads.shape[1:])[None])
            labels.append(name)
    bias = cache.model.accumulated_bias(layer, mlp_input, include_mlp_biases=expand_neurons)
    parts.append(bias.detach().to(heads.dtype).expand((1, *heads.shape[1:])))
    labels.append("bias")
    stack = torch.cat(parts)
    if apply_ln:
        stack = cache.apply_ln_to_stack(stack, layer, mlp_input, pos_slice=pos_slice)
    return _labelled(stack, labels, return_labels)


def logit_attrs(
    cache: ActivationCache,
    residual_stack: torch.Tensor,
    tokens: str | int | torch.Tensor,
    incorrect_tokens: str | int | torch.Tensor | None = None,
    pos_slice: slices.SliceInput = None,
    batch_slice: slices.SliceInput = None,
    has_batch_dim: bool = True,
) -> torch.Tensor:
    """How much each term of a residual stack adds to the logit of `tokens` (minus that of
    `incorrect_tokens`), through the final norm's scale of this run and ``W_U``.

    Returns:
        ``[component, *batch_and_pos]``.
    """
    model = cache.model
    directions = model.tokens_to_residual_directions(tokens)
    if incorrect_tokens is not None:
        wrong = model.tokens_to_residual_directions(incorrect_tokens)
        if wrong.shape != directions.shape:
            raise InputError(
                f"tokens and incorrect_tokens must have the same shape (got "
                f"{tuple(directions.shape[:-1])} and {tuple(wrong.shape[:-1])})"
            )
        directions = directions - wrong
    source = cache
    if batch_slice is not None and has_batch_dim:
        residual_stack = slices.apply(residual_stack, batch_slice, 1)
        source = apply_slice_to_batch_dim(cache, batch_slice)
    scaled = source.apply_ln_to_stack(
        residual_stack, None, pos_slice=pos_slice, has_batch_dim=has_batch_dim
    )
    return (scaled * directions.detach().to(scaled.dtype)).sum(-1)


class TransformerLensAnalyses:
    """The analyses above as methods of `ActivationCache` (a mixin of it)."""

    apply_slice_to_batch_dim = apply_slice_to_batch_dim
    compute_head_results = compute_head_results
    stack_head_results = stack_head_results
    get_neuron_results = get_neuron_results
    stack_neuron_results = stack_neuron_results
    get_full_resid_decomposition = get_full_resid_decomposition
    logit_attrs = logit_attrs
