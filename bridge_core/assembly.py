"""Build a bridge's component tree from an adapter spec and an HF model."""

from __future__ import annotations

import functools
import re
from collections.abc import Collection, Iterator
from typing import Any

from pydantic import TypeAdapter, ValidationError
from torch import nn

from bridge_core.components.base import GeneralizedComponent
from bridge_core.config import TransformerBridgeConfig
from bridge_core.errors import BridgeError, SpecError, did_you_mean
from bridge_core.hooks import HookPoint, InputTap, OutputTap, Owner, Tap
from bridge_core.module_state import submodule
from bridge_core.naming import HookNames
from bridge_core.registry import Registry
from bridge_core.spec import AdapterSpec, ComponentSpec, TapSpec, ViewSpec
from bridge_core.views import Flatten, Reshape, Select, Split, Step, Tokens, Transpose, ViewTap

Built = GeneralizedComponent | nn.ModuleList


def check_spec(spec: AdapterSpec, registry: Registry, reserved: Collection[str] = ()) -> None:
    """Every check of a spec that needs no model (`wrap` runs it first, ``spec validate`` alone).

    Component kinds are registered and get their required options; component names are taken
    by no attribute (of the bridge, `reserved`, or of the parent's kind); fixed config values
    validate; no two alias keys define one alias and no aliases point at each other in a circle.

    Raises:
        SpecError: naming the spec, the key, and what is accepted.
    """

    kinds = registry.component_kinds()  # once: the registry builds the table on each ask

    def components(
        tree: dict[str, ComponentSpec], where: str, taken: Collection[str], owner: str
    ) -> None:
        for key, component in tree.items():
            place = f"{where}.{key}"
            if key in taken:
                raise _spec_error(
                    spec,
                    place,
                    f"component name {key!r} is taken by an attribute of {owner}. Accepted: "
                    "a name that is no attribute of it (e.g. 'my_' + the name)",
                )
            try:
                cls = kinds.get(component.kind) or registry.component_class(component.kind)
            except BridgeError as exc:
                raise _spec_error(spec, f"{place}.kind", str(exc)) from exc
            missing = [o for o in cls.required_options if o not in component.options]
            if missing:
                raise _spec_error(
                    spec,
                    f"{place}.options",
                    f"kind {component.kind!r} needs the option(s) {missing} (got "
                    f"{component.options})",
                )
            kind = f"{cls.__name__} (kind {component.kind!r})"
            components(component.submodules, f"{place}.submodules", cls.reserved_names(), kind)

    components(spec.components, "components", reserved, "TransformerBridge")
    for field, value in spec.config.fixed.items():
        try:
            _field_validator(field).validate_python(value)
        except ValidationError as exc:
            problem = "; ".join(error["msg"] for error in exc.errors())
            raise _spec_error(spec, f"config.fixed.{field}", f"{problem} (got {value!r})") from exc
    _check_alias_keys(spec)


@functools.cache
def _field_validator(field: str) -> TypeAdapter[Any]:
    """A validator of one TransformerBridgeConfig field (pydantic builds it in ~0.2 ms)."""
    annotation: Any = TransformerBridgeConfig.model_fields[field].annotation
    return TypeAdapter(annotation)


def _spec_error(spec: AdapterSpec, where: str, message: str) -> SpecError:
    return SpecError(f"adapter spec {spec.name!r}, {where}: {message}")


