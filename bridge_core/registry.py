"""The plugin registry: loads plugins (lazily) and answers typed questions about them.

Built-in plugins are registered through the same hooks as third-party ones; third-party
plugins come from the ``transformer_bridge`` entry-point group unless the environment
variable ``TRANSFORMER_BRIDGE_DISABLE_PLUGIN_AUTOLOAD`` is set. Nothing outside this
module calls ``pm.hook.*``.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True)
class PluginInfo:
    """A loaded plugin: its registered name, module, and distribution (if installed)."""

    name: str
    module: str
    distribution: str | None = None
    version: str | None = None


@dataclass(frozen=True)
class _Contribution:
    adapters: list[AdapterSpec]
    components: dict[str, type[GeneralizedComponent]]


class Registry:
    """Adapters and component kinds contributed by plugins."""

    def __init__(self, autoload: bool | None = None) -> None:
        """Create an empty registry; plugins load on first use.

        Args:
            autoload: load entry-point plugins; by default unless the environment
                variable ``TRANSFORMER_BRIDGE_DISABLE_PLUGIN_AUTOLOAD`` is set.
        """
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        if autoload is None:
            autoload = os.environ.get(AUTOLOAD_ENV, "").lower() in ("", "0", "false", "no")
        self._autoload = autoload
        self._loaded = False
        self._info: dict[str, PluginInfo] = {}
        self._contributions: dict[str, _Contribution] = {}
        self._errors: dict[str, BridgeError] = {}

    def register(self, plugin: object, name: str | None = None) -> str:
        """Register a plugin object or module in-process (notebooks, tests).

        Raises:
            PluginLoadError: the plugin returned something invalid; it is not registered.
            DuplicateAdapterError: it claims an architecture or kind already claimed at the
                same priority; it is not registered.
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
        """Plugins that failed to load or conflict, by name, with the original error."""
        self._ensure_loaded()
        return dict(self._errors)

    def plugins(self) -> list[PluginInfo]:
        """The loaded plugins, in load order."""
        self._ensure_loaded()
        return list(self._info.values())

    def adapters(self) -> list[AdapterSpec]:
        """Every registered adapter spec."""
        self._ensure_loaded()
        return [spec for c in self._contributions.values() for spec in c.adapters]

    def adapter_source(self, adapter_name: str) -> PluginInfo:
        """The plugin that contributed the adapter named `adapter_name`."""
        self._ensure_loaded()
        for plugin, contribution in self._contributions.items():
            if any(spec.name == adapter_name for spec in contribution.adapters):
                return self._info[plugin]
        raise AdapterNotFoundError(f"no adapter is named {adapter_name!r}")

    def adapter(self, name: str) -> AdapterSpec:
        """The adapter called `name`.

        Raises:
            AdapterNotFoundError: naming the known adapters, with a did-you-mean.
        """
        specs = {spec.name: spec for spec in self.adapters()}
        if name in specs:
            return specs[name]
        raise AdapterNotFoundError(
            f"no adapter is named {name!r}.{did_you_mean(name, specs)} "
            f"Known adapters: {', '.join(sorted(specs))}"
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

        Args:
            architecture: the model class name, when known (else ``architectures[0]``).
        """
        self._ensure_loaded()
        for impl in reversed(self._pm.hook.resolve_adapter.get_hookimpls()):  # pluggy's order
            spec = _call(impl, "resolve_adapter", hf_config=hf_config)
            if spec is not None:  # firstresult
                return self._validated(spec, "resolve_adapter", impl.plugin_name)
        architectures = getattr(hf_config, "architectures", None) or []
        model_type = getattr(hf_config, "model_type", None)
        architecture = architecture or (architectures[0] if architectures else None)
        if architecture is None:
            raise AdapterNotFoundError(
                f"the config (model_type {model_type!r}) names no architecture; pass adapter="
            )
        return self.adapter_for(architecture, model_type)

    def component_kinds(self) -> dict[str, type[GeneralizedComponent]]:
        """Every registered component kind."""
        self._ensure_loaded()
        return {k: v for c in self._contributions.values() for k, v in c.components.items()}

    def component_class(self, kind: str) -> type[GeneralizedComponent]:
        """The component class for `kind`; a KeyError-like error names the known kinds."""
        kinds = self.component_kinds()
        if kind in kinds:
            return kinds[kind]
        raise AdapterNotFoundError(
            f"unknown component kind {kind!r}.{did_you_mean(kind, kinds)} "
            f"Known kinds: {', '.join(sorted(kinds))}"
        )

    # -- loading ---------------------------------------------------------------------

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        version = _own_version()
        for module_name in DEFAULT_PLUGINS:
            info = PluginInfo(module_name, module_name, "transformer-bridge", version)
            self._add(importlib.import_module(module_name), module_name, info, strict=True)
        if self._autoload:
            self._load_entry_points()

    def _load_entry_points(self) -> None:
        for ep in entry_points(group=hookspecs.PROJECT):
            dist = ep.dist.name if ep.dist else None
            version = ep.dist.version if ep.dist else None
            try:
                plugin = ep.load()
                info = PluginInfo(ep.name, ep.value, dist, version)
                self._add(plugin, ep.name, info, strict=False)
            except Exception as exc:
                error = exc if isinstance(exc, PluginLoadError) else None
                if error is None:
                    what = f"{type(exc).__name__}: {exc}"
                    error = PluginLoadError(
                        f'Error importing plugin "{ep.name}" ({ep.value}): {what}'
                    )
                    error.__cause__ = exc
                self._report(ep.name, error)

    def _report(self, plugin: str, error: BridgeError) -> None:
        self._errors[plugin] = error
        warnings.warn(str(error), RuntimeWarning, stacklevel=3)

    def _add(
        self, plugin: object, name: str | None, info: PluginInfo | None = None, strict: bool = True
    ) -> str:
        """Register `plugin`; a conflict is raised if `strict`, else reported and kept."""
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
            contribution = self._collect(registered)
            self._check_conflicts(registered, contribution)
        except DuplicateAdapterError as conflict:
            if strict:
                self._pm.unregister(name=registered)
                raise
            self._report(registered, conflict)  # kept: looking the architecture up raises
        except BaseException:
            self._pm.unregister(name=registered)
            raise
        module = getattr(plugin, "__name__", type(plugin).__module__)
        self._info[registered] = info or PluginInfo(registered, module)
        self._contributions[registered] = contribution
        return registered

    def _collect(self, name: str) -> _Contribution:
        adapters: list[AdapterSpec] = []
        components: dict[str, type[GeneralizedComponent]] = {}
        for impl in self._pm.hook.register_adapters.get_hookimpls():
            if impl.plugin_name == name:
                for spec in _returned_specs(impl, name):
                    adapters.append(self._validated(spec, "register_adapters", name))
        for impl in self._pm.hook.register_components.get_hookimpls():
            if impl.plugin_name == name:
                for kind, cls in _returned_kinds(impl, name).items():
                    if not (isinstance(cls, type) and issubclass(cls, GeneralizedComponent)):
                        raise PluginLoadError(
                            f"plugin {name!r} hook register_components: kind {kind!r} maps to "
                            f"{cls!r}, which is not a GeneralizedComponent subclass"
                        )
                    components[kind] = cls
        return _Contribution(adapters, components)

    def _validated(self, spec: object, hook: str, plugin: str) -> AdapterSpec:
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

    def _check_conflicts(self, name: str, new: _Contribution) -> None:
        known = [(s, p) for p, c in self._contributions.items() for s in c.adapters]
        for spec in new.adapters:
            for other, plugin in known:
                if other.name == spec.name:
                    raise DuplicateAdapterError(
                        f"plugin {name!r} registers adapter {spec.name!r}, "
                        f"which plugin {plugin!r} already registers"
                    )
                shared = set(spec.architectures) & set(other.architectures)
                if shared and spec.priority == other.priority:
                    raise DuplicateAdapterError(
                        self._duplicate(sorted(shared)[0], other, spec, plugin, name)
                    )
        for kind, cls in new.components.items():
            for plugin, contribution in self._contributions.items():
                if contribution.components.get(kind, cls) is not cls:
                    raise DuplicateAdapterError(
                        f"plugin {name!r} registers component kind {kind!r}, "
                        f"which plugin {plugin!r} already registers"
                    )

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


def _call(impl: Any, hook: str, **kwargs: Any) -> Any:
    try:
        return impl.function(**kwargs)
    except BridgeError:
        raise
    except Exception as exc:
        raise PluginLoadError(
            f"plugin {impl.plugin_name!r} hook {hook} raised {type(exc).__name__}: {exc}"
        ) from exc


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
    except Exception as exc:  # a generator that raises
        raise PluginLoadError(
            f"plugin {plugin!r} hook register_adapters raised {type(exc).__name__}: {exc}"
        ) from exc


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
