"""Kernel switches: a config's implementation name pointed at a bridge router while hooked.

transformers picks some kernels by name from a config attribute through a public interface
(``config._attn_implementation`` and `AttentionInterface`; ``config._experts_implementation``
and `ExpertsInterface`). A hook point that needs to see inside such a kernel registers a
router under a name of our own (``transformer_bridge|<original>``) and points the config at it
while the point is hooked; the router runs the original kernel for everything it is not asked
to observe. A `KernelSwitch` does the pointing and the restoring, counted per config so that
several hooked modules (and bridges) sharing one config restore it only when the last goes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import nn

from bridge_core.errors import BridgeError
from bridge_core.hooks import Handle
from bridge_core.torch_hooks import forward_hook, forward_pre_hook

PREFIX = "transformer_bridge|"


@dataclass
class _Switched:
    config: Any
    original: str
    users: int = 0


@dataclass
class KernelSwitch:
    """Switches one config attribute (``_attn_implementation``) between a kernel and ours.

    Attributes:
        attribute: the config attribute transformers reads the kernel name from.
        what: what the kernel computes, for errors ("attention", "experts").
        supported: original names the router can stand in for.
        router_name: our registered name for an original one.
        register: registers the router (in transformers' interface) under a name, once.
        refuse: the error for a module running an unsupported original.
    """

    attribute: str
    what: str
    supported: tuple[str, ...]
    router_name: Callable[[str], str]
    register: Callable[[str], None]
    refuse: Callable[[nn.Module, str], BridgeError]
    _switched: dict[int, _Switched] = field(default_factory=dict)

    def config_of(self, module: nn.Module) -> Any:
        """The config `module` reads its kernel name from.

        Raises:
            BridgeError: the module has no such config.
        """
        config = getattr(module, "config", None)
        if config is None:
            known = False
        else:  # a switched config has it (HF configs answer attribute lookups slowly)
            known = id(config) in self._switched or hasattr(config, self.attribute)
        if not known:
            raise BridgeError(
                f"hooking inside the {self.what} kernel needs {type(module).__name__} to read "
                f"its kernel from config.{self.attribute}; it has no such config"
            )
        return config

    def on(self, module: nn.Module) -> None:
        """Point `module`'s config at the router (counted; the first switch checks support)."""
        config = self.config_of(module)
        switched = self._switched.get(id(config))
        if switched is None:
            original = getattr(config, self.attribute) or "eager"
            if original not in self.supported:
                raise self.refuse(module, original)
            name = self.router_name(original)
            self.register(original)
            switched = self._switched[id(config)] = _Switched(config, original)
            setattr(config, self.attribute, name)
        switched.users += 1

    def off(self, module: nn.Module) -> None:
        """Undo one `on`; the last one restores the config's own kernel name."""
        config = self.config_of(module)
        switched = self._switched.get(id(config))
        if switched is None:
            return
        switched.users -= 1
        if switched.users <= 0:
            setattr(config, self.attribute, switched.original)
            del self._switched[id(config)]

    def original(self, module: nn.Module) -> str:
        """The kernel name `module`'s config had before it was switched (also in a copy)."""
        config = self.config_of(module)
        switched = self._switched.get(id(config))
        if switched is not None:
            return switched.original
        return _unswitched(str(getattr(config, self.attribute)))

    def active(self) -> bool:
        """Whether any config is switched now."""
        return bool(self._switched)

    def __post_init__(self) -> None:
        register_attribute(self.attribute)


class Watched(Protocol):
    """A module's route: its attached hook runs, and whether the router saw this forward."""

    called: bool

    @property
    def runs(self) -> object:
        """The attached runs: true while any hook point of the module is hooked."""


def watch(
    module: nn.Module, route: Watched, missed: Callable[[nn.Module], str]
) -> tuple[Handle, ...]:
    """Hooks that check each forward of `module` reached the router while it has runs: a
    module that computes its kernel some other way is an error (`missed` says what could not
    fire), never hooks that silently stay quiet."""

    def before(mod: nn.Module, args: Any) -> None:
        route.called = False

    def after(mod: nn.Module, args: Any, output: Any) -> None:
        if route.runs and not route.called:
            raise BridgeError(missed(mod))

    return (
        forward_pre_hook(module, before, with_kwargs=False),
        forward_hook(module, after, prepend=False),
    )


_ATTRIBUTES: list[str] = []


def register_attribute(attribute: str) -> None:
    """Let `restore_kernel_names` know of a switched config attribute."""
    if attribute not in _ATTRIBUTES:
        _ATTRIBUTES.append(attribute)


def restore_kernel_names(model: nn.Module) -> None:
    """Point every switched config in `model` (a copy made while hooked) back at its own
    kernel: the copy has none of the original's routes."""
    for module in model.modules():
        config: Any = getattr(module, "config", None)
        for attribute in _ATTRIBUTES:
            name = getattr(config, attribute, None)
            if isinstance(name, str) and name.startswith(PREFIX):
                setattr(config, attribute, _unswitched(name))


def _unswitched(name: str) -> str:
    """The original name behind one of ours (``transformer_bridge|sdpa`` -> ``sdpa``)."""
    return name.removeprefix(PREFIX).split("|")[-1]
