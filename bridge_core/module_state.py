"""Fresh `nn.Module` state at a fraction of ``nn.Module.__init__``'s cost.

A wrap makes ~400 modules (a 12-layer GPT-2 has 322 hook points in 64 components), and
``nn.Module.__init__`` sets its 17 attributes one by one through ``super().__setattr__``:
~3 µs each time, a third of the wrap. Yet a hook point never holds a parameter, a buffer, a
child or a PyTorch hook of its own in nearly every use, and a component only children: the
15 empty containers ``nn.Module`` gives each (with a point's own, ~6,700 objects per wrap of
that GPT-2) are made for nothing, and trigger collections on top. `lazy_containers` makes a
class whose instances get each container on its first read instead (`init_lazy_module` gives
the rest of the state from a template that ``nn.Module.__init__`` itself filled once, so it
follows the installed torch: its values, ``training`` or None, are immutable and shared; were
the template ever anything else, or does a class ask ``nn.Module.__init__`` to call
``super().__init__`` (``call_super_init``), the real ``__init__`` runs). nn.Module's own
code reads the containers as attributes, except its ``__setattr__`` and ``register_*``
checks, which read ``__dict__``: such a class derives from `LazyModule`, which calls
`materialize` before those (`HookPoint` and `GeneralizedComponent` do). `add_children`
registers children on a module made that way, and `submodule` is ``get_submodule`` for the
paths a wrap resolves (~150 for a 12-layer GPT-2).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.modules import module as torch_module

_IMMUTABLE = (bool, int, float, str, type(None))
_M = TypeVar("_M", bound=type[nn.Module])


def _template() -> tuple[dict[str, Any], tuple[tuple[str, type[Any]], ...]] | None:
    """nn.Module's fresh ``__dict__`` and its (attribute, container type) pairs, or None."""
    probe = nn.Module.__new__(nn.Module)
    nn.Module.__init__(probe)
    state = dict(vars(probe))
    containers = tuple((k, type(v)) for k, v in state.items() if isinstance(v, dict | set | list))
    rest = [v for k, v in state.items() if not isinstance(v, dict | set | list)]
    if any(state[k] for k, _ in containers) or not all(isinstance(v, _IMMUTABLE) for v in rest):
        return None  # not what this module knows how to copy: nn.Module.__init__ it is
    return state, containers


_TEMPLATE = _template()
_IMMUTABLE_STATE = (
    {k: v for k, v in _TEMPLATE[0].items() if k not in dict(_TEMPLATE[1])} if _TEMPLATE else {}
)


class _Lazy:
    """A container of nn.Module's state, made on an instance's first read of it and kept in
    the instance's ``__dict__`` (a non-data descriptor: from then on it is never called)."""

    def __init__(self, name: str, make: Callable[[], Any]) -> None:
        self.name = name
        self.make = make

    def __get__(self, instance: Any, owner: type[Any] | None = None) -> Any:
        if instance is None:
            return self
        # setdefault: two threads reading it first get the same container (or lock)
        return instance.__dict__.setdefault(self.name, self.make())


def lazy_containers(**extra: Callable[[], Any]) -> Callable[[_M], _M]:
    """Class decorator: instances made with `init_lazy_module` get nn.Module's containers,
    and the class's own `extra` ones (attribute name -> what makes one), on first read.
    Without the template (an nn.Module this module does not know), only the `extra` ones."""

    def decorate(cls: _M) -> _M:
        made: dict[str, Callable[[], Any]] = dict(_TEMPLATE[1]) if _TEMPLATE else {}
        for name, make in {**made, **extra}.items():
            setattr(cls, name, _Lazy(name, make))
        return cls

    return decorate


def init_lazy_module(module: nn.Module) -> None:
    """`init_module` for an instance of a `lazy_containers` class: only the immutable state
    is set; the containers come on first read."""
    if _TEMPLATE is None or type(module).call_super_init:
        nn.Module.__init__(module)
        return
    module.__dict__.update(_IMMUTABLE_STATE)


def lazy_state(cls: type[nn.Module]) -> dict[str, Any] | None:
    """The state `init_lazy_module` gives an instance of `cls`, or None where it runs
    ``nn.Module.__init__`` instead: a class whose ``__init__`` does nothing else can make
    instances as ``object.__new__(cls)`` with this state, without the two calls."""
    if _TEMPLATE is None or cls.call_super_init:
        return None
    return _IMMUTABLE_STATE


def materialize(module: nn.Module) -> None:
    """Give `module` every container it has not read yet (before nn.Module code that checks
    ``__dict__`` for them: ``__setattr__`` of a parameter, buffer or module, ``register_*``)."""
    if _TEMPLATE is not None:
        for name, _ in _TEMPLATE[1]:
            getattr(module, name)


class LazyModule(nn.Module):
    """A module of a `lazy_containers` class made with `init_lazy_module`: it makes its
    containers (`materialize`) before the nn.Module code that looks for them in ``__dict__``
    (``__setattr__``, ``register_buffer``, ``register_parameter``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        materialize(self)
        super().__setattr__(name, value)

    def register_buffer(
        self, name: str, tensor: torch.Tensor | None, persistent: bool = True
    ) -> None:
        materialize(self)
        super().register_buffer(name, tensor, persistent)

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        materialize(self)
        super().register_parameter(name, param)


def add_children(parent: nn.Module, children: Mapping[str, nn.Module]) -> None:
    """``parent.<name> = child`` for each of `children`, on a `parent` that has no attribute,
    parameter, buffer or child of those names yet (a module being built): straight into its
    ``_modules``, unless torch's global module registration hooks want to see them (then
    through ``__setattr__``)."""
    if getattr(torch_module, "_global_module_registration_hooks", None) != {}:
        for name, child in children.items():
            setattr(parent, name, child)
        return
    parent._modules.update(children)


def submodule(module: nn.Module, path: str) -> nn.Module:
    """``module.get_submodule(path)``, each step read from ``_modules`` where nothing else of
    that name (an attribute, parameter or buffer) could be what nn.Module's lookup finds
    instead; otherwise, and for what does not exist, ``get_submodule`` itself answers."""
    found = module
    for item in path.split(".") if path else ():
        child = found._modules.get(item)
        if (
            child is None
            or item in found.__dict__
            or item in found._parameters
            or item in found._buffers
            or hasattr(type(found), item)
        ):
            return module.get_submodule(path)
        found = child
    return found
