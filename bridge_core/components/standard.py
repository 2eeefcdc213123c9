"""The generic component kinds every transformer is made of."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from bridge_core.attention import PatternTap
from bridge_core.components.base import GeneralizedComponent
from bridge_core.hooks import HeadsView, HookPoint, InputTap, OutputTap, SliceView, Tap


class ModuleBridge(GeneralizedComponent):
    """Any module, with only ``hook_in`` and ``hook_out`` (kind ``"module"``)."""


class EmbeddingBridge(GeneralizedComponent):
    """Token (or position) embedding: ``hook_in`` gets ids, ``hook_out`` the embeddings."""

    input_arg: ClassVar[str] = "input"  # nn.Embedding.forward(input)


class NormalizationBridge(GeneralizedComponent):
    """LayerNorm / RMSNorm; ``hook_normalized`` is its output, as in TransformerLens."""

    hook_aliases: ClassVar[dict[str, str]] = {"hook_normalized": "hook_out"}


class UnembeddingBridge(GeneralizedComponent):
    """The LM head: ``hook_in`` is the final residual (normalized), ``hook_out`` the logits."""


class BlockBridge(GeneralizedComponent):
    """One transformer block; TransformerLens's residual-stream names are its aliases."""

    is_list_item: ClassVar[bool] = True
    hook_aliases: ClassVar[dict[str, str]] = {
        "hook_resid_pre": "hook_in",
        "hook_resid_mid": "ln2.hook_in",
        "hook_resid_post": "hook_out",
        "hook_attn_in": "attn.hook_in",
        "hook_attn_out": "attn.hook_out",
        "hook_mlp_in": "mlp.hook_in",
        "hook_mlp_out": "mlp.hook_out",
    }


class _AttentionHooks(GeneralizedComponent):
    """Shared part of the attention kinds: per-head q/k/v/z, scores and pattern."""

    internal_hooks = ("hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z")
    hook_q: HookPoint
    hook_k: HookPoint
    hook_v: HookPoint
    hook_z: HookPoint
    hook_attn_scores: HookPoint
    hook_pattern: HookPoint

    def d_head(self, module: nn.Module) -> int:
        """Head size: the ``head_dim`` option, the module's ``head_dim``, or the config's."""
        for value in (
            self.options.get("head_dim"),
            getattr(module, "head_dim", None),
            getattr(self.config, "d_head", None),
        ):
            if isinstance(value, int):
                return value
        raise ValueError(f"cannot tell the head size of {self.name!r}; set options.head_dim")

    def bind_heads(self, module: nn.Module, q: Tap, k: Tap, v: Tap) -> None:
        d_head = self.d_head(module)
        self.hook_q.bind(HeadsView(q, d_head))
        self.hook_k.bind(HeadsView(k, d_head))
        self.hook_v.bind(HeadsView(v, d_head))
        self.hook_z.bind(HeadsView(InputTap(self.part(module, "o")), d_head))
        self.hook_attn_scores.bind(PatternTap(module, "scores"))
        self.hook_pattern.bind(PatternTap(module, "pattern"))


class AttentionBridge(_AttentionHooks):
    """Attention with separate q/k/v projections (options ``q``, ``k``, ``v``, ``o``).

    ``hook_q/k/v/z`` are ``[batch, pos, head, d_head]`` (k and v with the key/value heads
    under grouped-query attention); q and k are taken before rotary embeddings.
    """

    path_options = required_options = ("q", "k", "v", "o")

    def bind(self, module: nn.Module) -> None:
        taps = [OutputTap(self.part(module, name)) for name in ("q", "k", "v")]
        self.bind_heads(module, *taps)


class JointQKVAttentionBridge(_AttentionHooks):
    """Attention with one fused qkv projection (options ``qkv``, ``o``, optional ``split``).

    ``split`` lists the q, k and v widths; by default the fused output splits in thirds.
    """

    path_options = required_options = ("qkv", "o")

    def bind(self, module: nn.Module) -> None:
        fused = OutputTap(self.part(module, "qkv"))
        sizes = self.options.get("split")
        if sizes is None:
            width = _out_features(self.part(module, "qkv"))
            sizes = [width // 3] * 3
        q, k, v = (SliceView(fused, tuple(sizes), index) for index in range(3))
        self.bind_heads(module, q, k, v)


class MLPBridge(GeneralizedComponent):
    """MLP, plain (options ``in``, ``out``) or gated (``gate``, ``up``, ``out``).

    ``hook_pre`` is the pre-activation hidden (the gate under gating), ``hook_pre_linear``
    the up projection of a gated MLP, ``hook_post`` the input of the output projection.
    """

    path_options = ("in", "gate", "up", "out")
    required_options = ("out",)
    internal_hooks = ("hook_pre", "hook_pre_linear", "hook_post")
    hook_pre: HookPoint
    hook_post: HookPoint
    hook_pre_linear: HookPoint

    def bind(self, module: nn.Module) -> None:
        first = "gate" if "gate" in self.options else "in"
        if first not in self.options:
            raise KeyError(f"component {self.name!r} needs the option 'in' (or 'gate' and 'up')")
        self.hook_pre.bind(OutputTap(self.part(module, first)))
        self.hook_post.bind(InputTap(self.part(module, "out")))
        if "up" in self.options:
            self.hook_pre_linear.bind(OutputTap(self.part(module, "up")))


def _out_features(module: nn.Module) -> int:
    weight = getattr(module, "weight", None)
    if weight is None:
        raise ValueError(f"cannot tell the output width of {type(module).__name__}")
    if isinstance(module, nn.Linear):
        return int(weight.shape[0])
    return int(weight.shape[-1])  # transformers' Conv1D stores [in, out]


BUILTIN_KINDS: dict[str, type[GeneralizedComponent]] = {
    "module": ModuleBridge,
    "embedding": EmbeddingBridge,
    "normalization": NormalizationBridge,
    "unembedding": UnembeddingBridge,
    "block": BlockBridge,
    "attention": AttentionBridge,
    "joint_qkv_attention": JointQKVAttentionBridge,
    "mlp": MLPBridge,
}
