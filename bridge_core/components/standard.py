"""The generic component kinds every transformer is made of."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from bridge_core.attention import PatternTap, ResultTap
from bridge_core.components.base import GeneralizedComponent, Shape
from bridge_core.components.moe import MoEBridge
from bridge_core.errors import BridgeError
from bridge_core.hooks import HookPoint, InputTap, OutputTap, Tap
from bridge_core.normalization import NormTap, norm_math
from bridge_core.views import Flatten, Reshape, Split, ViewTap
from bridge_core.weights import (
    AttentionWeights,
    MLPWeights,
    Projection,
    in_out,
    zeros_bias,
)

RESID: Shape = ("batch", "pos", "d_model")
HEADS: Shape = ("batch", "pos", "n_heads", "d_head")
KV_HEADS: Shape = ("batch", "kpos", "n_kv_heads", "d_head")
MLP_HIDDEN: Shape = ("batch", "pos", "d_mlp")


class ModuleBridge(GeneralizedComponent):
    """Any module, with only ``hook_in`` and ``hook_out`` (kind ``"module"``)."""


class EmbeddingBridge(GeneralizedComponent):
    """Token (or position) embedding: ``hook_in`` gets ids, ``hook_out`` the embeddings."""

    input_arg: ClassVar[str] = "input"  # nn.Embedding.forward(input)
    hook_shapes: ClassVar[dict[str, Shape]] = {"hook_in": ("batch", "pos"), "hook_out": RESID}

    @property
    def W_E(self) -> torch.Tensor:
        """The embedding matrix ``[d_vocab, d_model]`` (the HF parameter itself)."""
        return _parameter(self, "weight")

    @property
    def W_pos(self) -> torch.Tensor:
        """The same matrix under TransformerLens's name for position embeddings, ``[n_ctx,
        d_model]``."""
        return _parameter(self, "weight")


class NormalizationBridge(GeneralizedComponent):
    """LayerNorm / RMSNorm, with TransformerLens's ``hook_scale`` and ``hook_normalized``.

    ``hook_scale`` is the divisor ``[batch, pos, 1]`` and ``hook_normalized`` the normalized
    input before the norm's weight and bias; ``hook_out`` is the norm's output. Both are
    computed from the norm's input while hooked (`bridge_core.normalization`): options
    ``norm`` ("LN" / "RMS"; by default LN for ``nn.LayerNorm`` or a norm with a bias, else
    the config's ``normalization_type``), ``eps`` and ``weight_offset`` (1 for norms that
    multiply by ``1 + weight``) say how, where the module does not.
    """

    internal_hooks = ("hook_scale", "hook_normalized")
    hook_shapes: ClassVar[dict[str, Shape]] = {
        "hook_in": RESID,
        "hook_scale": ("batch", "pos", 1),
        "hook_normalized": RESID,
        "hook_out": RESID,
    }
    hook_scale: HookPoint
    hook_normalized: HookPoint

    def bind(self, module: nn.Module) -> None:
        math = norm_math(module, self.options, self.config)
        self.hook_scale.bind(NormTap(module, "scale", math))
        self.hook_normalized.bind(NormTap(module, "normalized", math))
        self.hook_out._tap = None  # the output goes through the same hook, after the two
        self.hook_out.bind(NormTap(module, "out", math))

    def hooks_bound(self) -> None:
        """A spec that shows the norm's input through a view (per-head q/k norms transposed,
        OPT's flattened tokens) shows the scale and the normalized input through it too, and
        its output through the norm's own hook; their documented shapes follow the input's."""
        module = self.original_component
        tap_in, tap_out = self.hook_in._tap, self.hook_out._tap
        if isinstance(tap_in, ViewTap):
            for point in (self.hook_scale, self.hook_normalized):
                if isinstance(point._tap, NormTap):
                    inner, point._tap = point._tap, None
                    point.bind(ViewTap(inner, tap_in.steps))
        if (
            isinstance(tap_out, ViewTap)
            and isinstance(tap_out.inner, OutputTap)
            and tap_out.inner.module is module
            and isinstance(self.hook_normalized._tap, ViewTap | NormTap)
        ):
            math = norm_math(tap_out.inner.module, self.options, self.config)
            self.hook_out._tap = None
            self.hook_out.bind(ViewTap(NormTap(tap_out.inner.module, "out", math), tap_out.steps))
        shape = self.hook_in.shape
        if shape is not None and shape != RESID:
            self.hook_normalized.shape = shape
            self.hook_scale.shape = (*shape[:-1], 1)

    @property
    def w(self) -> torch.Tensor:
        """The norm's weight ``[d_model]`` (TransformerLens's name)."""
        return _parameter(self, "weight")

    @property
    def b(self) -> torch.Tensor:
        """The norm's bias ``[d_model]`` (zeros, linked, for a norm without one)."""
        bias = getattr(self.original_component, "bias", None)
        if isinstance(bias, torch.Tensor):
            return bias
        return zeros_bias(tuple(self.w.shape), self.w, f"{self.name}.b")


