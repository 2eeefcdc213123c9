"""Falcon's attention: its pattern hooks through a kernel of our own, since it has none to route.

`FalconAttention` reads ``config._attn_implementation`` itself and calls
``scaled_dot_product_attention`` (or multiplies q and k) inline, so the core's pattern taps,
which route a module's kernel through transformers' `AttentionInterface`, refuse it. The spec
language can say where Falcon's q, k, v and z are (``layout = "grouped"`` and the output
projection), but not compute a pattern that no module returns: that is this kind's one job.

`FalconAttentionBridge` recomputes the attention where the module's output projection
``dense`` receives ``z``, from what the module computed with: the fused qkv output (after any
``hook_q/k/v`` edit), the rotary embeddings, mask and key/value cache it was called with. As in
`bridge_core.attention`, this is an observation: while the hooks only read ``hook_rot_q/k``,
``hook_attn_scores`` and ``hook_pattern``, ``dense`` gets the module's own ``z``, so outputs
stay bit for bit the same; once a hook changes one of them, ``z`` is computed from the edited
tensors (``pattern @ v``), and ``hook_z`` sees that.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from bridge_core.attention import exact_with_grad, hooked_pattern
from bridge_core.components.standard import JointQKVAttentionBridge
from bridge_core.errors import BridgeError
from bridge_core.hooks import Handle, Run, changed_since, mark_tap, snapshot
from bridge_core.routes import Route, Runs
from bridge_core.views import Reshape, ViewTap

_KINDS = ("rot_q", "rot_k", "scores", "pattern")
_SUPPORTED = ("sdpa", "eager")


@dataclass(eq=False)
class _Kernel:
    """The recomputed attention of one Falcon attention module, and the hooks that use it."""

    module: nn.Module
    d_head: int
    groups: int
    runs: Runs[str] = field(default_factory=Runs)
    handles: tuple[Handle, ...] = ()
    fused: torch.Tensor | None = None
    call: dict[str, Any] = field(default_factory=dict)

    def add(self, which: str, run: Run) -> Handle:
        if which in _KINDS:
            self._check()
        if not self.runs:
            qkv = self.module.get_submodule("query_key_value")
            self.handles = (
                self.module.register_forward_pre_hook(mark_tap(self._before), with_kwargs=True),
                qkv.register_forward_hook(mark_tap(self._record)),  # last: sees q/k/v edits
                self.module.get_submodule("dense").register_forward_pre_hook(
                    mark_tap(self._at_z), prepend=True
                ),
            )
        self.runs.add(which, run)
        return _Remove(self, which, run)

    def remove(self, which: str, run: Run) -> None:
        self.runs.discard(which, run)
        if not self.runs:
            for handle in self.handles:
                handle.remove()
            self.handles = ()

    def _check(self) -> None:
        implementation = _implementation(self.module)
        if implementation not in _SUPPORTED:
            raise BridgeError(
                f"Falcon's attention patterns are computed for models running "
                f"{' or '.join(_SUPPORTED)} attention; {type(self.module).__name__} runs "
                f"{implementation!r}. Load the model with attn_implementation='sdpa'"
            )

    # -- what the module computes with -------------------------------------------------------

    def _before(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        self.fused = None
        self.call = kwargs

    def _record(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self.fused = output

    # -- where z enters the output projection -------------------------------------------------

    def _at_z(self, dense: nn.Module, args: tuple[Any, ...]) -> Any:
        z = args[0]
        try:
            new = self._attend(z) if any(k in self.runs for k in _KINDS) else z
        finally:
            self.fused, self.call = None, {}  # hold no activations between forwards
        if "z" in self.runs:
            new = self.runs["z"](new)
        return None if new is z else (new, *args[1:])

    def _attend(self, z: torch.Tensor) -> torch.Tensor:
        """z from the (hooked) rotated q, k and pattern: the module's own unless edited."""
        q, k, v = self._qkv()
        q, q_edited, q_other = _through_heads(self.runs.get("rot_q"), q)
        k, k_edited, k_other = _through_heads(self.runs.get("rot_k"), k)
        route: Route[str] = Route()
        for which in ("scores", "pattern"):
            if which in self.runs:
                route.runs.add(which, self.runs[which])
        mask = self.call.get("attention_mask")
        pattern, edited, other = hooked_pattern(self.module, q, k, mask, route)
        if edited or q_edited or k_edited:
            return _from_pattern(pattern, v).to(z.dtype)
        if (other or q_other or k_other) and pattern.requires_grad and torch.is_grad_enabled():
            return exact_with_grad(z, _from_pattern(pattern, v).to(z.dtype))  # backward hooks
        return z

    def _qkv(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated q ``[batch, head, pos, d_head]``, k and v (key/value heads, past included)."""
        if self.fused is None:
            raise BridgeError(
                f"{type(self.module).__name__} reached its output projection without its fused "
                "query_key_value output being seen, so its pattern hooks cannot be computed"
            )
        batch, pos, _ = self.fused.shape
        grouped = self.fused.view(batch, pos, self.groups, -1, self.d_head)
        q = grouped[..., :-2, :].flatten(2, 3).transpose(1, 2)
        k, v = (grouped[..., i, :].transpose(1, 2) for i in (-2, -1))
        if self.call.get("alibi") is None:
            cos, sin = self.call["position_embeddings"]
            rotate = cast(Callable[..., Any], _modeling(self.module).apply_rotary_pos_emb)
            q, k = rotate(q, k, cos, sin)
        elif _implementation(self.module) != "sdpa" or self.call.get("output_attentions"):
            raise BridgeError(
                "Falcon's ALiBi attention outside sdpa adds the bias in a way its pattern hooks "
                "do not reproduce; run the model with attn_implementation='sdpa'"
            )
        past = _past_keys(self.module, self.call.get("layer_past"), pos)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=-2), torch.cat([past[1], v], dim=-2)
        return q, k, v


@dataclass(frozen=True)
class _Remove:
    kernel: _Kernel
    which: str
    run: Run

    def remove(self) -> None:
        self.kernel.remove(self.which, self.run)


@dataclass(frozen=True)
class KernelTap:
    """One tensor of a `_Kernel`: ``rot_q``, ``rot_k``, ``scores``, ``pattern`` or ``z``."""

    kernel: _Kernel
    which: str

    def attach(self, run: Run) -> Handle:
        return self.kernel.add(self.which, run)


def _implementation(module: nn.Module) -> Any:
    return getattr(getattr(module, "config", None), "_attn_implementation", None)


def _modeling(module: nn.Module) -> Any:
    return sys.modules[type(module).__module__]


def _past_keys(module: nn.Module, cache: Any, pos: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Keys and values of the positions before these `pos` in the module's (updated) cache."""
    index: int = getattr(module, "layer_idx", 0)
    if cache is None or cache.get_seq_length(index) <= pos:
        return None
    layers = getattr(cache, "layers", None)
    layer = layers[index] if isinstance(layers, list) else None
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise BridgeError(
            f"Falcon's pattern hooks cannot read earlier keys from a {type(cache).__name__}"
        )
    keys, values = keys[..., : keys.shape[-2] - pos, :], values[..., : values.shape[-2] - pos, :]
    grouped = getattr(module, "new_decoder_architecture", False)
    groups: int = getattr(module, "num_kv_heads", 1) if grouped else keys.shape[1]
    step = keys.shape[1] // groups  # Falcon-40B caches each group's key once per query head
    return keys[:, ::step], values[:, ::step]


def _through_heads(run: Run | None, states: torch.Tensor) -> tuple[torch.Tensor, bool, bool]:
    """Hooks on ``[batch, head, pos, d]`` shown as ``[batch, pos, head, d]``.

    Returns:
        (the result, whether a hook changed it, whether the hooks handed on another tensor)
    """
    if run is None:
        return states, False, False
    shown = states.transpose(1, 2)
    before = snapshot(shown)
    new = run(shown)
    if new is shown:
        return states, changed_since(shown, before), False
    return new.transpose(1, 2), not torch.equal(new, shown), True


def _from_pattern(pattern: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``pattern @ value`` as the input of ``dense``: ``[batch, pos, head * d_head]``."""
    if value.shape[1] != pattern.shape[1]:
        value = value.repeat_interleave(pattern.shape[1] // value.shape[1], dim=1)
    return torch.matmul(pattern, value.to(pattern.dtype)).transpose(1, 2).flatten(2)


class FalconAttentionBridge(JointQKVAttentionBridge):
    """Falcon's attention (kind ``falcon_attention``): hook points as ``joint_qkv_attention``.

    The fused qkv is laid out per key/value group (option ``layout = "grouped"``, which fits
    all three Falcon layouts). ``hook_rot_q/k``, ``hook_attn_scores``, ``hook_pattern`` and
    ``hook_z`` go through the recomputed attention described in this module's docstring,
    which the spec language cannot express: Falcon computes its kernel inline.
    """

    def bind(self, module: nn.Module) -> None:
        super().bind(module)
        d_head = self.d_head(module)
        kernel = _Kernel(module, d_head, self.size("n_key_value_heads", "n_key_value_heads"))
        for which in _KINDS:
            if which.startswith("rot") and not self.rotary():
                continue
            getattr(self, f"hook_{'attn_scores' if which == 'scores' else which}").bind(
                KernelTap(kernel, which)
            )
        self.hook_z.bind(ViewTap(KernelTap(kernel, "z"), (Reshape((-1, d_head)),)))

    def skipped_checks(self) -> dict[str, str]:
        """ALiBi checkpoints (Falcon-RW): `verify` recomputes patterns without the bias."""
        if getattr(self.config, "positional_embedding_type", None) != "alibi":
            return {}
        return {"pattern": "Falcon-RW adds an ALiBi bias to the scores, which verify does not"}

    def dims(self) -> dict[str, int | None]:
        """Falcon's config says ``num_kv_heads``: the key/value heads come from the bridge's."""
        values = super().dims()
        values["n_kv_heads"] = getattr(self.config, "n_key_value_heads", None)
        return values


__all__ = ["FalconAttentionBridge", "KernelTap"]
