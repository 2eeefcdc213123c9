"""Attention patterns on demand, without touching the model's kernel otherwise.

HF attention modules pick their kernel by name from ``config._attn_implementation``
through transformers' public `AttentionInterface`. While a hook is attached to
``hook_attn_scores`` or ``hook_pattern`` of some layer, we register (once) a routing
implementation under our own key, point that layer's config at it, and restore the
original name when the last such hook goes. The router runs an eager attention with
the two hook points for the hooked modules only; every other module is handed to the
original implementation with the original mask format, so it computes exactly what it
computed before. Nothing in transformers is replaced.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from torch import nn

from bridge_core.errors import BridgeError
from bridge_core.hooks import Handle, Run

Which = Literal["scores", "pattern"]
Kernel = Callable[..., tuple[torch.Tensor, Any]]
_PREFIX = "transformer_bridge|"
_SUPPORTED = ("sdpa", "eager")

# attention module -> the hook runs of its scores and pattern
_ROUTES: weakref.WeakKeyDictionary[nn.Module, dict[str, Run]] = weakref.WeakKeyDictionary()


@dataclass
class _Switch:
    """A config whose attention implementation we point at the router, and its users."""

    config: Any
    original: str
    users: set[int] = field(default_factory=set)


_SWITCHES: dict[int, _Switch] = {}


@dataclass(frozen=True)
class PatternTap:
    """The attention scores (pre-softmax) or pattern of one HF attention module."""

    module: nn.Module
    which: Which

    def attach(self, run: Run) -> Handle:
        _switch_on(self.module)
        _ROUTES.setdefault(self.module, {})[self.which] = run
        return _Detach(self.module, self.which)


@dataclass(frozen=True)
class _Detach:
    module: nn.Module
    which: Which

    def remove(self) -> None:
        routes = _ROUTES.get(self.module, {})
        routes.pop(self.which, None)
        if not routes:
            _ROUTES.pop(self.module, None)
            _switch_off(self.module)


def _config_of(module: nn.Module) -> Any:
    config = getattr(module, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise BridgeError(
            f"attention patterns need the attention module to read its kernel from "
            f"config._attn_implementation; {type(module).__name__} has no such config"
        )
    return config


def _switch_on(module: nn.Module) -> None:
    config = _config_of(module)
    switch = _SWITCHES.get(id(config))
    if switch is None:
        original = config._attn_implementation or "eager"
        if original not in _SUPPORTED:
            raise BridgeError(
                f"attention patterns are computed for models running {' or '.join(_SUPPORTED)} "
                f"attention; {type(module).__name__} runs {original!r}. Load the model with "
                "attn_implementation='sdpa' to hook patterns"
            )
        _register_router(original)
        switch = _SWITCHES[id(config)] = _Switch(config, original)
        config._attn_implementation = _PREFIX + original
    switch.users.add(id(module))


def _switch_off(module: nn.Module) -> None:
    config = _config_of(module)
    switch = _SWITCHES.get(id(config))
    if switch is None:
        return
    switch.users.discard(id(module))
    if not switch.users:
        config._attn_implementation = switch.original
        del _SWITCHES[id(config)]


def _register_router(original: str) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    key = _PREFIX + original
    if key not in AttentionInterface._global_mapping:
        AttentionInterface.register(key, route_attention)
        AttentionMaskInterface.register(key, ALL_MASK_ATTENTION_FUNCTIONS[original])


def _original_kernel(module: nn.Module) -> Kernel:
    from transformers import AttentionInterface

    original = _SWITCHES[id(_config_of(module))].original
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
    """Scores and pattern hooks for hooked modules; the original kernel's output otherwise.

    The pattern is computed as HF's eager attention computes it. While the hooks only
    read it (caching), the module's output still comes from the original kernel, so
    caching never changes the model's outputs; once a hook edits the scores or the
    pattern, the output is computed from the edited pattern.
    """
    original = _original_kernel(module)
    routes = _ROUTES.get(module)
    if routes is None:
        return original(module, query, key, value, attention_mask, **kwargs)
    pattern, edited = hooked_pattern(module, query, key, attention_mask, routes, **kwargs)
    if not edited:
        output, _ = original(module, query, key, value, attention_mask, **kwargs)
        return output, pattern
    if value.shape[1] != pattern.shape[1]:
        value = value.repeat_interleave(pattern.shape[1] // value.shape[1], dim=1)
    weights = nn.functional.dropout(pattern, p=kwargs.get("dropout", 0.0), training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), pattern


def hooked_pattern(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    routes: dict[str, Run],
    scaling: float | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, bool]:
    """HF's eager attention pattern (``[batch, head, q_pos, k_pos]``) through the hooks.

    Returns:
        (pattern, whether a hook replaced the scores or the pattern)
    """
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:  # grouped-query attention: share each key/value head
        key = key.repeat_interleave(n_rep, dim=1)
    scale = scaling if scaling is not None else query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    mask = _additive_mask(module, attention_mask, scores, is_causal)
    if mask is not None:
        scores = scores + mask
    edited = False
    if "scores" in routes:
        scores, edited = _through(routes["scores"], scores)
    pattern = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if "pattern" in routes:
        pattern, changed = _through(routes["pattern"], pattern)
        edited = edited or changed
    return pattern, edited


def _through(run: Run, tensor: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Run the hooks on `tensor`; whether they replaced it or edited it in place."""
    version = tensor._version
    hooked = run(tensor)
    return hooked, hooked is not tensor or tensor._version != version


def _additive_mask(
    module: nn.Module, mask: torch.Tensor | None, scores: torch.Tensor, is_causal: bool | None
) -> torch.Tensor | None:
    """The mask as eager attention adds it, from an eager (float) or sdpa (bool / None) mask."""
    q_len, k_len = scores.shape[-2:]
    lowest = torch.finfo(scores.dtype).min
    if mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if not causal or q_len == 1:
            return None
        keep = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device)
        mask = keep.tril(diagonal=k_len - q_len)
    else:
        mask = mask[..., :k_len]
    if mask.dtype == torch.bool:
        zeros = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
        return zeros.masked_fill(~mask, lowest)
    return mask


def patterns_active() -> bool:
    """Whether any model currently routes attention through the pattern hooks."""
    return bool(_SWITCHES)