class UnembeddingBridge(GeneralizedComponent):
    """The LM head: ``hook_in`` is the final residual (normalized), ``hook_out`` the logits."""

    hook_shapes: ClassVar[dict[str, Shape]] = {
        "hook_in": RESID,
        "hook_out": ("batch", "pos", "d_vocab"),
    }

    @property
    def W_U(self) -> torch.Tensor:
        """The unembedding ``[d_model, d_vocab]`` (a view of the LM head's weight)."""
        return in_out(_module(self))

    @property
    def b_U(self) -> torch.Tensor:
        """``[d_vocab]`` (zeros, linked, for an LM head without bias)."""
        bias = getattr(_module(self), "bias", None)
        if isinstance(bias, torch.Tensor):
            return bias
        return zeros_bias((self.W_U.shape[-1],), self.W_U, f"{self.name}.b_U")


class BlockBridge(GeneralizedComponent):
    """One transformer block; TransformerLens's residual-stream names are its aliases.

    A parallel block (``cfg.block_layout == "parallel"``: attention and MLP both read
    ``resid_pre``) has no ``hook_resid_mid``.
    """

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
    hook_shapes: ClassVar[dict[str, Shape]] = {"hook_in": RESID, "hook_out": RESID}

    def set_original_component(self, module: nn.Module) -> None:
        """Bind as usual; a parallel block drops the ``hook_resid_mid`` alias."""
        super().set_original_component(module)
        if getattr(self.config, "block_layout", None) == "parallel":
            self.removed_aliases.add("hook_resid_mid")


