"""Sparse mixture-of-experts blocks (kind ``moe``): the router's choices and every expert.

A sparse MoE block (Mixtral's, Qwen2-MoE's, OLMoE's ...) calls a router module, which returns
``(router_logits, top_k_weights, top_k_index)`` for the flattened tokens, and then an experts
module that stores all experts as 3-D weight tensors. The spec language has no way to say "the
second element of a module's output" nor to reach activations that exist only inside a kernel,
so this kind is Python: the router's three outputs are tapped in one forward hook (in that
order, an edit of the logits re-routes the tokens it changed), and the experts' activations
come from `bridge_core.components.experts`, which routes them the way attention patterns are
routed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from bridge_core.attention import exact_with_grad
from bridge_core.components.base import GeneralizedComponent, Shape
from bridge_core.components.experts import ExpertTap, Which, expert_weights
from bridge_core.errors import BridgeError
from bridge_core.hooks import Handle, HookPoint, Run
from bridge_core.routes import Route, Routes
from bridge_core.torch_hooks import forward_hook
from bridge_core.views import Tokens, ViewTap

RouterOutput = Literal["logits", "weights", "indices"]
_ORDER: tuple[RouterOutput, ...] = ("logits", "weights", "indices")
ROUTED: Shape = ("routed", "d_model")
ROUTED_HIDDEN: Shape = ("routed", "d_mlp")


_RouterRoute = Route[RouterOutput]
"""The hook runs on one router module's outputs, and the forward hook that runs them."""

_ROUTERS: Routes[_RouterRoute] = Routes()


@dataclass(frozen=True)
class RouterTap:
    """One of a router's outputs ``(logits, top_k_weights, top_k_index)``, each ``[tokens, ...]``.

    The hooks on one router run in that order from a single forward hook. When a hook changes
    the logits of some tokens, their weights and indices are recomputed from the new logits
    the way the router computes them (softmax, top-k, renormalised where the router's
    ``norm_topk_prob`` says so, Mixtral always); that this reproduces the router's own choice
    is checked on the unedited logits first, so an edit is never silently misrouted.
    """

    router: nn.Module
    which: RouterOutput

    def attach(self, run: Run) -> Handle:
        return _ROUTERS.attach(self.router, self.which, run, self._first)

    def _first(self) -> _RouterRoute:
        route: _RouterRoute = Route()

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            return _on_router(route, module, output)

        route.handles = (forward_hook(self.router, hook),)
        return route


def _on_router(route: _RouterRoute, router: nn.Module, output: Any) -> Any:
    if not (isinstance(output, tuple) and all(isinstance(t, torch.Tensor) for t in output[:3])):
        raise BridgeError(
            f"{type(router).__name__} returned {type(output).__name__}, not the tuple "
            "(router_logits, top_k_weights, top_k_index) the moe kind taps"
        )
    logits, weights, indices = output[:3]
    new = {"logits": logits, "weights": weights, "indices": indices}
    if "logits" in route.runs:
        before = logits.detach().clone()
        new["logits"] = route.runs["logits"](logits)
        changed = (new["logits"] != before).any(dim=-1)
        carries_grad = new["logits"] is not logits and new["logits"].requires_grad
        if changed.any() or (carries_grad and torch.is_grad_enabled()):  # edited, or bwd hooks
            new["weights"], new["indices"] = _rerouted(
                router, before, new["logits"], changed, weights, indices
            )
    for which in _ORDER[1:]:
        if which in route.runs:
            new[which] = route.runs[which](new[which])
    if "indices" in route.runs:
        _check_indices(router, new["indices"], logits.shape[-1])
    if all(new[w] is old for w, old in zip(_ORDER, output[:3], strict=True)):
        return None
    return (*(new[w] for w in _ORDER), *output[3:])


def _check_indices(router: nn.Module, indices: torch.Tensor, n_experts: int) -> None:
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n_experts):
        raise BridgeError(
            f"the expert indices of {type(router).__name__} were edited to "
            f"{sorted(set(indices.flatten().tolist()) - set(range(n_experts)))[:5]}, outside "
            f"the {n_experts} experts (0 to {n_experts - 1})"
        )


