"""The plugin registry: loads plugins (lazily) and answers typed questions about them.

Built-in plugins are registered through the same hooks as third-party ones; third-party
plugins come from the ``transformer_bridge`` entry-point group unless the environment
variable ``TRANSFORMER_BRIDGE_DISABLE_PLUGIN_AUTOLOAD`` is set. Nothing outside this
module calls ``pm.hook.*``.

A third-party plugin cannot hurt the others: whatever it raises (``SystemExit`` included) is
reported under its name in `Registry.plugin_errors`; a name it registers that is taken (an
adapter or a component kind) is refused, the first stays in force, and the refused one can
still be picked as ``"<plugin>:<name>"``; a failing `resolve_adapter` is reported and routing
goes on. Only ``SystemExit`` of the BaseExceptions is isolated: ``KeyboardInterrupt`` (a real
Ctrl-C looks the same) and control-flow signals such as task cancellation propagate, and a load
they interrupt leaves the registry unloaded, to load afresh on the next query.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, entry_points, version
from typing import Any

import pluggy

from bridge_core import hookspecs
from bridge_core.components.base import GeneralizedComponent
from bridge_core.errors import (
    AdapterNotFoundError,
    BridgeError,
    DuplicateAdapterError,
    PluginLoadError,
    did_you_mean,
)
from bridge_core.spec import AdapterSpec

DEFAULT_PLUGINS = ("bridge_core.components.plugin", "bridge_adapters.plugin")
AUTOLOAD_ENV = "TRANSFORMER_BRIDGE_DISABLE_PLUGIN_AUTOLOAD"
HOOKSPEC_MARK = f"{hookspecs.PROJECT}_spec"


@dataclass(frozen=True)
class PluginInfo:
    """A loaded plugin: its registered name, module, and distribution (if installed)."""

    name: str
    module: str
    distribution: str | None = None
    version: str | None = None


@dataclass
class _Contribution:
    """What one plugin contributed; `refused` holds adapter and kind names that were taken."""

    adapters: list[AdapterSpec]
    components: dict[str, type[GeneralizedComponent]]
    refused: set[str] = field(default_factory=set)

    def active_adapters(self) -> list[AdapterSpec]:
        return [spec for spec in self.adapters if spec.name not in self.refused]

    def active_components(self) -> dict[str, type[GeneralizedComponent]]:
        return {k: v for k, v in self.components.items() if k not in self.refused}


ISOLATED = (Exception, SystemExit)
"""What a plugin may raise without stopping the others: errors, and ``sys.exit()`` at import.
``KeyboardInterrupt`` (a real Ctrl-C looks the same) and control-flow signals propagate."""


class Registry:
    """Adapters and component kinds contributed by plugins."""

    def __init__(self, autoload: bool | None = None) -> None:
        """Create an empty registry; plugins load on first use.

        Args:
            autoload: load entry-point plugins; by default unless the environment
                variable ``TRANSFORMER_BRIDGE_DISABLE_PLUGIN_AUTOLOAD`` is set.
        """
        if autoload is None:
            autoload = os.environ.get(AUTOLOAD_ENV, "").lower() in ("", "0", "false", "no")
        self._autoload = autoload
        self._loaded = False
        self._clear()

    def _clear(self) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._info: dict[str, PluginInfo] = {}
        self._contributions: dict[str, _Contribution] = {}
        self._errors: dict[str, BridgeError] = {}

    def register(self, plugin: object, name: str | None = None) -> str:
        """Register a plugin object or module in-process (notebooks, tests).

        Raises:
            PluginLoadError: the plugin returned something invalid, raised, or implements a
                hook that does not exist; it is not registered.
            DuplicateAdapterError: it registers an adapter or kind name that is taken, or
                claims an architecture already claimed at the same priority; it is not
                registered (register it under another adapter name, or a higher priority).
        """
        self._ensure_loaded()
        return self._add(plugin, name)

    def unregister(self, name: str) -> None:
        """Remove a plugin registered under `name`."""
        self._pm.unregister(name=name)
        self._contributions.pop(name, None)
        self._info.pop(name, None)

    @property
    def plugin_errors(self) -> dict[str, BridgeError]:
        """Plugins that failed to load, conflict, or failed in `resolve_adapter`, by name."""
        self._ensure_loaded()
        return dict(self._errors)

    def plugins(self) -> list[PluginInfo]:
        """The loaded plugins, in load order."""
        self._ensure_loaded()
        return list(self._info.values())

    def adapters(self) -> list[AdapterSpec]:
        """Every adapter in force (not those refused because their name was taken)."""
        self._ensure_loaded()
        return [spec for c in self._contributions.values() for spec in c.active_adapters()]

    def adapter_source(self, adapter_name: str) -> PluginInfo:
        """The plugin that contributed the adapter named `adapter_name` (as in `adapter`)."""
        self._ensure_loaded()
        plugin, name = self._qualified(adapter_name)
        for source, contribution in self._contributions.items():
            specs = contribution.adapters if plugin else contribution.active_adapters()
            if plugin in (None, source) and any(spec.name == name for spec in specs):
                return self._info[source]
        raise AdapterNotFoundError(f"no adapter is named {adapter_name!r}")

    def adapter(self, name: str) -> AdapterSpec:
        """The adapter called `name`, or ``"<plugin>:<name>"``: that plugin's adapter, also one
        refused because another plugin had taken its name.

        Raises:
            AdapterNotFoundError: naming the known adapters, with a did-you-mean.
        """
        specs = {spec.name: spec for spec in self.adapters()}
        if name in specs:
            return specs[name]
        plugin, bare = self._qualified(name)
        contribution = self._contributions.get(plugin or "")
        found = [s for s in contribution.adapters if s.name == bare] if contribution else []
        if found:
            return found[0]
        qualified = [f"{p}:{s.name}" for p, c in self._contributions.items() for s in c.adapters]
        raise AdapterNotFoundError(
            f"no adapter is named {name!r}.{did_you_mean(name, [*specs, *qualified])} "
            f"Known adapters: {', '.join(sorted(specs))} (or '<plugin>:<adapter>')"
        )

    def adapter_for(self, architecture: str, model_type: str | None = None) -> AdapterSpec:
        """The adapter that claims `architecture` (highest priority wins).

        Raises:
            AdapterNotFoundError: no adapter claims it; names the known adapters and the
                one that handles the same `model_type`, if any.
            DuplicateAdapterError: two adapters claim it at the same priority.
        """
        claims = [spec for spec in self.adapters() if architecture in spec.architectures]
        if not claims:
            raise AdapterNotFoundError(self._unclaimed(architecture, model_type))
        claims.sort(key=lambda spec: spec.priority, reverse=True)
        if len(claims) > 1 and claims[0].priority == claims[1].priority:
            raise DuplicateAdapterError(self._duplicate(architecture, claims[0], claims[1]))
        return claims[0]

    def resolve(self, hf_config: Any, architecture: str | None = None) -> AdapterSpec:
        """The adapter for an HF config: a plugin's `resolve_adapter`, else its architecture.

        A `resolve_adapter` that raises or returns no adapter is reported (a warning and
        `plugin_errors`) and skipped, so one broken plugin cannot block every model.

        Args:
            architecture: the model class name, when known (else ``architectures[0]``).
        """
        self._ensure_loaded()
        for impl in reversed(self._pm.hook.resolve_adapter.get_hookimpls()):  # pluggy's order
            try:
                spec = _call(impl, "resolve_adapter", hf_config=hf_config)
                if spec is not None:  # firstresult
                    return _validated(spec, "resolve_adapter", impl.plugin_name)
            except BridgeError as error:
                note = " (skipped: routing by architecture goes on)"
                cause = error.__cause__ or error
                self._report(impl.plugin_name, PluginLoadError(f"{error}{note}"), cause)
        architectures = getattr(hf_config, "architectures", None) or []
        model_type = getattr(hf_config, "model_type", None)
        architecture = architecture or (architectures[0] if architectures else None)
        if architecture is None:
            raise AdapterNotFoundError(
                f"the config (model_type {model_type!r}) names no architecture; pass adapter="
            )
        return self.adapter_for(architecture, model_type)

    def component_kinds(self) -> dict[str, type[GeneralizedComponent]]:
        """Every component kind in force."""
        self._ensure_loaded()
        return {
            k: v for c in self._contributions.values() for k, v in c.active_components().items()
        }

    def component_class(self, kind: str) -> type[GeneralizedComponent]:
        """The component class for `kind` (or ``"<plugin>:<kind>"``, as in `adapter`); a
        KeyError-like error names the known kinds."""
        kinds = self.component_kinds()
        if kind in kinds:
            return kinds[kind]
        plugin, bare = self._qualified(kind)
        contribution = self._contributions.get(plugin or "")
        if contribution is not None and bare in contribution.components:
            return contribution.components[bare]
        raise AdapterNotFoundError(
            f"unknown component kind {kind!r}.{did_you_mean(kind, kinds)} "
            f"Known kinds: {', '.join(sorted(kinds))}"
        )

    def _qualified(self, name: str) -> tuple[str | None, str]:
        """``"plugin:name"`` as (plugin, name) if that plugin is registered, else (None, name)."""
        plugin, colon, bare = name.rpartition(":")
        return (plugin, bare) if colon and plugin in self._contributions else (None, name)

    # -- loading ---------------------------------------------------------------------

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # a plugin that queries this registry while loading sees it so far
        try:
            version = _own_version()
            for module_name in DEFAULT_PLUGINS:
                info = PluginInfo(module_name, module_name, "transformer-bridge", version)
                self._add(importlib.import_module(module_name), module_name, info, strict=True)
            if self._autoload:
                self._load_entry_points()
        except BaseException:  # a broken built-in, or Ctrl-C: never half-loaded
            self._loaded = False
            self._clear()
            raise

    def _load_entry_points(self) -> None:
        for ep in entry_points(group=hookspecs.PROJECT):
            dist = ep.dist.name if ep.dist else None
            version = ep.dist.version if ep.dist else None
            try:
                plugin = ep.load()
                info = PluginInfo(ep.name, ep.value, dist, version)
                self._add(plugin, ep.name, info, strict=False)
            except PluginLoadError as error:
                self._report(ep.name, error)
            except ISOLATED as exc:
                what = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, SystemExit):
                    what = f"SystemExit({exc.code!r}): the plugin called sys.exit() at import"
                self._report(
                    ep.name,
                    PluginLoadError(f'Error importing plugin "{ep.name}" ({ep.value}): {what}'),
                    exc,
                )

    def _report(self, plugin: str, error: BridgeError, cause: BaseException | None = None) -> None:
        if cause is not None:
            error.__cause__ = cause
        known = self._errors.get(plugin)
        if known is not None and str(error) not in str(known):  # keep every problem listed
            combined = PluginLoadError(f"{known}\n{error}")
            combined.__cause__ = error.__cause__ or known.__cause__
            error = combined
        elif known is not None:
            return
        self._errors[plugin] = error
        warnings.warn(str(error), RuntimeWarning, stacklevel=3)

    def _add(
        self, plugin: object, name: str | None, info: PluginInfo | None = None, strict: bool = True
    ) -> str:
        """Register `plugin`; a conflict is raised if `strict`, else reported: a taken name is
        refused (the first stays in force), an equal-priority claim is kept (looking the
        architecture up names both)."""
        taken = name is not None and self._pm.has_plugin(name)
        if taken or self._pm.is_registered(plugin):
            raise PluginLoadError(
                f"plugin {name or plugin!r} is already registered; unregister({name!r}) first "
                "to replace it"
            )
        try:
            registered = self._pm.register(plugin, name)
        except pluggy.PluginValidationError as exc:
            raise PluginLoadError(f"plugin {name or plugin!r}: {exc}") from exc
        if registered is None:  # blocked with pm.set_blocked
            raise PluginLoadError(f"plugin {name or plugin!r} is blocked")
        try:
            _check_hook_names(self._pm, registered)
            contribution = _collect(self._pm, registered)
            conflicts = self._conflicts(registered, contribution)
            if conflicts and strict:
                raise conflicts[0]
        except BaseException:
            self._pm.unregister(name=registered)
            raise
        for conflict in conflicts:
            self._report(registered, conflict)
        module = getattr(plugin, "__name__", type(plugin).__module__)
        self._info[registered] = info or PluginInfo(registered, module)
        self._contributions[registered] = contribution
        return registered

    def _conflicts(self, name: str, new: _Contribution) -> list[DuplicateAdapterError]:
        """What `new` claims that is taken; taken names go into ``new.refused``."""
        conflicts: list[DuplicateAdapterError] = []
        known = [(s, p) for p, c in self._contributions.items() for s in c.active_adapters()]
        for spec in new.adapters:
            owner = next((p for other, p in known if other.name == spec.name), None)
            if owner is not None:
                new.refused.add(spec.name)
                conflicts.append(
                    DuplicateAdapterError(
                        f"plugin {name!r} registers adapter {spec.name!r}, which plugin "
                        f"{owner!r} already registers; that one stays in force for every "
                        f"model (pick this one with adapter='{name}:{spec.name}')"
                    )
                )
                continue
            for other, plugin in known:
                shared = set(spec.architectures) & set(other.architectures)
                if shared and spec.priority == other.priority:
                    conflicts.append(
                        DuplicateAdapterError(
                            self._duplicate(sorted(shared)[0], other, spec, plugin, name)
                        )
                    )
        for kind, cls in new.components.items():
            for plugin, contribution in self._contributions.items():
                if contribution.active_components().get(kind, cls) is not cls:
                    new.refused.add(kind)
                    conflicts.append(
                        DuplicateAdapterError(
                            f"plugin {name!r} registers component kind {kind!r}, which plugin "
                            f"{plugin!r} already registers; that one stays in force for every "
                            f"model (a spec picks this one with kind = '{name}:{kind}')"
                        )
                    )
                    break
        return conflicts

    def _duplicate(
        self,
        architecture: str,
        first: AdapterSpec,
        second: AdapterSpec,
        first_plugin: str | None = None,
        second_plugin: str | None = None,
    ) -> str:
        a = first_plugin or self.adapter_source(first.name).name
        b = second_plugin or self.adapter_source(second.name).name
        return (
            f"adapters {first.name!r} (plugin {a!r}) and {second.name!r} (plugin {b!r}) both "
            f"claim {architecture} at priority {first.priority}; give one a higher priority "
            f"or choose with adapter=..."
        )

    def _unclaimed(self, architecture: str, model_type: str | None) -> str:
        specs = self.adapters()
        message = f"no adapter claims the architecture {architecture!r}."
        message += did_you_mean(architecture, [a for s in specs for a in s.architectures])
        same_type = [s.name for s in specs if model_type and model_type in s.model_types]
        if same_type:
            message += (
                f" Adapter {same_type[0]!r} handles other architectures of model_type "
                f"{model_type!r}: pass adapter={same_type[0]!r} to try it."
            )
        return message + f" Known adapters: {', '.join(sorted(s.name for s in specs))}"


def _check_hook_names(pm: pluggy.PluginManager, name: str) -> None:
    """A hookimpl whose name is no hookspec (``register_adapter``) is an error: pluggy
    would keep it and never call it."""
    plugin = pm.get_plugin(name)
    known = [n for n in vars(hookspecs) if hasattr(getattr(hookspecs, n), HOOKSPEC_MARK)]
    for caller in pm.get_hookcallers(plugin) or []:
        if caller.has_spec():
            continue
        if all(impl.optionalhook for impl in caller.get_hookimpls()):
            continue
        raise PluginLoadError(
            f"plugin {name!r} implements {caller.name!r}, which is no hook of "
            f"{hookspecs.PROJECT}.{did_you_mean(caller.name, known, n=1)} "
            f"Hooks: {', '.join(sorted(known))}"
        )


def _collect(pm: pluggy.PluginManager, name: str) -> _Contribution:
    adapters: list[AdapterSpec] = []
    components: dict[str, type[GeneralizedComponent]] = {}
    for impl in pm.hook.register_adapters.get_hookimpls():
        if impl.plugin_name == name:
            for spec in _returned_specs(impl, name):
                adapters.append(_validated(spec, "register_adapters", name))
    for impl in pm.hook.register_components.get_hookimpls():
        if impl.plugin_name == name:
            for kind, cls in _returned_kinds(impl, name).items():
                if not (isinstance(cls, type) and issubclass(cls, GeneralizedComponent)):
                    raise PluginLoadError(
                        f"plugin {name!r} hook register_components: kind {kind!r} maps to "
                        f"{cls!r}, which is not a GeneralizedComponent subclass"
                    )
                components[kind] = cls
    return _Contribution(adapters, components)


def _validated(spec: object, hook: str, plugin: str) -> AdapterSpec:
    if isinstance(spec, AdapterSpec):
        return spec
    if isinstance(spec, dict):
        try:
            return AdapterSpec.model_validate(spec)
        except Exception as exc:
            raise PluginLoadError(f"plugin {plugin!r} hook {hook}: {exc}") from exc
    raise PluginLoadError(
        f"plugin {plugin!r} hook {hook} returned {type(spec).__name__}; "
        "expected AdapterSpec objects (or dicts that validate as one)"
    )


def _call(impl: Any, hook: str, **kwargs: Any) -> Any:
    """Call one plugin's hook; what it raises becomes a PluginLoadError naming both."""
    try:
        return impl.function(**kwargs)
    except PluginLoadError:
        raise
    except ISOLATED as exc:
        raise _raised(impl.plugin_name, hook, exc) from exc