class _AttentionHooks(AttentionWeights, GeneralizedComponent):
    """Shared part of the attention kinds: per-head q/k/v/z, rotated q/k, scores, pattern.

    Options: ``o`` (the output projection), ``kernel`` (the submodule that calls the
    attention kernel, when it is not the component's module itself, e.g. BERT's ``self``),
    ``head_dim``, and ``rotary`` (offer ``hook_rot_q/k``; by default when the config's
    positional embeddings are rotary).
    """

    internal_hooks = (
        "hook_q",
        "hook_k",
        "hook_v",
        "hook_rot_q",
        "hook_rot_k",
        "hook_attn_scores",
        "hook_pattern",
        "hook_z",
        "hook_result",
    )
    path_options: ClassVar[tuple[str, ...]] = ("o", "kernel")
    size_options: ClassVar[tuple[str, ...]] = ("head_dim",)
    hook_shapes: ClassVar[dict[str, Shape]] = {
        "hook_in": RESID,
        "hook_q": HEADS,
        "hook_k": KV_HEADS,
        "hook_v": KV_HEADS,
        "hook_rot_q": HEADS,
        "hook_rot_k": KV_HEADS,
        "hook_attn_scores": ("batch", "n_heads", "pos", "kpos"),
        "hook_pattern": ("batch", "n_heads", "pos", "kpos"),
        "hook_z": HEADS,
        "hook_result": ("batch", "pos", "n_heads", "d_model"),
        "hook_out": RESID,
    }
    hook_q: HookPoint
    hook_k: HookPoint
    hook_v: HookPoint
    hook_rot_q: HookPoint
    hook_rot_k: HookPoint
    hook_z: HookPoint
    hook_attn_scores: HookPoint
    hook_pattern: HookPoint
    hook_result: HookPoint

    def d_head(self, module: nn.Module) -> int:
        """Head size: the ``head_dim`` option, the module's ``head_dim``, or the config's."""
        if "head_dim" in self.options:
            return self.size(self.options["head_dim"], "options.head_dim")
        for value in (
            getattr(self.kernel(module), "head_dim", None),
            getattr(module, "head_dim", None),
            getattr(self.config, "d_head", None),
        ):
            if isinstance(value, int):
                return value
        raise ValueError(f"cannot tell the head size of {self.name!r}; set options.head_dim")

    def head_size(self) -> int:
        """The head size of the bridged module."""
        return self.d_head(_module(self))

    def kernel(self, module: nn.Module) -> nn.Module:
        """The submodule that calls the attention kernel (option ``kernel``, else `module`)."""
        return self.part(module, "kernel") if "kernel" in self.options else module

    def rotary(self) -> bool:
        """Whether q and k are rotated inside the kernel call (option, else the config)."""
        if "rotary" in self.options:
            return bool(self.options["rotary"])
        return getattr(self.config, "positional_embedding_type", None) == "rotary"

    def bind_heads(self, module: nn.Module, q: Tap, k: Tap, v: Tap) -> None:
        """Bind the per-head taps `q`, `k`, `v` (``[batch, pos, head, d_head]``) and the rest."""
        d_head = self.d_head(module)
        kernel = self.kernel(module)
        self.hook_q.bind(q)
        self.hook_k.bind(k)
        self.hook_v.bind(v)
        o = self.part(module, "o")
        self.hook_z.bind(ViewTap(InputTap(o), (Reshape((-1, d_head)),)))
        self.hook_attn_scores.bind(PatternTap(kernel, "scores"))
        self.hook_pattern.bind(PatternTap(kernel, "pattern"))
        if self.rotary():
            self.hook_rot_q.bind(PatternTap(kernel, "rot_q"))
            self.hook_rot_k.bind(PatternTap(kernel, "rot_k"))
        self.hook_result.bind(ResultTap(o, d_head))
        self.hook_result.enabled = False  # opt-in, as TransformerLens's use_attn_result

    def dims(self) -> dict[str, int | None]:
        """Head counts and widths from the HF module's own config where it has one."""
        values = super().dims()
        module = self.original_component
        if module is None:
            return values
        hf = getattr(self.kernel(module), "config", None)
        heads = getattr(hf, "num_attention_heads", None)
        if isinstance(heads, int):
            kv = getattr(hf, "num_key_value_heads", None)
            values.update(n_heads=heads, n_kv_heads=kv if isinstance(kv, int) else heads)
            width = getattr(hf, "hidden_size", None)
            if isinstance(width, int):
                values["d_model"] = width
        values["d_head"] = self.d_head(module)
        return values


def _heads(inner: Tap, d_head: int) -> ViewTap:
    return ViewTap(inner, (Reshape((-1, d_head)),))


class AttentionBridge(_AttentionHooks):
    """Attention with separate q/k/v projections (options ``q``, ``k``, ``v``, ``o``).

    ``hook_q/k/v/z`` are ``[batch, pos, head, d_head]`` (k and v with the key/value heads
    under grouped-query attention); q and k are taken before rotary embeddings,
    ``hook_rot_q/k`` after (as the kernel receives them).
    """

    path_options: ClassVar[tuple[str, ...]] = ("q", "k", "v", "o", "kernel")
    required_options: ClassVar[tuple[str, ...]] = ("q", "k", "v", "o")

    def bind(self, module: nn.Module) -> None:
        d_head = self.d_head(module)
        q, k, v = (_heads(OutputTap(self.part(module, n)), d_head) for n in ("q", "k", "v"))
        self.bind_heads(module, q, k, v)

    def projection(self, which: str) -> Projection:
        """The projection module named by option `which` (``q``, ``k``, ``v`` or ``o``)."""
        return Projection(self.part(_module(self), which))