def _rerouted(
    router: nn.Module,
    before: torch.Tensor,
    after: torch.Tensor,
    changed: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and indices of the tokens whose logits `changed`, recomputed from `after`.

    The other tokens keep the router's values; the weights' gradient goes through `after`
    (for backward hooks on the logits), whose unchanged rows give the router's values exactly.
    """
    check_weights, check_indices = top_k_routing(router, before, weights.dtype)
    if not (torch.equal(check_weights, weights) and torch.equal(check_indices, indices)):
        raise BridgeError(
            f"{type(router).__name__} ({type(router).__module__}) does not choose experts as "
            "softmax then top-k (renormalised where norm_topk_prob says so), so an edit of "
            "hook_router_logits cannot be turned into the experts it would choose; edit "
            "hook_expert_weights / hook_expert_indices instead"
        )
    new_weights, new_indices = top_k_routing(router, after, weights.dtype)
    keep = changed[:, None]
    values = torch.where(keep, new_weights, weights)
    if new_weights.requires_grad:
        values = exact_with_grad(values, new_weights)
    return values, torch.where(keep, new_indices, indices)


def top_k_routing(
    router: nn.Module, logits: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(top_k_weights, top_k_index)`` as transformers' top-k routers compute them."""
    probs = nn.functional.softmax(logits, dim=-1, dtype=torch.float32)
    top, index = torch.topk(probs, _top_k(router), dim=-1)
    if getattr(router, "norm_topk_prob", True):  # Mixtral's router has no switch: always
        top = top / top.sum(dim=-1, keepdim=True)
    return top.to(dtype), index


def _top_k(router: nn.Module) -> int:
    k = getattr(router, "top_k", None)
    if not isinstance(k, int):
        raise BridgeError(f"{type(router).__name__} has no integer top_k (experts per token)")
    return k


class ExpertBridge(GeneralizedComponent):
    """One expert of a sparse MoE block, on the rows of the tokens routed to it.

    Not a spec kind: `MoEBridge` makes one per expert. Its hook points are ``hook_in`` (the
    routed tokens' inputs, ``[routed, d_model]``), ``hook_pre`` (gate projection, before the
    activation), ``hook_pre_linear`` (up projection), ``hook_post`` (``act(gate) * up``) and
    ``hook_out`` (the expert's output before the routing weight), rows in the order of
    `bridge_core.components.experts.routed_tokens`.
    """

    internal_hooks = ("hook_pre", "hook_pre_linear", "hook_post")
    hook_shapes: ClassVar[dict[str, Shape]] = {
        "hook_in": ROUTED,
        "hook_pre": ROUTED_HIDDEN,
        "hook_pre_linear": ROUTED_HIDDEN,
        "hook_post": ROUTED_HIDDEN,
        "hook_out": ROUTED,
    }

    def attach(self, experts: nn.Module, layer: nn.Module, expert: int) -> None:
        """Bind this expert's hook points to expert `expert` of `experts`, called by `layer`."""
        object.__setattr__(self, "original_component", experts)
        points: dict[str, Which] = {
            "hook_in": "in",
            "hook_pre": "pre",
            "hook_pre_linear": "pre_linear",
            "hook_post": "post",
            "hook_out": "out",
        }
        for attr, which in points.items():
            point = getattr(self, attr)
            assert isinstance(point, HookPoint)
            point.bind(ExpertTap(experts, layer, expert, which))
            point.shape = self.hook_shapes[attr]

    def dims(self) -> dict[str, int | None]:
        """The experts' hidden width, and ``routed`` free (it differs per expert and call)."""
        values: dict[str, int | None] = {"routed": None}
        if self.original_component is not None:
            values["d_mlp"] = int(expert_weights(self.original_component)[1].shape[2])
        return values


class MoEBridge(GeneralizedComponent):
    """A sparse MoE block (options ``router``, ``experts``: its submodule paths).

    ``hook_router_logits`` ``[batch, pos, n_experts]``, ``hook_expert_weights`` and
    ``hook_expert_indices`` ``[batch, pos, k]`` are the router's outputs; ``experts.{e}``
    (an `ExpertBridge` per expert) the experts' activations. Further parts of the block (a
    shared expert) are ordinary child components and spec-declared hook points.
    """

    path_options: ClassVar[tuple[str, ...]] = ("router", "experts")
    required_options: ClassVar[tuple[str, ...]] = ("router", "experts")
    internal_hooks = ("hook_router_logits", "hook_expert_weights", "hook_expert_indices")
    hook_shapes: ClassVar[dict[str, Shape]] = {
        "hook_in": ("batch", "pos", "d_model"),
        "hook_router_logits": ("batch", "pos", "n_experts"),
        "hook_expert_weights": ("batch", "pos", "k"),
        "hook_expert_indices": ("batch", "pos", "k"),
        "hook_out": ("batch", "pos", "d_model"),
    }
    hook_router_logits: HookPoint
    hook_expert_weights: HookPoint
    hook_expert_indices: HookPoint

    def __init__(
        self,
        name: str,
        config: Any | None = None,
        submodules: Mapping[str, nn.Module] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        """Create an unbound MoE block; its experts are made when it is bound (`bind`)."""
        super().__init__(name, config, None, options)
        self.experts = nn.ModuleList()  # before the spec's children: named first
        for key, child in (submodules or {}).items():
            self.add_module(key, child)

    def bind(self, module: nn.Module) -> None:
        router, experts = self.part(module, "router"), self.part(module, "experts")
        _top_k(router)
        n_experts = int(expert_weights(experts)[0].shape[0])
        tokens = (Tokens(module),)  # the router sees [batch * pos, d_model]
        self.hook_router_logits.bind(ViewTap(RouterTap(router, "logits"), tokens))
        self.hook_expert_weights.bind(ViewTap(RouterTap(router, "weights"), tokens))
        self.hook_expert_indices.bind(ViewTap(RouterTap(router, "indices"), tokens))
        for e in range(n_experts):
            expert = ExpertBridge(f"{self.name}.experts.{e}", config=self.config)
            expert.attach(experts, module, e)
            self.experts.append(expert)

    def dims(self) -> dict[str, int | None]:
        """``n_experts`` and ``k`` (experts per token) from the HF modules."""
        module = self.original_component
        if module is None:
            return {}
        return {"n_experts": len(self.experts), "k": _top_k(self.part(module, "router"))}

    def integer_ranges(self) -> dict[str, int]:
        """Expert indices take ``n_experts`` values."""
        return {self.hook_expert_indices.name: len(self.experts)}