class Assembler:
    """Turns `spec.components` into bridge components attached to `model`'s modules."""

    def __init__(
        self,
        spec: AdapterSpec,
        model: nn.Module,
        config: Any,
        registry: Registry,
        reserved: Collection[str] = (),
    ):
        """Args: reserved: names top-level components cannot take (the bridge's attributes)."""
        self.spec = spec
        self.model = model
        self.config = config
        self.registry = registry
        self.reserved = reserved
        self._classes: dict[str, type[GeneralizedComponent]] = {}  # by kind, for this build

    def build(self) -> dict[str, Built]:
        """The top-level components, by name; optional ones absent from the model are skipped.

        Raises:
            SpecError: the spec fails `check_spec`, or does not fit the model.
        """
        try:
            check_spec(self.spec, self.registry, self.reserved)
        except SpecError as exc:
            raise SpecError(f"{exc} (model {type(self.model).__name__})") from exc
        built: dict[str, Built] = {}
        for key, component in self.spec.components.items():
            entry = self._entry(component, self.model, key, f"components.{key}")
            if entry is not None:
                built[key] = entry
        return built

    def _entry(self, spec: ComponentSpec, parent: nn.Module, name: str, where: str) -> Built | None:
        module = self._resolve(spec, parent, where)
        if module is None:
            return None
        cls = self._classes.get(spec.kind)
        if cls is None:  # known: check_spec ran
            cls = self._classes[spec.kind] = self.registry.component_class(spec.kind)
        if not cls.is_list_item:
            return self._component(cls, spec, module, name, where)
        if not isinstance(module, nn.ModuleList | nn.Sequential):
            raise self._error(
                where,
                f"kind {spec.kind!r} is a list of layers, but {spec.paths[0]!r} is a "
                f"{type(module).__name__}, not a ModuleList",
            )
        return nn.ModuleList(
            self._component(cls, spec, item, f"{name}.{i}", f"{where}[{i}]")
            for i, item in enumerate(module)
        )

    def _component(
        self,
        cls: type[GeneralizedComponent],
        spec: ComponentSpec,
        module: nn.Module,
        name: str,
        where: str,
    ) -> GeneralizedComponent:
        options = self._options(cls, spec, module, where)
        children: dict[str, nn.Module] = {}
        for key, sub in spec.submodules.items():
            child = self._entry(sub, module, f"{name}.{key}", f"{where}.submodules.{key}")
            if child is not None:
                children[key] = child
        try:
            component = cls(name, config=self.config, submodules=children, options=options)
        except (KeyError, TypeError) as exc:  # a child named like an attribute of the kind
            clash = str(exc).strip("'\"")
            raise self._error(
                where, f"a component name is taken in {cls.__name__}: {clash}"
            ) from exc
        try:
            for option in cls.size_options:
                if option in spec.options and not isinstance(spec.options[option], list):
                    component.size(spec.options[option], f"options.{option}")
            component.set_original_component(module)
            _apply_hook_specs(component, spec, module, self.model)
            component.hooks_bound()
        except (KeyError, ValueError, AttributeError, TypeError, BridgeError) as exc:
            if isinstance(exc, SpecError):
                raise
            raise self._error(where, str(exc).strip("'\"")) from exc
        return component

    def _resolve(self, spec: ComponentSpec, parent: nn.Module, where: str) -> nn.Module | None:
        for path in spec.paths:
            try:
                return submodule(parent, "" if path == "." else path)
            except AttributeError:
                continue
        if spec.optional:
            return None
        known = [n for n, _ in parent.named_modules() if n and n.count(".") < 3]
        hint = did_you_mean(spec.paths[0], known)
        raise self._error(
            where, f"path {spec.path!r} does not exist in {type(parent).__name__}.{hint}"
        )

    def _options(
        self, cls: type[GeneralizedComponent], spec: ComponentSpec, module: nn.Module, where: str
    ) -> dict[str, Any]:
        """The spec's options with each path option checked, and candidate lists resolved.

        A path option given as a list names candidates, tried in order like a component's
        `path`; when none exists in the module, the option is left out (T5's gated MLP has
        ``wi_0`` and ``wi_1`` where the plain one has ``wi``), unless the kind requires it.
        Required options were checked by `check_spec`.
        """
        options = dict(spec.options)
        for option in cls.path_options:
            given = options.get(option)
            if given is None:
                continue
            candidates = given if isinstance(given, list) else [given]
            found = next((p for p in candidates if _has_submodule(module, p)), None)
            if found is not None:
                options[option] = found
            elif isinstance(given, list) and option not in cls.required_options:
                del options[option]
            else:
                children = [n for n, _ in module.named_children()]
                first = str(candidates[0]) if candidates else ""
                raise self._error(
                    f"{where}.options.{option}",
                    f"path {given!r} does not exist in {type(module).__name__}."
                    f"{did_you_mean(first, children)} Its children: {children}",
                )
        return options

    def _error(self, where: str, message: str) -> SpecError:
        model = type(self.model).__name__
        return SpecError(f"adapter spec {self.spec.name!r}, {where} (model {model}): {message}")


def _has_submodule(module: nn.Module, path: object) -> bool:
    if not isinstance(path, str):
        return False
    try:
        submodule(module, path)
    except AttributeError:
        return False
    return True


