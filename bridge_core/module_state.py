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
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.modules import module as torch_module

_IMMUTABLE = (bool, int, float, str, type(None))


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
