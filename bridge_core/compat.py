"""Compatibility mode: HookedTransformer's weight processing, on a copy of the HF model.

`enable_compatibility_mode` deep-copies the HF model, unties its embeddings, moves the bridge
onto the copy (the model you wrapped stays as it was) and processes the copy's weights as
``HookedTransformer.from_pretrained`` does by default, so activations equal HookedTransformer's
on the same checkpoint:

- **fold_ln**: each norm's weight (and, for LayerNorm, bias) is folded into the projections that
  read it (``W_Q/K/V`` and ``b_Q/K/V``, ``W_in``/``W_gate`` and ``b_in``, ``W_U`` and ``b_U``),
  whose reading weights are then centred over ``d_model`` (LayerNorm only); the norm's weight
  becomes 1 and its bias 0, so the HF norm computes TransformerLens's ``LNPre`` / ``RMSPre``.
- **center_writing_weights** (LayerNorm only): what writes to the residual stream (``W_E``,
  ``W_pos``, ``W_O``, ``b_O``, ``W_out``, ``b_out``) has its mean over ``d_model`` removed.
- **center_unembed**: ``W_U`` and ``b_U`` have their mean over the vocabulary removed.
- **fold_value_biases**: ``b_O += sum_h b_V[h] @ W_O[h]`` and ``b_V = 0``.

Every step goes through the weight views of `bridge_core.weights`, so it is the same for any
adapter; a projection that needs a bias it does not have (GPT-2's LM head, once ``ln_final``'s
bias is folded into it) gets a zero one first.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bridge_core.errors import BridgeError
from bridge_core.weights import assign

if TYPE_CHECKING:
    from bridge_core.bridgelike import BridgeLike


def enable_compatibility_mode(
    bridge: BridgeLike,
    no_processing: bool = False,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    fold_value_biases: bool = True,
    refactor_factored_attn_matrices: bool = False,
) -> None:
    """Move `bridge` onto a processed copy of its HF model (see the module docstring).

    Raises:
        BridgeError: hooks are attached (they belong to the model being replaced), the blocks
            are post-norm, or ``refactor_factored_attn_matrices`` is asked for.
    """
    if refactor_factored_attn_matrices:
        raise BridgeError(
            "refactor_factored_attn_matrices is not offered: its SVD refactoring changes "
            "q, k and v themselves, which hook_q / hook_k / hook_v would then not show"
        )
    attached = [p.name for p in bridge.hook_points() if p.has_hooks()]
    if attached:
        raise BridgeError(
            f"enable_compatibility_mode moves the bridge onto a new copy of the model; remove "
            f"the hooks first (reset_hooks(including_permanent=True)); attached: {attached[:5]}"
        )
    if bridge.cfg.block_layout == "post_norm":
        raise BridgeError(
            "compatibility mode folds pre-norm layer norms; these blocks are post-norm"
        )
    from bridge_core.hooks import strip_taps
    from bridge_core.switches import restore_kernel_names

    model = copy.deepcopy(bridge.original_model)
    strip_taps(model)  # nothing of this bridge's taps comes along (as in its __deepcopy__)
    restore_kernel_names(model)
    _untie(model)
    bridge.assemble(model)
    bridge.compatibility_mode = True
    if no_processing:
        return
    layer_norm = bridge.cfg.normalization_type == "LN"
    with torch.no_grad():
        if fold_ln:
            fold_layer_norm(bridge, fold_biases=layer_norm, center_weights=layer_norm)
        if center_writing_weights and layer_norm:
            center_writing(bridge)
        if center_unembed:
            center_unembedding(bridge)
        if fold_value_biases:
            fold_value_bias(bridge)


def _untie(model: nn.Module) -> None:
    """Give the LM head its own weight where it shares the embeddings' (they are processed
    differently)."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    inputs = get_in() if callable(get_in) else None
    outputs = get_out() if callable(get_out) else None
    if inputs is None or outputs is None or outputs.weight is not inputs.weight:
        return
    outputs.weight = nn.Parameter(outputs.weight.detach().clone())
    config = getattr(model, "config", None)
    if config is not None:
        config.tie_word_embeddings = False


def _ensure_bias(module: nn.Module) -> None:
    """Give an ``nn.Linear`` without bias a zero one (what TransformerLens's zeros stand for)."""
    if isinstance(module, nn.Linear) and module.bias is None:
        weight = module.weight
        module.bias = nn.Parameter(
            torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        )


