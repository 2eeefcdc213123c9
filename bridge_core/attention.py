"""Attention patterns (and rotated q/k) on demand, without touching the model's kernel otherwise.

HF attention modules pick their kernel by name from ``config._attn_implementation``
through transformers' public `AttentionInterface`. While a hook is attached to
``hook_attn_scores``, ``hook_pattern``, ``hook_rot_q`` or ``hook_rot_k`` of some layer, we
register (once) a routing implementation under our own key, point that layer's config at
it, and restore the original name when the last such hook goes. The router runs the hooks
for the hooked modules only; every other module is handed to the original implementation
with the original mask format, so it computes exactly what it computed before.

A module whose forward does not dispatch through the interface (it reads the kernel name
itself, as Falcon's does) is refused when the hook is added: switching its kernel name
would change what it computes. A module that still never calls the router while hooked
raises at the end of its forward, so a pattern hook never silently fails to fire.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import nn

from bridge_core.eager_kernel import EagerTaps
from bridge_core.errors import BridgeError
from bridge_core.hooks import (
    Handle,
    Run,
    changed_since,
    first_tensor,
    replace_first,
    snapshot,
)
from bridge_core.routes import Route, Routes, Runs
from bridge_core.switches import PREFIX, KernelSwitch, watch
from bridge_core.torch_hooks import forward_hook

Which = Literal["scores", "pattern", "rot_q", "rot_k"]
Kernel = Callable[..., tuple[torch.Tensor, Any]]
_SUPPORTED = ("sdpa", "eager")
_DISPATCH = "ALL_ATTENTION_FUNCTIONS"


@dataclass
class _Route(Route[str]):
    """The hook runs of one hooked attention module, and whether the router saw its call.

    Each attached point adds its run (two bridges over one model each add theirs; a point's
    run does nothing in another bridge's forward), in order; they run one after the other.
    """

    called: bool = False
    kernel: Kernel | None = None  # the module's own kernel, looked up once when hooked
    eager: bool = False  # the kernel is the module's eager one, which computes the pattern

    def release(self, module: nn.Module) -> None:
        """The module's last: its config goes back to its own kernel."""
        super().release(module)
        SWITCH.off(module)

    def restore(self, module: nn.Module) -> bool:
        """The module's next first attach: switch its config again, look its own kernel up
        again (its kernel name may have changed since), and put the hooks back."""
        SWITCH.on(module)
        try:
            original = SWITCH.original(module)
            kernel = _original_kernel(module, original)
        except BaseException:
            SWITCH.off(module)
            raise
        if not super().restore(module):
            SWITCH.off(module)
            return False
        self.kernel, self.eager = kernel, original == "eager"
        return True


# attention module -> its route
_ROUTES: Routes[_Route] = Routes()


@dataclass(frozen=True)
class PatternTap:
    """The attention scores (pre-softmax), the pattern, or the rotated q / k of one HF module.

    Rotated q and k (``rot_q`` / ``rot_k``) are what the kernel receives, shown as
    ``[batch, pos, head, d_head]``.
    """

    module: nn.Module
    which: Which

    def attach(self, run: Run) -> Handle:
        return _ROUTES.attach(self.module, self.which, run, self._first)

    def _first(self) -> _Route:
        """The module's first hooked tap: check it and switch its config."""
        check_dispatch(self.module)
        SWITCH.on(self.module)
        route = _Route()
        route.handles = watch(self.module, route, functools.partial(_missed, runs=route.runs))
        original = SWITCH.original(self.module)
        route.kernel = _original_kernel(self.module, original)
        route.eager = original == "eager"
        return route


def check_dispatch(module: nn.Module) -> None:
    """Refuse a module whose forward does not pick its kernel through `AttentionInterface`.

    Raises:
        BridgeError: naming the module class and what would be needed.
    """
    SWITCH.config_of(module)
    if not _dispatches(type(module)):
        raise BridgeError(
            f"{type(module).__name__} ({type(module).__module__}) does not choose its kernel "
            f"through transformers' AttentionInterface ({_DISPATCH}), so its attention pattern "
            "cannot be computed without changing what it computes; hook_pattern, "
            "hook_attn_scores and hook_rot_q/k are not available for it (an adapter can "
            "provide a kernel for it as a component kind)"
        )


_DISPATCHING: dict[type, bool] = {}


def _dispatches(cls: type[nn.Module]) -> bool:
    """Whether `cls.forward` picks its kernel from transformers' attention functions."""
    if cls not in _DISPATCHING:
        code = getattr(inspect.unwrap(cls.forward), "__code__", None)
        _DISPATCHING[cls] = code is not None and _DISPATCH in code.co_names
    return _DISPATCHING[cls]


def _missed(module: nn.Module, runs: Runs[str]) -> str:
    return (
        f"{type(module).__name__} ran without calling its attention kernel through "
        "transformers' AttentionInterface, so its hook_pattern / hook_attn_scores / "
        f"hook_rot_q/k hooks ({sorted(runs)}) could not fire; this module cannot offer them"
    )


def _register_router(original: str) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    key = PREFIX + original
    if key not in AttentionInterface._global_mapping:
        AttentionInterface.register(key, route_attention)
        AttentionMaskInterface.register(key, ALL_MASK_ATTENTION_FUNCTIONS[original])


def _refuse(module: nn.Module, original: str) -> BridgeError:
    return BridgeError(
        f"attention patterns are computed for models running {' or '.join(_SUPPORTED)} "
        f"attention; {type(module).__name__} runs {original!r}. Load the model with "
        "attn_implementation='sdpa' to hook patterns"
    )


SWITCH = KernelSwitch(
    attribute="_attn_implementation",
    what="attention",
    supported=_SUPPORTED,
    router_name=lambda original: PREFIX + original,
    register=_register_router,
    refuse=_refuse,
)
"""Points a hooked attention module's config at `route_attention` (see `bridge_core.switches`)."""


def _original_kernel(module: nn.Module, original: str | None = None) -> Kernel:
    """The kernel `module` runs under its own kernel name `original` (by default its config's;
    `SWITCH.original` is also right in a copy of a model made while hooked)."""
    from transformers import AttentionInterface

    if original is None:
        original = SWITCH.original(module)
    if original != "eager":
        # typed differently across transformers 5.x (Any, then a plain function)
        return cast(Kernel, AttentionInterface._global_mapping[original])
    kernel = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if kernel is None:
        raise BridgeError(f"{type(module).__module__} defines no eager_attention_forward")
    return cast(Kernel, kernel)


def route_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotated q/k, scores and pattern hooks for hooked modules; the original kernel otherwise.

    A module running eager attention computes its pattern itself: the hooks run inside its
    kernel, on the kernel's own tensors (`bridge_core.eager_kernel`). Otherwise (sdpa, or an
    eager kernel that is not understood) the pattern is computed beside the kernel, as HF's
    eager attention computes it. While the hooks leave it as it is (reading it, or returning
    an equal tensor), the module's output still comes from the original kernel, so observing
    never changes the model's outputs; once a hook changes the scores or the pattern, the
    output is computed from the edited pattern.
    """
    route = _ROUTES.get(module)
    if route is None or route.kernel is None:  # `get` gives only attached routes
        return _original_kernel(module)(module, query, key, value, attention_mask, **kwargs)
    original = route.kernel
    route.called = True
    runs = route.runs
    if "rot_q" in runs:
        query = _through_heads(route, "rot_q", query)
    if "rot_k" in runs:
        key = _through_heads(route, "rot_k", key)
    if "scores" not in runs and "pattern" not in runs:
        return original(module, query, key, value, attention_mask, **kwargs)
    output = None
    if route.eager:  # the kernel computes the pattern: the hooks run inside it
        shape = torch.Size((*query.shape[:3], key.shape[2]))
        taps = EagerTaps(shape, runs.get("scores"), runs.get("pattern"))
        with taps:
            output, _ = original(module, query, key, value, attention_mask, **kwargs)
        if taps.understood:
            return output, cast(torch.Tensor, taps.pattern)
        taps.check(module)
    pattern, edited, replaced = hooked_pattern(module, query, key, attention_mask, route, **kwargs)
    if edited:
        return _from_pattern(module, pattern, value, kwargs), pattern
    if output is None:
        output, _ = original(module, query, key, value, attention_mask, **kwargs)
    if replaced and pattern.requires_grad and torch.is_grad_enabled():  # backward hooks
        output = exact_with_grad(output, _from_pattern(module, pattern, value, kwargs))
    return output, pattern


def _from_pattern(
    module: nn.Module, pattern: torch.Tensor, value: torch.Tensor, kwargs: dict[str, Any]
) -> torch.Tensor:
    """Eager attention's output ``[batch, pos, head, d_head]`` from the (hooked) pattern."""
    if value.shape[1] != pattern.shape[1]:
        value = value.repeat_interleave(pattern.shape[1] // value.shape[1], dim=1)
    weights = nn.functional.dropout(pattern, p=kwargs.get("dropout", 0.0), training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous()


def exact_with_grad(exact: torch.Tensor, differentiable: torch.Tensor) -> torch.Tensor:
    """`exact`'s values with `differentiable`'s gradient.

    Backward hooks on a pattern (or per-head results) need the output computed from it to
    be in the autograd graph; the original kernel computes the same output to the last bit
    differently. ``d - d.detach()`` is exactly zero, so the sum has the kernel's values and
    the gradient of the computation through the hooked tensor.
    """
    return exact.detach() + (differentiable - differentiable.detach())


def _through_heads(route: Route[str], which: str, states: torch.Tensor) -> torch.Tensor:
    """Run hooks on a kernel input ``[batch, head, pos, d]``, shown as ``[batch, pos, head, d]``."""
    shown = states.transpose(1, 2)
    new = route.through(which, shown)
    return states if new is shown else new.transpose(1, 2)


def hooked_pattern(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    route: Route[str],
    scaling: float | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, bool, bool]:
    """HF's eager attention pattern (``[batch, head, q_pos, k_pos]``) through the hooks.

    ``position_bias`` is transformers' additive bias on the scores (T5's learned relative
    positions; its sdpa kernel adds it too), added before the mask as the eager kernels do.

    Returns:
        (pattern, whether a hook changed the scores or the pattern, whether the hooks
        handed on another tensor — an equal one, or a view carrying backward hooks)
    """
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:  # grouped-query attention: share each key/value head
        key = key.repeat_interleave(n_rep, dim=1)
    scale = scaling if scaling is not None else query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)).mul_(scale)  # ours: in place
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if position_bias is not None:
        scores = scores + position_bias
    mask = additive_mask(module, attention_mask, scores, is_causal)
    if mask is not None:
        scores.add_(mask)  # scores is ours: a fresh product
    edited = replaced = False
    if "scores" in route.runs:
        scores, edited, replaced = _through(route, "scores", scores)
    pattern = scores.softmax(-1, dtype=torch.float32)  # what eager attention computes
    if pattern.dtype != query.dtype:
        pattern = pattern.to(query.dtype)
    if "pattern" in route.runs:
        pattern, changed, other = _through(route, "pattern", pattern)
        edited, replaced = edited or changed, replaced or other
    return pattern, edited, replaced


