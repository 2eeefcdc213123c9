"""Per-expert activations of experts stored as 3-D weight tensors, routed like attention.

transformers 5 stores a sparse MoE layer's experts as two 3-D parameters (``gate_up_proj``
``[n_experts, 2 * d_mlp, d_model]`` and ``down_proj`` ``[n_experts, d_model, d_mlp]``) with no
module per expert, and picks the kernel by name from ``config._experts_implementation``
through its public `ExpertsInterface`. While a hook is attached to a per-expert point of some
layer, we register (once) a routing implementation under our own key, point the config at it,
and restore the original name when the last such hook goes. The router hands every module
without hooks to the original implementation. For a hooked module it computes each expert's
activations as transformers' eager experts forward does and runs the hooks on them; the
module's output is still the original kernel's, except for the tokens whose activations a hook
changed: those are recomputed, eagerly, from the edited activations.

A module that does not dispatch through the interface, a fused kernel whose activations we
cannot reproduce, or a layout the eager formula does not cover is refused when the hook is
added, naming the module; a module that never reached the router while hooked raises at the
end of its layer's forward, so a per-expert hook never silently fails to fire.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import ClassVar, Literal, cast

import torch
from torch import nn

from bridge_core.attention import exact_with_grad
from bridge_core.errors import BridgeError
from bridge_core.hooks import Handle, Run
from bridge_core.routes import Route, Routes, Runs
from bridge_core.switches import PREFIX, KernelSwitch, watch

Which = Literal["in", "pre", "pre_linear", "post", "out"]
ExpertsForward = Callable[..., torch.Tensor]
_SUPPORTED = ("eager", "grouped_mm", "batched_mm")
"""Implementations that compute the eager formula (fused kernels such as deepgemm do not)."""


@dataclass
class _Route(Route[tuple[int, Which]]):
    """The hook runs of one hooked experts module, by (expert, activation)."""

    called: bool = False
    kept: ClassVar[bool] = False  # its hooks' check refers to the experts module

    def release(self, module: nn.Module) -> None:
        """The module's last: its config goes back to its own implementation."""
        super().release(module)
        SWITCH.off(module)


_ROUTES: Routes[_Route] = Routes()


@dataclass(frozen=True)
class ExpertTap:
    """One activation of one expert: its input rows, gate, up, hidden or output rows.

    `experts` is the module holding the 3-D weights; `layer` the MoE block that calls it,
    whose forward is checked to have reached the router while the tap is attached.
    """

    experts: nn.Module
    layer: nn.Module
    expert: int
    which: Which

    def attach(self, run: Run) -> Handle:
        return _ROUTES.attach(self.experts, (self.expert, self.which), run, self._first)

    def _first(self) -> _Route:
        """The module's first hooked tap: check it and switch its config."""
        check_experts(self.experts)
        SWITCH.on(self.experts)
        route = _Route()
        missed = partial(_missed, experts=self.experts, runs=route.runs)
        route.handles = watch(self.layer, route, missed)
        return route


def expert_weights(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gate_up_proj, down_proj)`` of an experts module, checked to be 3-D and to agree.

    Raises:
        BridgeError: naming the module, when its experts are not stored that way.
    """
    gate_up = getattr(experts, "gate_up_proj", None)
    down = getattr(experts, "down_proj", None)
    if not (
        isinstance(gate_up, torch.Tensor)
        and isinstance(down, torch.Tensor)
        and gate_up.dim() == 3
        and down.dim() == 3
        and gate_up.shape[0] == down.shape[0]
        and gate_up.shape[1] == 2 * down.shape[2]
        and gate_up.shape[2] == down.shape[1]
    ):
        raise BridgeError(
            f"{_named(experts)} does not store its experts as 3-D tensors gate_up_proj "
            "[n_experts, 2 * d_mlp, d_model] and down_proj [n_experts, d_model, d_mlp]"
        )
    return gate_up, down


def check_experts(experts: nn.Module) -> None:
    """Refuse an experts module whose per-expert activations the router cannot reproduce.

    Raises:
        BridgeError: naming the module and what is not supported.
    """
    expert_weights(experts)
    forward = getattr(type(experts).forward, "__code__", None)
    if forward is None or "_experts_implementation" not in forward.co_names:
        raise BridgeError(
            f"{_named(experts)} does not choose its kernel through transformers' "
            "ExpertsInterface (config._experts_implementation), so its per-expert "
            "activations cannot be hooked without changing what it computes"
        )
    from transformers.integrations.moe import _default_apply_gate

    layout = {
        "has_gate": True,
        "has_bias": False,
        "is_transposed": False,
        "is_concatenated": True,
        "has_post_expert_norm": False,
        "_is_expert_parallel": False,
    }
    unlike = [k for k, v in layout.items() if getattr(experts, k, v) != v]
    if getattr(type(experts), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        unlike.append("_apply_gate (a custom gating function)")
    if unlike:
        raise BridgeError(
            f"{_named(experts)} differs from the experts layout whose activations the bridge "
            f"computes (gated act(gate) * up, concatenated [gate | up], no bias, not "
            f"transposed, one process) in {unlike}; per-expert hook points are not available"
        )


def _named(module: nn.Module) -> str:
    return f"{type(module).__name__} ({type(module).__module__})"


def _missed(layer: nn.Module, experts: nn.Module, runs: Runs[tuple[int, Which]]) -> str:
    hooked = sorted({f"experts.{e}.hook_{w}" for e, w in runs})
    return (
        f"{type(layer).__name__} ran without calling {_named(experts)} through transformers' "
        f"ExpertsInterface, so its per-expert hooks ({hooked[:4]}"
        f"{' ...' if len(hooked) > 4 else ''}) could not fire; this layer cannot offer them"
    )


def _register_router(original: str) -> None:
    from transformers.integrations.moe import ExpertsInterface

    key = PREFIX + original
    if key not in ExpertsInterface._global_mapping:
        ExpertsInterface.register(key, route_experts)


def _refuse(experts: nn.Module, original: str) -> BridgeError:
    return BridgeError(
        f"{_named(experts)} runs the {original!r} experts implementation, whose "
        "per-expert activations the bridge cannot reproduce; per-expert hook points "
        f"need one of {list(_SUPPORTED)}: load the model with "
        "experts_implementation='grouped_mm' (or 'eager') to hook them"
    )


SWITCH = KernelSwitch(
    attribute="_experts_implementation",
    what="experts",
    supported=_SUPPORTED,
    router_name=lambda original: PREFIX + original,
    register=_register_router,
    refuse=_refuse,
)
"""Points a hooked experts module's config at `route_experts` (see `bridge_core.switches`)."""


