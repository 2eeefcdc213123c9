"""Hook points and components skip nn.Module.__init__'s cost (`bridge_core.module_state`), and
are still modules like any other: the same state, fresh containers, torch's hooks honoured."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from bridge_core import GeneralizedComponent, HookPoint, TransformerBridge
from bridge_core.module_state import (
    add_children,
    init_lazy_module,
    lazy_containers,
    submodule,
)


def _module_state(module: nn.Module) -> dict[str, object]:
    return {k: v for k, v in vars(module).items() if k in vars(nn.Module())}


@pytest.mark.parametrize("make", [HookPoint, lambda: GeneralizedComponent("embed")])
def test_points_and_components_get_the_containers_of_nn_module_on_first_read(
    make: Callable[[], nn.Module],
) -> None:
    a, b = make(), make()
    plain = _module_state(nn.Module())
    vars(a).pop("_modules", None)  # a component's hook points are its children: made
    containers = {k for k, v in plain.items() if isinstance(v, dict | set | list)}
    assert containers and not containers & set(vars(a))  # none made yet
    assert {k: getattr(a, k) for k in plain} == plain  # each read gives nn.Module's value
    for name in containers:
        assert type(vars(a)[name]) is type(plain[name])
        assert getattr(a, name) is vars(a)[name]  # made once, then kept
        assert getattr(b, name) is not getattr(a, name), name
    b.register_forward_hook(lambda *args: None)
    assert len(b._forward_hooks) == 1 and not a._forward_hooks and not make()._forward_hooks


def test_a_hook_point_takes_parameters_buffers_and_children() -> None:
    """nn.Module's __setattr__ and register_* look for the containers in __dict__."""
    point = HookPoint()
    point.weight = nn.Parameter(torch.ones(2))
    point.register_buffer("scale", torch.zeros(2))
    HookPoint().register_parameter("bias", None)
    point.extra = nn.Linear(2, 2)
    assert [n for n, _ in point.named_parameters()] == ["weight", "extra.weight", "extra.bias"]
    assert list(point.state_dict()) == ["weight", "scale", "extra.weight", "extra.bias"]
    assert dict(point.named_children()) == {"extra": point.extra}
    assert point(torch.ones(2)).tolist() == [1.0, 1.0]  # a module call reads its hook tables


def test_a_component_takes_parameters_buffers_and_children() -> None:
    component = GeneralizedComponent("embed")
    component.register_buffer("scale", torch.zeros(2))
    component.weight = nn.Parameter(torch.ones(2))
    GeneralizedComponent("head").register_parameter("bias", None)
    component.extra = nn.Linear(2, 2)
    assert [n for n, _ in component.named_parameters()] == [
        "weight",
        "extra.weight",
        "extra.bias",
    ]
    assert list(component.state_dict()) == ["weight", "scale", "extra.weight", "extra.bias"]
    assert list(dict(component.named_children())) == ["hook_in", "hook_out", "extra"]


def test_component_hook_points_are_registered_children() -> None:
    component = GeneralizedComponent("embed")
    assert dict(component.named_children()) == {
        "hook_in": component.hook_in,
        "hook_out": component.hook_out,
    }
    assert component.training and not component.state_dict()
    twin = copy.deepcopy(component)
    assert twin.hook_in is not component.hook_in and twin.hook_in.name == ""
    assert pickle.loads(pickle.dumps(component)).name == "embed"