def _through(
    route: Route[str], which: str, tensor: torch.Tensor
) -> tuple[torch.Tensor, bool, bool]:
    """Run the hooks on `tensor`: (the result, whether they changed it, whether it is another).

    Changed means in place, or returned an unequal tensor; a returned tensor equal to the
    original (an identity edit) counts as unchanged, so the output still comes from the
    original kernel.
    """
    before = snapshot(tensor)
    hooked = route.through(which, tensor)
    other = hooked is not tensor
    if changed_since(tensor, before):
        return hooked, True, other
    return hooked, other and not torch.equal(hooked, tensor), other


def additive_mask(
    module: nn.Module, mask: torch.Tensor | None, scores: torch.Tensor, is_causal: bool | None
) -> torch.Tensor | None:
    """The mask as eager attention adds it, from an eager (float) or sdpa (bool / None) mask."""
    q_len, k_len = scores.shape[-2:]
    if mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if not causal or q_len == 1:
            return None
        inference = torch.is_inference_mode_enabled()
        return _causal_mask(q_len, k_len, scores.dtype, scores.device, inference)
    mask = mask[..., :k_len]
    if mask.dtype == torch.bool:
        zeros = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
        return zeros.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return mask


@functools.lru_cache(maxsize=32)
def _causal_mask(
    q_len: int, k_len: int, dtype: torch.dtype, device: torch.device, inference: bool
) -> torch.Tensor:
    """The additive causal mask ``[q, k]`` (queries are the last `q_len` positions); cached,
    as every layer of a forward asks for the same one (one made under inference mode is an
    inference tensor, kept apart). Never edited in place: it is added to the scores."""
    keep = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)
    zeros = torch.zeros(q_len, k_len, dtype=dtype, device=device)
    return zeros.masked_fill(~keep, torch.finfo(dtype).min)


