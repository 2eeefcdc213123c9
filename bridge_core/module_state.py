"""Fresh `nn.Module` state at a fraction of ``nn.Module.__init__``'s cost.

A wrap makes ~400 modules (a 12-layer GPT-2 has 322 hook points in 64 components), and
``nn.Module.__init__`` sets its 17 attributes one by one through ``super().__setattr__``:
~3 µs each time, a third of the wrap. `init_module` gives a module the same state from a
template that ``nn.Module.__init__`` itself filled once, so it follows the installed torch:
its empty containers are made afresh (of the same type), its other values (``training``,
None) are immutable and shared. Were the template ever anything else, or does a class ask
``nn.Module.__init__`` to call ``super().__init__`` (``call_super_init``), the real
``__init__`` runs. `add_child` registers a child on a module made that way, and `submodule`
is ``get_submodule`` for the paths a wrap resolves (~150 for a 12-layer GPT-2).

A hook point is a module that never holds a parameter, a buffer, a child or a PyTorch hook
of its own in nearly every use, yet ``nn.Module`` gives each of them 15 empty containers
(a 12-layer GPT-2 has 322 points: ~4,800 objects per wrap, a fifth of the wrap's time with
the collections they trigger). `lazy_containers` makes a class whose instances get each
container on its first read instead (`init_lazy_module`); nn.Module's own code reads them as
attributes, except its ``__setattr__`` and ``register_*`` checks, which read ``__dict__``:
such a class calls `materialize` before those (`HookPoint` does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

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


def init_module(module: nn.Module) -> None:
    """What ``nn.Module.__init__(module)`` does (without its one-time API-usage log), for a
    module whose class's ``__init__`` would call it with no arguments."""
    if _TEMPLATE is None or type(module).call_super_init:
        nn.Module.__init__(module)
        return
    state, containers = _TEMPLATE
    fresh = state.copy()  # keeps nn.Module's attribute order
    for name, make in containers:
        fresh[name] = make()
    module.__dict__.update(fresh)


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


def materialize(module: nn.Module) -> None:
    """Give `module` every container it has not read yet (before nn.Module code that checks
    ``__dict__`` for them: ``__setattr__`` of a parameter, buffer or module, ``register_*``)."""
    if _TEMPLATE is not None:
        for name, _ in _TEMPLATE[1]:
            getattr(module, name)


def add_child(parent: nn.Module, name: str, child: nn.Module) -> None:
    """``parent.<name> = child`` for a `parent` that has no attribute, parameter, buffer or
    child of that name yet (a module being built): straight into its ``_modules``, unless
    torch's global module registration hooks want to see it (then through ``__setattr__``)."""
    if getattr(torch_module, "_global_module_registration_hooks", None) != {}:
        setattr(parent, name, child)
        return
    parent._modules[name] = child


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
