"""TransformerLens's ``hook_scale`` and ``hook_normalized``, computed beside an unchanged norm.

HF's LayerNorm / RMSNorm modules compute ``normalized * weight (+ bias)`` in one kernel, so
the divisor and the normalized input are never tensors of their own. While a hook is attached
to ``hook_scale`` or ``hook_normalized`` of a norm, one forward hook on its module computes
them from the module's input, as TransformerLens does (``scale = sqrt(mean(x_c^2) + eps)``
with ``x_c`` the centred input for LayerNorm and the input itself for RMSNorm;
``normalized = x_c / scale``, in float32 for half-precision inputs; LayerNorm's from one
``native_layer_norm`` call, equal to those formulas up to rounding), and runs the hooks. The
module's own output is kept unless a hook edits one of them (in place or by returning an
unequal tensor); then the output is recomputed from the edited value (``normalized * weight
+ bias``). A returned tensor that carries backward hooks puts the recomputation on the
gradient's path with the module's exact values (`exact_with_grad`).

``hook_out`` of the norm goes through the same forward hook, after the other two, so an edit
of the normalized value is what ``hook_out`` sees, whatever order the hooks were added in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from bridge_core.attention import exact_with_grad
from bridge_core.errors import BridgeError
from bridge_core.hooks import (
    Handle,
    Run,
    changed_since,
    first_tensor,
    replace_first,
    snapshot,
)
from bridge_core.routes import Route, Routes
from bridge_core.torch_hooks import forward_hook

Which = Literal["scale", "normalized", "out"]
Kind = Literal["LN", "RMS"]


@dataclass(frozen=True)
class NormMath:
    """How a norm module normalizes: LayerNorm or RMSNorm, eps, and a weight offset
    (Gemma's RMSNorm multiplies by ``1 + weight``)."""

    kind: Kind
    eps: float
    weight_offset: float = 0.0

    def stats(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(the input, in float32 for half precision; the mean LayerNorm subtracts, None for
        RMSNorm; the scale ``[..., 1]``; the normalized input, LayerNorm's only: all of
        LayerNorm's come from one `native_layer_norm`)."""
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        if self.kind == "LN":
            normalized, mean, rstd = torch.native_layer_norm(
                x, (x.shape[-1],), None, None, self.eps
            )
            return x, mean, rstd.reciprocal(), normalized
        return x, None, x.square().mean(-1, keepdim=True).add_(self.eps).sqrt_(), None

    def affine(
        self, module: nn.Module, normalized: torch.Tensor, like: torch.Tensor
    ) -> torch.Tensor:
        """The module's output from a normalized value, in the dtype of `like`."""
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        out = normalized.to(like.dtype)
        if isinstance(weight, torch.Tensor):
            out = out * (weight + self.weight_offset if self.weight_offset else weight)
        if isinstance(bias, torch.Tensor):
            out = out + bias
        out = out.to(like.dtype)
        if out.stride() != like.stride():  # arithmetic keeps the input's strides; the module's
            out = torch.empty_like(like).copy_(out)  # output may differ (HF may .view() it)
        return out


def norm_math(module: nn.Module, options: dict[str, Any], config: Any) -> NormMath:
    """The `NormMath` of `module`: options ``norm`` ("LN" / "RMS"), ``eps``,
    ``weight_offset`` first, then the module (nn.LayerNorm is "LN"), then the config."""
    kind = options.get("norm")
    if kind is None:
        layer_norm = isinstance(module, nn.LayerNorm) or (
            isinstance(getattr(module, "bias", None), torch.Tensor)
        )
        kind = "LN" if layer_norm else getattr(config, "normalization_type", None) or "RMS"
    if kind not in ("LN", "RMS"):
        raise ValueError(f"options.norm must be 'LN' or 'RMS' (got {kind!r})")
    checked: Kind = "LN" if kind == "LN" else "RMS"
    eps = options.get("eps")
    for candidate in ("eps", "variance_epsilon", "epsilon"):
        if eps is None:
            eps = getattr(module, candidate, None)
    if eps is None:
        eps = getattr(config, "eps", None) or 1e-5
    return NormMath(checked, float(eps), float(options.get("weight_offset", 0.0)))


@dataclass
class _Route(Route[str]):
    math: NormMath = field(kw_only=True)


_ROUTES: Routes[_Route] = Routes()


@dataclass(frozen=True)
class NormTap:
    """``hook_scale``, ``hook_normalized`` or ``hook_out`` of a norm module."""

    module: nn.Module
    which: Which
    math: NormMath

    def attach(self, run: Run) -> Handle:
        return _ROUTES.attach(self.module, self.which, run, self._first)

    def _first(self) -> _Route:
        route = _Route(math=self.math)
        hook = _hook(route)
        route.handles = (forward_hook(self.module, hook),)
        return route


def _hook(route: _Route) -> Any:
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        out = first_tensor(output)
        new = out
        if "scale" in route.runs or "normalized" in route.runs:
            if not args or not isinstance(args[0], torch.Tensor):
                raise BridgeError(
                    f"hook_scale / hook_normalized need {type(module).__name__}'s input as "
                    "its first positional argument"
                )
            new = _recomputed(module, route, args[0], out)
        if "out" in route.runs:
            new = route.runs["out"](new)
        return None if new is out else replace_first(output, new)

    return hook


def _recomputed(
    module: nn.Module, route: _Route, x: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """The module's output after the scale and normalized hooks (`out` itself if unedited)."""
    math, runs = route.math, route.runs
    x, mean, scale, normalized = math.stats(x)
    edited = other = False
    if "scale" in runs:
        scale, edited, other = through(runs["scale"], scale)
    if not (edited or other or "normalized" in runs):
        return out  # the scale was only read: nothing needs the normalized value
    if edited or other or normalized is None:  # from the scale the hooks handed on
        normalized = (x if mean is None else x - mean) / scale
    if "normalized" in runs:
        normalized, changed, replaced = through(runs["normalized"], normalized)
        edited, other = edited or changed, other or replaced
    if edited:
        return math.affine(module, normalized, out)
    if other and normalized.requires_grad and torch.is_grad_enabled():  # backward hooks
        return exact_with_grad(out, math.affine(module, normalized, out))
    return out


def through(run: Run, tensor: torch.Tensor) -> tuple[torch.Tensor, bool, bool]:
    """Run hooks on a computed tensor: (the result, whether they edited it, whether it is
    another tensor). Edited is changed in place or replaced by an unequal tensor; an equal
    one (an identity edit, or a view that carries backward hooks) is not an edit."""
    before = snapshot(tensor)
    hooked = run(tensor)
    other = hooked is not tensor
    if changed_since(tensor, before):
        return hooked, True, other
    return hooked, other and not torch.equal(hooked, tensor), other