def _norms(bridge: BridgeLike, block: Any) -> tuple[Any, Any]:
    """(the norm attention reads, the norm the MLP reads) of a block."""
    ln1 = getattr(block, "ln1", None)
    ln2 = getattr(block, "ln2", None) if bridge.cfg.block_layout != "parallel" else ln1
    if ln1 is None or ln2 is None:
        raise BridgeError(f"{block.name} has no ln1 / ln2 components to fold")
    return ln1, ln2


def _fold_into(norm: Any, weights: list[torch.Tensor], biases: list[torch.Tensor] | None) -> None:
    """Fold a norm's weight (and bias) into reading weights ``[..., d_model, out]``."""
    w = norm.w.detach()
    if biases is not None:
        b = norm.b.detach()
        for weight, bias in zip(weights, biases, strict=True):
            assign(bias, bias + (weight * b[:, None]).sum(-2))
    for weight in weights:
        assign(weight, weight * w[:, None])


def _reset_norm(norm: Any, fold_biases: bool) -> None:
    assign(norm.w, torch.ones_like(norm.w))
    if fold_biases:
        assign(norm.b, torch.zeros_like(norm.b))


def fold_layer_norm(bridge: BridgeLike, fold_biases: bool, center_weights: bool) -> None:
    """Fold every norm into the weights that read it (see the module docstring)."""
    for block in bridge.blocks:
        attn, mlp = block.attn, block.mlp
        ln1, ln2 = _norms(bridge, block)
        if fold_biases:
            for which in "qkv":
                _ensure_bias(attn.projection(which).module)
            for which in ("in", "gate"):
                projection = mlp.projection(which)
                if projection is not None:
                    _ensure_bias(projection.module)
        qkv = [attn.W_Q, attn._W_K, attn._W_V]
        _fold_into(ln1, qkv, [attn.b_Q, attn._b_K, attn._b_V] if fold_biases else None)
        reading = [mlp.W_in] + ([mlp.W_gate] if mlp.W_gate is not None else [])
        reading_biases = [mlp.b_in] + ([mlp._bias_of("gate")] if mlp.W_gate is not None else [])
        _fold_into(ln2, reading, reading_biases if fold_biases else None)
        if center_weights:
            for weight in [*qkv, mlp.W_in]:
                assign(weight, weight - weight.mean(-2, keepdim=True))
        _reset_norm(ln1, fold_biases)
        if ln2 is not ln1:
            _reset_norm(ln2, fold_biases)
    ln_final, unembed = bridge.ln_final, bridge.unembed
    if fold_biases:
        _ensure_bias(unembed.original_component)
    _fold_into(ln_final, [unembed.W_U], [unembed.b_U] if fold_biases else None)
    if center_weights:
        assign(unembed.W_U, unembed.W_U - unembed.W_U.mean(-2, keepdim=True))
    _reset_norm(ln_final, fold_biases)


def center_writing(bridge: BridgeLike) -> None:
    """Remove the mean over ``d_model`` from everything that writes to the residual stream."""

    def center(weight: torch.Tensor) -> None:
        assign(weight, weight - weight.mean(-1, keepdim=True))

    center(bridge.W_E)
    if "pos_embed" in bridge._modules:
        center(bridge.W_pos)
    for block in bridge.blocks:
        for weight in (block.attn.W_O, block.attn.b_O, block.mlp.W_out, block.mlp.b_out):
            center(weight)


def center_unembedding(bridge: BridgeLike) -> None:
    """Remove the mean over the vocabulary from ``W_U`` and ``b_U`` (softmax is unchanged)."""
    unembed = bridge.unembed
    assign(unembed.W_U, unembed.W_U - unembed.W_U.mean(-1, keepdim=True))
    assign(unembed.b_U, unembed.b_U - unembed.b_U.mean())


def fold_value_bias(bridge: BridgeLike) -> None:
    """Move the value biases into the output bias: ``b_O += sum_h b_V[h] @ W_O[h]``."""
    for block in bridge.blocks:
        attn = block.attn
        b_V = attn.b_V.as_subclass(torch.Tensor)  # [n_heads, d_head], repeated under GQA
        if not bool(b_V.any()):
            continue
        folded = attn.b_O + torch.einsum("hd,hdm->m", b_V, attn.W_O)
        assign(attn.b_O, folded)
        assign(attn._b_V, torch.zeros_like(attn._b_V))