class JointQKVAttentionBridge(_AttentionHooks):
    """Attention with one fused qkv projection (options ``qkv``, ``o``, ``split``, ``layout``).

    ``layout = "split"`` (default): the fused output is ``[q | k | v]``, split into the widths
    ``split`` gives (sizes or expressions such as ``"n_key_value_heads * d_head"``; by default
    in thirds). ``layout = "per_head"``: it is ``[q_h | k_h | v_h]`` for each head in turn
    (GPT-NeoX, BLOOM). ``layout = "grouped"``: it is ``[q_g | k_g | v_g]`` for each of the
    config's ``n_key_value_heads`` groups in turn, ``q_g`` the group's query heads (Falcon-40B;
    with one group it is multi-query ``[q | k | v]``, with one query head per group
    ``per_head``).
    """

    path_options: ClassVar[tuple[str, ...]] = ("qkv", "o", "kernel")
    required_options: ClassVar[tuple[str, ...]] = ("qkv", "o")
    size_options: ClassVar[tuple[str, ...]] = ("head_dim", "split")

    def bind(self, module: nn.Module) -> None:
        d_head = self.d_head(module)
        fused = OutputTap(self.part(module, "qkv"))
        layout = self.options.get("layout", "split")
        if layout == "per_head":
            per_head = Reshape((-1, 3 * d_head))
            q, k, v = (ViewTap(fused, (per_head, Split((d_head,) * 3, i))) for i in range(3))
        elif layout == "split":
            sizes = self._split_sizes(module)
            q, k, v = (ViewTap(fused, (Split(sizes, i), Reshape((-1, d_head)))) for i in range(3))
        elif layout == "grouped":
            q, k, v = self._grouped(module, fused, d_head)
        else:
            raise ValueError(
                f"options.layout must be 'split', 'per_head' or 'grouped' (got {layout!r})"
            )
        self.bind_heads(module, q, k, v)

    def _grouped(
        self, module: nn.Module, fused: Tap, d_head: int
    ) -> tuple[ViewTap, ViewTap, ViewTap]:
        """q, k, v of a fused output laid out as ``[q_g | k_g | v_g]`` per key/value group."""
        groups = self.size("n_key_value_heads", "options.layout")
        width = _out_features(self.part(module, "qkv"))
        if width % groups or width // groups <= 2 * d_head:
            raise ValueError(
                f"options.layout = 'grouped': the fused width {width} is not {groups} groups of "
                f"query heads and one key and one value head of {d_head}"
            )
        group = width // groups
        sizes = (group - 2 * d_head, d_head, d_head)
        per_group = Reshape((groups, group))
        q = ViewTap(fused, (per_group, Split(sizes, 0), Flatten(2), Reshape((-1, d_head))))
        k, v = (ViewTap(fused, (per_group, Split(sizes, i))) for i in (1, 2))
        return q, k, v

    def projection(self, which: str) -> Projection:
        """``o``, or the part of the fused qkv projection that is ``q``, ``k`` or ``v``."""
        module = _module(self)
        if which == "o":
            return Projection(self.part(module, "o"))
        index = "qkv".index(which)
        fused = self.part(module, "qkv")
        layout = self.options.get("layout", "split")
        d_head = self.d_head(module)
        if layout == "per_head":
            n_heads = _out_features(fused) // (3 * d_head)
            return Projection(fused, blocks=(n_heads, index * d_head, d_head))
        if layout == "grouped":
            groups = self.size("n_key_value_heads", "options.layout")
            group = _out_features(fused) // groups
            sizes = (group - 2 * d_head, d_head, d_head)
            return Projection(fused, blocks=(groups, sum(sizes[:index]), sizes[index]))
        sizes = self._split_sizes(module)
        return Projection(fused, part=(sum(sizes[:index]), sizes[index]))

    def _split_sizes(self, module: nn.Module) -> tuple[int, int, int]:
        given = self.options.get("split")
        if given is None:
            third = _out_features(self.part(module, "qkv")) // 3
            return third, third, third
        if not isinstance(given, list) or len(given) != 3:
            raise ValueError(f"options.split lists the q, k and v widths (got {given!r})")
        q, k, v = (self.size(size, "options.split") for size in given)
        return q, k, v