@dataclass(frozen=True)
class ResultTap:
    """Each head's contribution to the attention output, ``[batch, pos, head, d_model]``.

    Taps the output projection `module` (an ``nn.Linear``, or transformers' ``Conv1D`` with
    its weight stored ``[in, out]``): the per-head results are its input ``z`` times each
    head's slice of the weight. They sum (plus the bias) to what the projection computes; the
    projection's own output is kept unless a hook changes the results, so reading them never
    changes the model's outputs.
    """

    module: nn.Module
    d_head: int

    def _weight(self) -> torch.Tensor:
        """The weight as ``[head, d_head, d_model]``."""
        weight = getattr(self.module, "weight", None)
        if isinstance(self.module, nn.Linear) and isinstance(weight, torch.Tensor):
            return torch.unflatten(weight.t(), 0, (-1, self.d_head))
        if (
            isinstance(weight, torch.Tensor)
            and getattr(self.module, "nf", None) == weight.shape[-1]
        ):
            return torch.unflatten(weight, 0, (-1, self.d_head))  # Conv1D: [in, out]
        raise BridgeError(
            f"hook_result needs the attention output projection to be nn.Linear or "
            f"transformers' Conv1D; {type(self.module).__name__} is neither"
        )

    def attach(self, run: Run) -> Handle:
        self._weight()  # refuse an unknown projection before anything is registered

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            z = torch.unflatten(args[0], -1, (-1, self.d_head))
            result = torch.einsum("...hd,hdm->...hm", z, self._weight().to(z.dtype))
            before = snapshot(result)
            new = run(result)
            edited = changed_since(result, before) or (
                new is not result and not torch.equal(new, result)
            )
            carries_grad_hooks = new is not result and new.requires_grad
            if not edited and not (carries_grad_hooks and torch.is_grad_enabled()):
                return None  # read (or an identity edit): the projection's own output stays
            summed = new.sum(-2)
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                summed = summed + bias
            exact = first_tensor(output)
            summed = summed.to(exact.dtype)
            return replace_first(output, summed if edited else exact_with_grad(exact, summed))

        return forward_hook(self.module, hook)


def patterns_active() -> bool:
    """Whether any model currently routes attention through the pattern hooks."""
    return SWITCH.active()