def _apply_hook_specs(
    component: GeneralizedComponent, spec: ComponentSpec, module: nn.Module, model: nn.Module
) -> None:
    """The spec's per-component hook settings: taps, removals, calls, collection, shapes."""
    aliases = type(component).hook_aliases  # components resolve them as attributes too
    for attr, tap in spec.hooks.items():
        point = None if attr in aliases else getattr(component, attr, None)
        if point is None:
            point = HookPoint()
            setattr(component, attr, point)
            component.extra_hooks.append(attr)
        elif not isinstance(point, HookPoint):
            raise ValueError(
                f"hooks.{attr}: {attr!r} is a {type(point).__name__}, not a hook point"
            )
        point._tap = None  # rebound below
        point.bind(_tap(component, module, model, tap, attr))
    for attr, shape in spec.shapes.items():
        point = getattr(component, attr, None)
        if not isinstance(point, HookPoint):
            raise ValueError(f"shapes.{attr}: {component.name!r} has no hook point {attr!r}")
        point.shape = tuple(shape)
    for name in spec.remove_hooks:
        _remove(component, name)
    if spec.calls != 1 or spec.collect != "list":
        for sub in _walk_one(component):
            for _, point in sub.own_hook_points():
                point.calls, point.collect = spec.calls, spec.collect


def _remove(component: GeneralizedComponent, name: str) -> None:
    owner_path, _, attr = name.rpartition(".")
    try:
        owner = component.get_submodule(owner_path) if owner_path else component
    except AttributeError:
        owner = None
    # aliases first: components resolve them as attributes too (blocks[0].hook_resid_mid)
    point = getattr(owner, attr, None) if owner is not None else None
    if name in component.hook_aliases:
        component.removed_aliases.add(name)
    elif isinstance(point, HookPoint):
        point._tap = None  # unbound points are not named, so they do not exist
    else:
        known = [n for n, _ in component.own_hook_points()] + list(component.hook_aliases)
        raise ValueError(
            f"remove_hooks: {name!r} is neither a hook point nor an alias of "
            f"{component.name!r}.{did_you_mean(name, known)}"
        )


def _tap(
    component: GeneralizedComponent, module: nn.Module, model: nn.Module, spec: TapSpec, attr: str
) -> Tap:
    try:
        target = submodule(module, spec.module)
    except AttributeError:
        children = [n for n, _ in module.named_children()]
        raise ValueError(
            f"hooks.{attr}.module: {spec.module!r} does not exist in {type(module).__name__}."
            f"{did_you_mean(spec.module, children)} Its children: {children}"
        ) from None
    if spec.at == "output":
        inner: Tap = OutputTap(target)
    else:
        default = component.input_arg if target is module else "hidden_states"
        inner = InputTap(target, spec.arg or default)
    if not spec.view:
        return inner
    steps = tuple(_step(component, model, step, f"hooks.{attr}.view") for step in spec.view)
    return ViewTap(inner, steps)


def _step(component: GeneralizedComponent, model: nn.Module, step: ViewSpec, where: str) -> Step:
    def sizes(values: list[int | str]) -> tuple[int, ...]:
        return tuple(component.size(v, f"{where}.{step.operation}") for v in values)

    if step.split is not None and step.index is not None:
        return Split(sizes(step.split), step.index)
    if step.reshape is not None:
        return Reshape(sizes(step.reshape))
    if step.flatten is not None:
        return Flatten(step.flatten)
    if step.select is not None and step.dim is not None:
        return Select(step.dim, step.select)
    if step.transpose is not None:
        return Transpose(step.transpose)
    if step.tokens is not None:
        return Tokens(model.get_submodule(step.tokens))
    raise ValueError(f"{where}: an empty view step")  # excluded by ViewSpec's validation


def _walk_one(component: GeneralizedComponent) -> Iterator[GeneralizedComponent]:
    yield component
    for child in component.components():
        yield from _walk_one(child)


def collect_names(
    components: dict[str, Built], spec: AdapterSpec, owner: Owner | None = None
) -> HookNames:
    """Name every bound hook point (in forward order), give it `owner`, and register the
    aliases."""
    names = HookNames()
    order: list[GeneralizedComponent] = []  # every component, parents before children
    for entry in components.values():
        for component in entry if isinstance(entry, nn.ModuleList) else [entry]:
            if isinstance(component, GeneralizedComponent):
                _name_points(component, names.points, owner, order)
    points, aliases = names.points, names.aliases
    for component in order:
        skipped = (*component.removed_aliases, *component.extra_hooks)  # the spec's own points
        for alias, target in component.hook_aliases.items():
            if alias in skipped:
                continue
            full = f"{component.name}.{target}"
            if full in points or full in aliases:
                names.add_alias(f"{component.name}.{alias}", full)
    _add_spec_aliases(names, spec)
    return names


def _name_points(
    component: GeneralizedComponent,
    points: dict[str, HookPoint],
    owner: Owner | None,
    order: list[GeneralizedComponent],
) -> None:
    """hook_in, the internal and spec-declared hook points, the children's, then hook_out,
    into `points` by full name; `order` gets the components, parents before their children."""
    order.append(component)
    own = component.own_hook_points()
    split = len(own) - 1 if own and own[-1][0] == "hook_out" else len(own)
    prefix = component.name + "."
    _add_points(own[:split], prefix, owner, points)
    for child in component.components():
        _name_points(child, points, owner, order)
    _add_points(own[split:], prefix, owner, points)