def _original_forward(experts: nn.Module) -> ExpertsForward:
    from transformers.integrations.moe import ExpertsInterface

    original = SWITCH.original(experts)
    if original != "eager":
        return cast(ExpertsForward, ExpertsInterface._global_mapping[original])
    return cast(ExpertsForward, inspect.unwrap(type(experts).forward))  # the class's own


def route_experts(
    module: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Per-expert hooks for hooked modules; the original implementation for the others."""
    original = _original_forward(module)
    route = _ROUTES.get(module)
    if route is None:  # `get` gives only attached routes
        return original(module, hidden_states, top_k_index, top_k_weights)
    route.called = True
    hooked = _Hooked(module, hidden_states, top_k_index, top_k_weights)
    for expert in sorted({e for e, _ in route.runs}):
        hooked.run_expert(expert, {w: r for (e, w), r in route.runs.items() if e == expert})
    output = original(module, hidden_states, top_k_index, top_k_weights)
    needs_grad = hooked.replaced and torch.is_grad_enabled()
    if not hooked.affected.any() and not needs_grad:
        return output  # read (or identity edits): the kernel's output stays, bit for bit
    recomputed = hooked.eager()
    values = torch.where(hooked.affected[:, None], recomputed, output)
    return exact_with_grad(values, recomputed) if needs_grad else values


class _Hooked:
    """One call of a hooked experts module: hooked activations, and the tokens they changed."""

    def __init__(
        self, module: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor
    ) -> None:
        self.module = module
        self.hidden, self.index, self.weights = hidden, index, weights
        self.gate_up, self.down = expert_weights(module)
        self.act_fn = cast(Callable[[torch.Tensor], torch.Tensor], module.act_fn)
        n_experts = self.gate_up.shape[0]
        with torch.no_grad():  # as the eager forward: [n_experts + 1, k, tokens]
            self.mask = nn.functional.one_hot(index, num_classes=n_experts + 1).permute(2, 1, 0)
        self.affected = torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        self.replaced = False
        self.outputs: dict[int, torch.Tensor] = {}  # expert -> its (hooked) output rows

    def rows(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(top-k slot, token) of each row of `expert`: by slot, then by token."""
        slot, token = torch.where(self.mask[expert])
        return slot, token

    def run_expert(self, expert: int, runs: dict[Which, Run]) -> None:
        """Compute `expert`'s activations as the eager forward does, through its hooks."""
        _, token = self.rows(expert)
        x = self._through(runs.get("in"), self.hidden[token], token)
        gate, up = nn.functional.linear(x, self.gate_up[expert]).chunk(2, dim=-1)
        gate = self._through(runs.get("pre"), gate, token)
        up = self._through(runs.get("pre_linear"), up, token)
        post = self._through(runs.get("post"), self.act_fn(gate) * up, token)
        out = nn.functional.linear(post, self.down[expert])
        self.outputs[expert] = self._through(runs.get("out"), out, token)

    def _through(self, run: Run | None, tensor: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        if run is None:
            return tensor
        before = tensor.detach().clone()
        new = run(tensor)
        changed = (new != before).any(dim=-1)
        self.affected[token[changed]] = True
        self.replaced = self.replaced or (new is not tensor and new.requires_grad)
        return new

    def eager(self) -> torch.Tensor:
        """transformers' eager experts forward, with the hooked experts' output rows."""
        final = torch.zeros_like(self.hidden)
        n_experts = self.gate_up.shape[0]
        with torch.no_grad():
            hit = torch.greater(self.mask.sum(dim=(-1, -2)), 0).nonzero()
        for (expert,) in hit.tolist():
            if expert == n_experts:
                continue
            slot, token = self.rows(expert)
            out = self.outputs.get(expert)
            if out is None:
                gate, up = nn.functional.linear(self.hidden[token], self.gate_up[expert]).chunk(
                    2, dim=-1
                )
                out = nn.functional.linear(self.act_fn(gate) * up, self.down[expert])
            out = out * self.weights[token, slot, None]
            final.index_add_(0, token, out.to(final.dtype))
        return final


def routed_tokens(
    expert_indices: torch.Tensor, expert: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the rows of expert `expert`'s hook points come from: ``(batch, pos, slot)``.

    Args:
        expert_indices: ``hook_expert_indices`` of the layer, ``[batch, pos, k]``.
        expert: the expert.

    Returns:
        Three index tensors, one entry per row of ``experts.{expert}.hook_*`` in order: rows
        go by top-k slot first, then by token (as transformers' eager loop and
        TransformerLens's MoE take them).
    """
    batch, pos, k = expert_indices.shape
    slot, token = torch.where((expert_indices == expert).reshape(batch * pos, k).T)
    return token // pos, token % pos, slot


def experts_active() -> bool:
    """Whether any model currently routes its experts through per-expert hooks."""
    return SWITCH.active()