def _raised(plugin: str, hook: str, exc: BaseException) -> PluginLoadError:
    what = f"SystemExit({exc.code!r})" if isinstance(exc, SystemExit) else type(exc).__name__
    return PluginLoadError(f"plugin {plugin!r} hook {hook} raised {what}: {exc}")


def _returned_specs(impl: Any, plugin: str) -> list[object]:
    """What `register_adapters` returned, as a list: None, or an iterable of specs."""
    result = _call(impl, "register_adapters")
    if result is None:
        return []
    single = isinstance(result, AdapterSpec | Mapping)
    if single or isinstance(result, str | bytes) or not isinstance(result, Iterable):
        fix = " (one spec: return [spec])" if single else ""
        raise PluginLoadError(
            f"plugin {plugin!r} hook register_adapters returned {type(result).__name__}; "
            f"expected a list of AdapterSpec objects (or dicts that validate as one){fix}"
        )
    try:
        return list(result)
    except ISOLATED as exc:  # a generator that raises
        raise _raised(plugin, "register_adapters", exc) from exc


def _returned_kinds(impl: Any, plugin: str) -> dict[str, object]:
    """What `register_components` returned, as a dict: None, or a mapping kind -> class."""
    result = _call(impl, "register_components")
    if result is None:
        return {}
    if not isinstance(result, Mapping):
        raise PluginLoadError(
            f"plugin {plugin!r} hook register_components returned {type(result).__name__}; "
            "expected a mapping of kind name -> GeneralizedComponent subclass, e.g. "
            "{'my_attention': MyAttentionBridge}"
        )
    kinds = dict(result)
    for kind in kinds:
        if not isinstance(kind, str) or not kind:
            raise PluginLoadError(
                f"plugin {plugin!r} hook register_components: kind {kind!r} is not a name; "
                "expected a mapping of kind name (a non-empty str) -> GeneralizedComponent "
                "subclass"
            )
    return kinds


def _own_version() -> str | None:
    try:
        return version("transformer-bridge")
    except PackageNotFoundError:
        return None


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry (created on first call; plugins load on first query)."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = Registry()
    return _REGISTRY


def reset_registry() -> None:
    """Drop the process-wide registry; the next `get_registry()` loads plugins afresh."""
    global _REGISTRY
    _REGISTRY = None


__all__ = ["DEFAULT_PLUGINS", "PluginInfo", "Registry", "get_registry", "reset_registry"]