def _add_points(
    own: list[tuple[str, HookPoint]],
    prefix: str,
    owner: Owner | None,
    points: dict[str, HookPoint],
) -> None:
    for attr, point in own:
        state = point.__dict__  # plain state, set directly (HookPoint.__setattr__)
        name = state["name"] = prefix + attr
        state["owner"] = owner
        points[name] = point


def _add_spec_aliases(names: HookNames, spec: AdapterSpec) -> None:
    """The spec's aliases in dependency order, so that the order of the table does not matter:
    an alias whose target is another key's alias is added after that one."""
    pending = dict(spec.hook_aliases)
    defined: dict[str, str] = {}  # alias -> the key that defined it
    while pending:
        ready = [
            key
            for key, target in pending.items()
            if _exists(names, _first(target))
            and not any(_defines(other, _first(target)) for other in pending if other != key)
        ]
        if not ready:
            key, target = next(iter(pending.items()))
            if "{i}" in key:
                raise _spec_error(spec, f"hook_aliases.{key}", f"{target!r} matches no hook point")
            _add_alias(names, key, target, spec, key)  # raises: names the missing target
        for key in ready:
            _expand(names, key, pending.pop(key), spec, defined)


def _expand(
    names: HookNames, key: str, target: str, spec: AdapterSpec, defined: dict[str, str]
) -> None:
    """Add the alias(es) of one key; a template for i = 0, 1, ... while the target exists."""
    pairs = [(key, target)]
    if "{i}" in key:
        pairs, i = [], 0
        while _exists(names, t := target.replace("{i}", str(i))):
            pairs.append((key.replace("{i}", str(i)), t))
            i += 1
    for alias, resolved in pairs:
        if alias in defined:
            raise _spec_error(
                spec,
                f"hook_aliases.{key}",
                f"alias {alias!r} is also defined by hook_aliases.{defined[alias]}; an alias "
                "names one hook point. Accepted: one key per alias",
            )
        defined[alias] = key
        _add_alias(names, alias, resolved, spec, key)


def _exists(names: HookNames, name: str) -> bool:
    return name in names.points or name in names.aliases


def _first(target: str) -> str:
    """A target as it is first looked up: a template's for i = 0."""
    return target.replace("{i}", "0")


def _defines(key: str, name: str) -> bool:
    """Whether the alias key (plain or template) defines the alias `name`."""
    if "{i}" not in key:
        return key == name
    return _template(key).fullmatch(name) is not None


@functools.lru_cache(maxsize=1024)
def _template(key: str) -> re.Pattern[str]:
    """The names a template key defines, as a pattern (compiled once: the alias checks ask
    every key about every other, hundreds of times a wrap for a VLM's spec)."""
    return re.compile("".join(r"\d+" if part == "{i}" else re.escape(part) for part in _split(key)))


def _split(key: str) -> list[str]:
    return [part for part in re.split(r"(\{i\})", key) if part]


def _check_alias_keys(spec: AdapterSpec) -> None:
    """Model-free: no two keys define one alias, and no keys point at each other in a circle."""
    keys = list(spec.hook_aliases)
    for n, key in enumerate(keys):
        for other in keys[n + 1 :]:
            if _defines(other, _first(key)) or _defines(key, _first(other)):
                raise _spec_error(
                    spec,
                    f"hook_aliases.{other}",
                    f"defines the same alias as hook_aliases.{key} ({_first(other)!r}); an "
                    "alias names one hook point. Accepted: one key per alias",
                )
    for start in keys:
        chain, key = [start], start
        while (
            nxt := next((k for k in keys if _defines(k, _first(spec.hook_aliases[key]))), None)
        ) is not None:
            if nxt in chain:
                cycle = " -> ".join([*chain[chain.index(nxt) :], nxt])
                raise _spec_error(
                    spec,
                    f"hook_aliases.{start}",
                    f"aliases point at each other in a circle ({cycle}) and so at no hook "
                    "point. Accepted: aliases whose chain ends at a canonical hook name",
                )
            chain.append(nxt)
            key = nxt


def _add_alias(names: HookNames, alias: str, target: str, spec: AdapterSpec, key: str) -> None:
    """Add one alias of the spec; a refusal names the spec and its key in ``hook_aliases``."""
    try:
        names.add_alias(alias, target)
    except BridgeError as exc:
        raise SpecError(f"adapter spec {spec.name!r}, hook_aliases.{key}: {exc}") from exc
