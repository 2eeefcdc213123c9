"""GeneralizedComponent: a named, hookable view of one HF submodule."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from bridge_core import expr
from bridge_core.hooks import HookPoint, InputTap, OutputTap, new_points
from bridge_core.module_state import (
    LazyModule,
    add_children,
    init_lazy_module,
    lazy_containers,
    submodule,
)

if TYPE_CHECKING:
    from bridge_core.layout import ImageLayout, LayoutRequest

Shape = tuple[int | str, ...]
"""A shape in symbols, ``("batch", "pos", "d_model")``: see `GeneralizedComponent.dims`."""


_INSTANCE_ATTRIBUTES = frozenset(
    {"name", "config", "options", "original_component", "removed_aliases", "extra_hooks"}
) | frozenset(vars(nn.Module()))

_RESERVED: weakref.WeakKeyDictionary[type, frozenset[str]] = weakref.WeakKeyDictionary()
"""`GeneralizedComponent.reserved_names` of each kind, once per class."""


class _OwnPoint:
    """A kind's own hook point (``hook_in``, ``hook_out``, its `internal_hooks`), read from
    the component's ``_modules``. nn.Module keeps children there, so reading one as an
    attribute otherwise fails the normal lookup first and then calls `__getattr__`: ~0.5 µs,
    ~400 times a wrap of a 12-layer GPT-2, where this takes ~0.1 µs. It has no ``__set__``:
    setting the attribute goes through nn.Module's ``__setattr__`` as before, and a point the
    component does not hold (removed) falls back to `__getattr__`."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: type[Any] | None = None) -> Any:
        if instance is None:
            return self
        modules = instance.__dict__.get("_modules")
        if modules is not None:
            point = modules.get(self.name)
            if point is not None:
                return point
        raise AttributeError(self.name)  # Python then asks `__getattr__`