class MLPBridge(MLPWeights, GeneralizedComponent):
    """MLP: plain (options ``in``, ``out``), gated (``gate``, ``up``, ``out``) or fused gated
    (``gate_up``, whose output is ``[gate | up]``, and ``out``, as Phi-3).

    ``hook_pre`` is the pre-activation hidden (the gate under gating), ``hook_pre_linear``
    the up projection of a gated MLP, ``hook_post`` the input of the output projection.
    """

    path_options: ClassVar[tuple[str, ...]] = ("in", "gate", "up", "gate_up", "out")
    required_options: ClassVar[tuple[str, ...]] = ("out",)
    internal_hooks = ("hook_pre", "hook_pre_linear", "hook_post")
    hook_shapes: ClassVar[dict[str, Shape]] = {
        "hook_in": RESID,
        "hook_pre": MLP_HIDDEN,
        "hook_pre_linear": MLP_HIDDEN,
        "hook_post": MLP_HIDDEN,
        "hook_out": RESID,
    }
    hook_pre: HookPoint
    hook_post: HookPoint
    hook_pre_linear: HookPoint

    def bind(self, module: nn.Module) -> None:
        self.hook_post.bind(InputTap(self.part(module, "out")))
        if "gate_up" in self.options:
            fused = self.part(module, "gate_up")
            half = _out_features(fused) // 2
            self.hook_pre.bind(ViewTap(OutputTap(fused), (Split((half, half), 0),)))
            self.hook_pre_linear.bind(ViewTap(OutputTap(fused), (Split((half, half), 1),)))
            return
        first = "gate" if "gate" in self.options else "in"
        if first not in self.options:
            raise KeyError(
                f"component {self.name!r} needs the option 'in' (or 'gate' and 'up', or 'gate_up')"
            )
        self.hook_pre.bind(OutputTap(self.part(module, first)))
        if "up" in self.options:
            self.hook_pre_linear.bind(OutputTap(self.part(module, "up")))

    def projection(self, which: str) -> Projection | None:
        """``in`` (the up projection of a gated MLP), ``gate`` (None without) or ``out``."""
        module = _module(self)
        if "gate_up" in self.options:
            fused = self.part(module, "gate_up")
            half = _out_features(fused) // 2
            parts = {"gate": (0, half), "in": (half, half)}
            if which in parts:
                return Projection(fused, part=parts[which])
        option = {"in": "up" if "up" in self.options else "in"}.get(which, which)
        if option not in self.options:
            return None
        return Projection(self.part(module, option))

    def dims(self) -> dict[str, int | None]:
        """The hidden width from the output projection's input where it tells."""
        values = super().dims()
        module = self.original_component
        out = self.part(module, "out") if module is not None else None
        width = getattr(out, "in_features", None) or getattr(out, "nx", None)
        if isinstance(width, int):
            values["d_mlp"] = width
        return values


def _module(component: GeneralizedComponent) -> nn.Module:
    module = component.original_component
    if module is None:
        raise RuntimeError(f"component {component.name!r} is not attached to an HF module")
    return module


def _parameter(component: GeneralizedComponent, name: str) -> torch.Tensor:
    value = getattr(_module(component), name, None)
    if not isinstance(value, torch.Tensor):
        raise BridgeError(f"{component.name}: {type(_module(component)).__name__} has no {name}")
    return value


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
    "moe": MoEBridge,
}
