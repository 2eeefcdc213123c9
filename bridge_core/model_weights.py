"""The whole model's weights in TransformerLens's shapes (`ModelWeights`, a bridge mixin).

``W_E``, ``W_pos``, ``W_U`` and ``b_U`` are the components' (views of the HF parameters);
``W_Q`` ... ``b_out`` stack the blocks' to ``[n_layers, ...]`` as `LinkedWeight`s, so an
in-place edit of a stack is written back to every layer. Which HF module is which comes
from the components (``embed``, ``pos_embed``, ``blocks[i].attn`` / ``.mlp``, ``unembed``),
never from the architecture's name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bridge_core.errors import BridgeError, InputError
from bridge_core.weights import AttentionWeights, LinkedWeight, MLPWeights, stacked

if TYPE_CHECKING:
    from bridge_core.components.standard import EmbeddingBridge, UnembeddingBridge
    from bridge_core.config import TransformerBridgeConfig
    from bridge_core.factored import FactoredMatrix


class ModelWeights(nn.Module):
    """TransformerLens's weight properties and the analyses built on them."""

    cfg: TransformerBridgeConfig

    def _part(self, name: str) -> Any:
        module = self._modules.get(name)
        if module is None:
            raise BridgeError(
                f"this bridge has no component {name!r} (its adapter maps "
                f"{sorted(self._modules)}), so the weights it holds are not available"
            )
        return module

    def _blocks(self, kind: str) -> list[Any]:
        blocks = self._part("blocks")
        parts = [getattr(block, kind, None) for block in blocks]
        wanted = AttentionWeights if kind == "attn" else MLPWeights
        if not all(isinstance(p, wanted) for p in parts):
            raise BridgeError(f"the blocks of this bridge have no {kind} component with weights")
        return parts

    def _stack(self, kind: str, attr: str) -> LinkedWeight:
        return stacked([getattr(part, attr) for part in self._blocks(kind)])

    @property
    def W_E(self) -> torch.Tensor:
        """Token embeddings ``[d_vocab, d_model]``."""
        embed: EmbeddingBridge = self._part("embed")
        return embed.W_E

    @property
    def W_pos(self) -> torch.Tensor:
        """Learned position embeddings ``[n_ctx, d_model]`` (models with a ``pos_embed``)."""
        pos: EmbeddingBridge = self._part("pos_embed")
        return pos.W_pos

    @property
    def W_E_pos(self) -> torch.Tensor:
        """``W_E`` and ``W_pos`` concatenated, ``[d_vocab + n_ctx, d_model]`` (a copy)."""
        return torch.cat([self.W_E, self.W_pos], dim=0)

    @property
    def W_U(self) -> torch.Tensor:
        """The unembedding ``[d_model, d_vocab]``."""
        unembed: UnembeddingBridge = self._part("unembed")
        return unembed.W_U

    @property
    def b_U(self) -> torch.Tensor:
        """``[d_vocab]``."""
        unembed: UnembeddingBridge = self._part("unembed")
        return unembed.b_U

    @property
    def W_Q(self) -> torch.Tensor:
        """``[n_layers, n_heads, d_model, d_head]``."""
        return self._stack("attn", "W_Q")

    @property
    def W_K(self) -> torch.Tensor:
        """``[n_layers, n_heads, d_model, d_head]`` (key heads repeated under GQA)."""
        return self._stack("attn", "W_K")

    @property
    def W_V(self) -> torch.Tensor:
        """``[n_layers, n_heads, d_model, d_head]``."""
        return self._stack("attn", "W_V")

    @property
    def W_O(self) -> torch.Tensor:
        """``[n_layers, n_heads, d_head, d_model]``."""
        return self._stack("attn", "W_O")

    @property
    def b_Q(self) -> torch.Tensor:
        """``[n_layers, n_heads, d_head]``."""
        return self._stack("attn", "b_Q")

    @property
    def b_K(self) -> torch.Tensor:
        """``[n_layers, n_heads, d_head]``."""
        return self._stack("attn", "b_K")

    @property
    def b_V(self) -> torch.Tensor:
        """``[n_layers, n_heads, d_head]``."""
        return self._stack("attn", "b_V")

    @property
    def b_O(self) -> torch.Tensor:
        """``[n_layers, d_model]``."""
        return self._stack("attn", "b_O")

    @property
    def W_in(self) -> torch.Tensor:
        """``[n_layers, d_model, d_mlp]``."""
        return self._stack("mlp", "W_in")

    @property
    def W_gate(self) -> torch.Tensor | None:
        """``[n_layers, d_model, d_mlp]``, or None for MLPs without gate."""
        gates = [mlp.W_gate for mlp in self._blocks("mlp")]
        return None if any(g is None for g in gates) else stacked(gates)

    @property
    def W_out(self) -> torch.Tensor:
        """``[n_layers, d_mlp, d_model]``."""
        return self._stack("mlp", "W_out")

    @property
    def b_in(self) -> torch.Tensor:
        """``[n_layers, d_mlp]``."""
        return self._stack("mlp", "b_in")

    @property
    def b_out(self) -> torch.Tensor:
        """``[n_layers, d_model]``."""
        return self._stack("mlp", "b_out")

    @property
    def QK(self) -> FactoredMatrix:
        """``W_Q @ W_K^T`` per layer and head, ``[n_layers, n_heads, d_model, d_model]``."""
        from bridge_core.factored import FactoredMatrix

        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """``W_V @ W_O`` per layer and head, ``[n_layers, n_heads, d_model, d_model]``."""
        from bridge_core.factored import FactoredMatrix

        return FactoredMatrix(self.W_V, self.W_O)

    def all_head_labels(self) -> list[str]:
        """``L{layer}H{head}`` for every attention head."""
        return [f"L{i}H{h}" for i in range(self.cfg.n_layers) for h in range(self.cfg.n_heads)]

    def accumulated_bias(
        self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
    ) -> torch.Tensor:
        """The output biases (``b_O``, ``b_out``) of every layer before `layer`, summed.

        Args:
            layer: in ``[0, n_layers]``.
            mlp_input: also the attention bias of `layer` itself (the MLP's input).
            include_mlp_biases: False leaves out the MLPs' ``b_out``.

        Returns:
            ``[d_model]``.
        """
        n_layers = self.cfg.n_layers
        if not 0 <= layer <= n_layers or (mlp_input and layer == n_layers):
            top = n_layers - 1 if mlp_input else n_layers
            raise InputError(f"accumulated_bias: layer must be in 0..{top} (got {layer})")
        attn, mlps = self._blocks("attn"), self._blocks("mlp")
        total = torch.zeros(self.cfg.d_model, dtype=self.W_U.dtype, device=self.W_U.device)
        for i in range(layer):
            total = total + attn[i].b_O.as_subclass(torch.Tensor)
            if include_mlp_biases:
                total = total + mlps[i].b_out.as_subclass(torch.Tensor)
        if mlp_input:
            total = total + attn[layer].b_O.as_subclass(torch.Tensor)
        return total

    def tokens_to_residual_directions(self, tokens: str | int | torch.Tensor) -> torch.Tensor:
        """The unembedding direction of each token: ``W_U[:, token]``, shaped ``[d_model]``
        for one token and ``[..., d_model]`` for a tensor of them."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        if isinstance(tokens, torch.Tensor) and tokens.numel() > 1:
            return self.W_U[:, tokens.to(self.W_U.device)].movedim(0, -1)
        if isinstance(tokens, torch.Tensor):
            tokens = int(tokens.item())
        if not isinstance(tokens, int) or isinstance(tokens, bool):
            raise InputError(
                f"tokens must be a string, an int or a tensor of ids (got {type(tokens).__name__})"
            )
        return self.W_U[:, tokens]

    def to_single_token(self, string: str) -> int:  # the bridge's (TextMixin)
        raise NotImplementedError