def test_a_components_own_points_read_as_attributes_follow_its_children() -> None:
    class Kind(GeneralizedComponent):
        internal_hooks = ("hook_mid",)
        hook_aliases: ClassVar[dict[str, str]] = {"hook_middle": "hook_mid"}

    component = Kind("blocks.0.kind")
    assert component.hook_mid is dict(component.named_children())["hook_mid"]
    assert component.hook_middle is component.hook_mid  # aliases resolve as before

    replaced = HookPoint()
    component.hook_mid = replaced  # nn.Module's __setattr__: a child again
    assert component.hook_mid is replaced and component._modules["hook_mid"] is replaced
    with pytest.raises(TypeError, match="hook_mid"):
        component.hook_mid = 3  # type: ignore[assignment]  # as for any child module

    del component.hook_mid
    assert "hook_mid" not in dict(component.named_children())
    with pytest.raises(AttributeError, match="hook_mid"):
        _ = component.hook_mid
    with pytest.raises(AttributeError, match="its target 'hook_mid' does not exist"):
        _ = component.hook_middle
    component.hook_mid = None  # a plain attribute now, as nn.Module has it
    assert component.hook_mid is None


def test_global_module_registration_hooks_see_the_hook_points() -> None:
    seen: list[str] = []

    def hook(parent: nn.Module, name: str, child: nn.Module | None) -> None:
        seen.append(name)

    handle = torch.nn.modules.module.register_module_module_registration_hook(hook)
    try:
        GeneralizedComponent("embed")
        add_children(nn.Module(), {"extra": HookPoint(), "more": HookPoint()})
    finally:
        handle.remove()
    assert seen == ["hook_in", "hook_out", "extra", "more"]


class _Shadowed(nn.Module):
    """A module whose attribute of a child's name is not that child (nn.Module's lookup
    finds the property)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(2, 2))
        self._modules["head"] = nn.Linear(2, 2)  # registered, but shadowed by the property

    @property
    def head(self) -> int:
        return 0


def test_submodule_finds_what_get_submodule_finds() -> None:
    model = _Shadowed()
    for path in ("", "inner", "inner.0"):
        assert submodule(model, path) is model.get_submodule(path)
    for path in ("head", "missing", "inner.missing", "inner.0.weight"):
        with pytest.raises(AttributeError) as expected:
            model.get_submodule(path)
        with pytest.raises(AttributeError) as got:
            submodule(model, path)
        assert str(got.value) == str(expected.value), path


def test_hooking_a_bridge_makes_no_module_containers_for_its_points(
    text_models: dict[str, tuple[Any, Any]],
) -> None:
    """A wrap, a cached run and a hooked run leave the points' nn.Module state unmade (what
    keeps a wrap cheap); modules() and a move to a device still see every point."""
    model, tokenizer = text_models["gpt2"]
    bridge = TransformerBridge.wrap(model, tokenizer=tokenizer)
    containers = {k for k, v in vars(nn.Module()).items() if isinstance(v, dict | set | list)}
    ids = torch.tensor([[1, 2, 3]])
    bridge.run_with_cache(ids)
    bridge.run_with_hooks(ids, fwd_hooks=[(lambda name: True, lambda t, hook: None)])
    points = list(bridge.hook_dict.values())
    assert len(points) > 50
    assert not any(containers & set(vars(p)) for p in points)
    components = [m for m in bridge.modules() if isinstance(m, GeneralizedComponent)]
    assert not any(containers - {"_modules"} & set(vars(c)) for c in components)
    assert all(any(p is m for m in bridge.modules()) for p in points[:5])
    bridge.to("cpu")  # reads each module's parameters and buffers: now made, and empty
    assert all(not p._parameters and not p._buffers for p in points)


def test_a_container_made_by_two_threads_at_once_is_the_first_one_made() -> None:
    """Another thread can make a point's hook list between this thread's read and its store
    (simulated by a maker that lets it): both must then use the one stored first, or a hook
    added to one list would never run from the other."""
    other: dict[str, Any] = {}

    def make() -> list[str]:
        point = other.get("point")
        if point is not None and "_fwd" not in vars(point):
            vars(point)["_fwd"] = other["made"] = ["the other thread's"]
        return []

    @lazy_containers(_fwd=make)
    class Point(nn.Module):
        def __init__(self) -> None:
            init_lazy_module(self)

    point = Point()
    other["point"] = point
    assert point._fwd is other["made"] and vars(point)["_fwd"] is other["made"]