@lazy_containers()  # nn.Module's 15 containers on first use: a wrap makes dozens of components
class GeneralizedComponent(LazyModule):
    """A bridge component: an HF submodule with ``hook_in`` and ``hook_out``.

    The HF module is kept as `original_component` (not registered as a child, so the bridge's
    state dict holds each weight once, under the HF model). `forward` simply calls it; the
    hook points fire through taps on that module, so calling the HF model or the component
    runs the same hooks. Subclasses add internal hook points in `bind`.

    Class attributes:
        hook_aliases: names relative to this component that point at canonical hook names
            (``{"hook_resid_pre": "hook_in"}``).
        is_list_item: the spec's path names a list of modules (the transformer blocks);
            one component is built per item.
        internal_hooks: hook points besides ``hook_in``/``hook_out`` that `bind` connects.
        path_options: options that name HF submodules (checked when the bridge is built).
        required_options: options the spec must give.
        size_options: options that are sizes (integers, or expressions over the bridge's
            config fields such as ``"n_key_value_heads * d_head"``).
        input_arg: keyword under which the HF module receives its input, if not positional.
        hook_shapes: the documented shape of each hook point, in symbols that `dims`
            gives values to (``"batch"``, ``"pos"``, ``"d_model"`` ...; a name it does not
            know is free but must be the same wherever it appears; ``"a|b"`` is either).
    """

    hook_aliases: ClassVar[dict[str, str]] = {}
    is_list_item: ClassVar[bool] = False
    internal_hooks: ClassVar[tuple[str, ...]] = ()
    path_options: ClassVar[tuple[str, ...]] = ()
    required_options: ClassVar[tuple[str, ...]] = ()
    size_options: ClassVar[tuple[str, ...]] = ()
    input_arg: ClassVar[str] = "hidden_states"
    hook_shapes: ClassVar[dict[str, Shape]] = {}

    name: str
    options: dict[str, Any]
    original_component: nn.Module | None
    removed_aliases: set[str]
    extra_hooks: list[str]
    hook_in: HookPoint
    hook_out: HookPoint

    def __init__(
        self,
        name: str,
        config: Any | None = None,
        submodules: Mapping[str, nn.Module] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        """Create an unbound component.

        Args:
            name: the component's name in the bridge tree (``"embed"``, ``"blocks.3.attn"``).
            config: the bridge's TransformerBridgeConfig, if the component needs it.
            submodules: child components (or `nn.ModuleList`s of them), by attribute name.
            options: per-kind options from the adapter spec.
        """
        init_lazy_module(self)  # nn.Module.__init__ at a fraction of its cost (containers
        # on first use; `__setattr__` and `register_*` make them before nn.Module's checks)
        # Plain values (never a module, parameter or tensor) and the new hook points skip
        # nn.Module.__setattr__'s checks, which find nothing to do on a module being built.
        plain = object.__setattr__
        plain(self, "name", name)
        if isinstance(config, nn.Module | torch.Tensor):
            self.config = config  # registered as nn.Module registers such values
        else:
            plain(self, "config", config)
        plain(self, "options", dict(options or {}))
        plain(self, "original_component", None)
        plain(self, "removed_aliases", set())
        plain(self, "extra_hooks", [])
        add_children(self, new_points(("hook_in", "hook_out", *self.internal_hooks)))
        for key, child in (submodules or {}).items():
            if _free(key, self) and isinstance(child, nn.Module):
                add_children(self, {key: child})  # what add_module checks holds: skip its ~2 µs
            else:
                self.add_module(key, child)  # its own errors for names it refuses

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _own_points(cls)

    def __getattr__(self, name: str) -> Any:
        """Children and hook points (nn.Module's lookup), then this kind's hook aliases:
        ``bridge.blocks[0].hook_resid_post`` is ``bridge.blocks[0].hook_out``."""
        modules = self.__dict__.get("_modules")
        if modules is not None and name in modules:  # the common case, without nn.Module's
            return modules[name]  # lookup (a module's names are unique across its tables)
        try:
            return super().__getattr__(name)
        except AttributeError:
            target = type(self).hook_aliases.get(name)
            if target is None or name in self.__dict__.get("removed_aliases", ()):
                raise
            try:
                return self.get_submodule(target)
            except AttributeError:
                raise AttributeError(
                    f"{type(self).__name__} {self.name!r} has no {name!r}: its target "
                    f"{target!r} does not exist in this component"
                ) from None

    @classmethod
    def reserved_names(cls) -> frozenset[str]:
        """Names a child component cannot take: attributes of this kind and of every component
        (``name``, ``config``, ``forward`` ...). Hook point names start with ``hook_``, which
        component names never do."""
        names = _RESERVED.get(cls)
        if names is None:  # dir() of a class costs ~20 µs, and every wrap asks for each kind
            names = _RESERVED[cls] = frozenset(dir(cls)) | _INSTANCE_ATTRIBUTES
        return names

    def set_original_component(self, module: nn.Module) -> None:
        """Attach this component to the HF module it bridges and bind its hook points."""
        object.__setattr__(self, "original_component", module)
        self.hook_in.bind(InputTap(module, self.input_arg))
        self.hook_out.bind(OutputTap(module))
        self.bind(module)
        modules = self._modules
        for attr, shape in self.hook_shapes.items():
            point = modules.get(attr)  # a point of its own, mostly: without `_point`'s call
            if point is None:
                point = self._point(attr)
            if isinstance(point, HookPoint):
                point.__dict__["shape"] = shape  # plain state (HookPoint.__setattr__)

    def bind(self, module: nn.Module) -> None:
        """Bind the internal hook points of this kind of component to `module`'s parts."""

    def hooks_bound(self) -> None:
        """Called once the spec's hook settings (taps, shapes, removals) are applied; a kind
        whose points derive from others (a norm's scale from its input) adjusts them here."""

    def own_hook_points(self) -> list[tuple[str, HookPoint]]:
        """This component's bound hook points (not its children's), ``hook_out`` last."""
        modules = self._modules
        found = []
        for name in dict.fromkeys(("hook_in", *self.internal_hooks, *self.extra_hooks, "hook_out")):
            point = modules.get(name)  # as in `set_original_component`
            if point is None:
                point = self._point(name)
            if isinstance(point, HookPoint) and point._tap is not None:
                found.append((name, point))
        return found

    def _point(self, attr: str) -> HookPoint | None:
        """The hook point `attr` of this component, or None (a child's lookup, without
        nn.Module's __getattr__ for the hook points the component holds itself)."""
        point = self._modules.get(attr)
        if point is None:
            point = getattr(self, attr, None)
        return point if isinstance(point, HookPoint) else None

    def size(self, value: Any, what: str) -> int:
        """A size option's value: an int, or an expression over the bridge config's fields.

        Raises:
            ValueError: the expression names no config field or is not an integer.
        """

        def lookup(name: str) -> Any:
            return (
                getattr(self.config, name, expr.MISSING)
                if self.config is not None
                else expr.MISSING
            )

        try:
            return expr.size(value, lookup, f"{self.name}: {what}")
        except expr.ExpressionError as exc:
            raise ValueError(str(exc)) from None

    def dims(self) -> dict[str, int | None]:
        """Sizes this component knows of its own, for the shape symbols of its hook points.

        `verify` starts from the bridge config's sizes (``d_model``, ``n_heads``, ``d_head``,
        ``n_kv_heads``, ``d_mlp``, ``d_vocab``) and the inputs' ``batch`` and ``pos``; each
        component's values override them for itself and its children. None makes a symbol
        free (any size, the same wherever it appears in one shape): a vision tower sets its
        own widths and frees ``batch`` and ``pos``. Nothing by default.
        """
        return {}

    def unreachable_hooks(self) -> list[str]:
        """Full names of this component's hook points whose edits cannot reach the outputs.

        `verify` checks that an edit there changes nothing (instead of something). For example
        a vision tower's layers after the one a VLM selects. None by default.
        """
        return []

    def integer_ranges(self) -> dict[str, int]:
        """Full names of this component's integer hook points and how many values they take.

        `verify`'s random edit of such a point stays in range (``(x + 1) % n``): expert indices
        of a MoE router take ``n_experts`` values. Token ids (``d_vocab``) need no entry.
        """
        return {}

    def skipped_checks(self) -> dict[str, str]:
        """Per-attention checks of `verify` (``pattern``) that do not apply here.

        By check, with the reason, as a spec's ``[verify] skip`` but decided by the component
        from the model it is bound to: Falcon's attention skips ``pattern`` for ALiBi
        checkpoints, whose bias `verify` does not recompute. None by default.
        """
        return {}

    def call_counts(self, inputs: Mapping[str, Any]) -> dict[str, int]:
        """Counts that hook points' ``calls`` expressions may name (``{"n_images": 2}``)."""
        return {}

    def example_inputs(self, inputs: dict[str, Any], processor: Any = None) -> dict[str, Any]:
        """Complete `inputs` (HF forward keywords with ``input_ids``) with what this part needs.

        `verify` builds its inputs this way: a vision tower adds images and their tokens,
        through the model's `processor` when there is one.
        """
        return inputs

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the HF module (hooks fire through their taps)."""
        if self.original_component is None:
            raise RuntimeError(f"component {self.name!r} is not attached to an HF module")
        return self.original_component(*args, **kwargs)

    def check_inputs(self, inputs: Mapping[str, Any]) -> None:
        """Raise `InputError` if the HF forward keywords `inputs` cannot work for this component.

        The bridge asks each top-level component before every forward and `generate`, so a
        kind can say what it expected instead of failing deep inside the model. The default
        accepts everything.
        """

    def image_layout(self, request: LayoutRequest) -> ImageLayout | None:
        """Where the images of a run sit in the language model's sequence, or None.

        `bridge.image_layout` and `run_with_cache` ask each top-level component and use the
        first layout returned; a vision component overrides this (see `bridge_core.multimodal`).
        The default knows no images.
        """
        return None

    @property
    def real_components(self) -> dict[str, nn.Module]:
        """The HF modules this component and its child components bridge, by bridge name."""
        found: dict[str, nn.Module] = {}
        if self.original_component is not None:
            found[self.name] = self.original_component
        for child in self.components():
            found.update(child.real_components)
        return found

    def components(self) -> Iterator[GeneralizedComponent]:
        """Direct child components (list items flattened)."""
        seen: set[int] = set()  # each once, as children() gives them (without its cost)
        for child in self._modules.values():
            if isinstance(child, HookPoint) or child is None or id(child) in seen:
                continue
            seen.add(id(child))
            if isinstance(child, GeneralizedComponent):
                yield child
            elif isinstance(child, nn.ModuleList):
                yield from (c for c in child if isinstance(c, GeneralizedComponent))

    def part(self, module: nn.Module, option: str) -> nn.Module:
        """The submodule of `module` named by option `option` of the spec."""
        path = self.options.get(option)
        if not isinstance(path, str):
            raise KeyError(f"component {self.name!r} needs the option {option!r}")
        return submodule(module, path)

    def extra_repr(self) -> str:
        original = type(self.original_component).__name__ if self.original_component else None
        return f"name={self.name!r}, original={original}"


def _own_points(cls: type[GeneralizedComponent]) -> None:
    """Give `cls` an `_OwnPoint` for each of its own hook points that no class in its MRO
    defines otherwise."""
    for name in ("hook_in", "hook_out", *cls.internal_hooks):
        if not any(name in vars(base) for base in cls.__mro__):
            setattr(cls, name, _OwnPoint(name))


_own_points(GeneralizedComponent)


def _free(name: object, component: GeneralizedComponent) -> bool:
    """Whether ``add_module`` takes child `name` on `component` (being built) without a
    question: a non-empty name without a dot that is no attribute of its kind, no hook alias
    and nothing the component holds yet (``add_module`` asks ``hasattr``, which says no by
    raising an AttributeError: that costs more than the registration itself)."""
    cls = type(component)
    taken = _TAKEN.get(cls)
    if taken is None:
        taken = _TAKEN[cls] = cls.reserved_names() | frozenset(cls.hook_aliases)
    return (
        isinstance(name, str)
        and bool(name)
        and "." not in name
        and name not in taken
        and name not in component._modules
        and name not in component.__dict__
    )


_TAKEN: weakref.WeakKeyDictionary[type, frozenset[str]] = weakref.WeakKeyDictionary()
"""What `_free` finds taken on each kind: its reserved names and hook aliases."""


def input_checks(modules: Iterable[nn.Module]) -> list[Callable[[Mapping[str, Any]], None]]:
    """The `check_inputs` of the components among `modules` whose kind checks anything (the
    default accepts everything and is left out)."""
    default = GeneralizedComponent.check_inputs
    return [
        module.check_inputs
        for module in modules
        if isinstance(module, GeneralizedComponent) and type(module).check_inputs is not default
    ]
