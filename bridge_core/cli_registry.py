"""``transformer-bridge architectures``, ``plugins`` and ``spec show|validate``: the registry."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from bridge_core.cli import CommandFailed, UsageError
from bridge_core.cli_render import Output
from bridge_core.errors import AdapterNotFoundError
from bridge_core.registry import get_registry


def cmd_architectures(args: argparse.Namespace, out: Output) -> int:
    """Each adapter: its architectures and the plugin (distribution, version) it comes from."""
    registry = get_registry()
    rows = []
    for spec in sorted(registry.adapters(), key=lambda s: s.name):
        source = registry.adapter_source(spec.name)
        dist = f"{source.distribution or '-'} {source.version or ''}".strip()
        rows.append((spec.name, ", ".join(spec.architectures), source.name, dist))
    out.table("Adapters", ("adapter", "architectures", "plugin", "distribution"), rows)
    return 0


def cmd_plugins(args: argparse.Namespace, out: Output) -> int:
    """Loaded plugins, component kinds, and load errors (exit 1 if a plugin failed)."""
    registry = get_registry()
    with warnings.catch_warnings():  # load errors are listed below, not warned about
        warnings.simplefilter("ignore", RuntimeWarning)
        plugins, errors = registry.plugins(), registry.plugin_errors
    adapters: dict[str, list[str]] = {}
    for spec in registry.adapters():
        adapters.setdefault(registry.adapter_source(spec.name).name, []).append(spec.name)
    rows = [
        (
            p.name,
            p.module,
            p.distribution or "-",
            p.version or "-",
            ", ".join(adapters.get(p.name, [])),
        )
        for p in plugins
    ]
    out.table("Plugins", ("plugin", "module", "distribution", "version", "adapters"), rows)
    kinds = registry.component_kinds()
    out.table(
        "Component kinds",
        ("kind", "class"),
        [(kind, f"{cls.__module__}.{cls.__qualname__}") for kind, cls in sorted(kinds.items())],
    )
    if errors:
        out.table(
            "Load errors", ("plugin", "error"), [(p, str(e)) for p, e in sorted(errors.items())]
        )
        return 1
    out.line("No plugin failed to load.", style="green")
    return 0


def cmd_spec_show(args: argparse.Namespace, out: Output) -> int:
    """Print a registered adapter's spec as TOML or JSON (raw, for redirecting to a file)."""
    try:
        spec = get_registry().adapter(args.name)
    except AdapterNotFoundError as exc:
        raise UsageError(str(exc)) from exc
    text = spec.to_toml() if args.format == "toml" else spec.to_json() + "\n"
    sys.stdout.write(text)  # raw, so that it can be redirected to a file
    return 0


def cmd_spec_validate(args: argparse.Namespace, out: Output) -> int:
    """Validate a spec file: schema, then component kinds against the registry."""
    from bridge_core.registry import get_registry
    from bridge_core.spec import AdapterSpec, ComponentSpec

    path: Path = args.file
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise UsageError(f"spec file {str(path)!r} {what}; expected a .toml or .json adapter spec")
    spec = AdapterSpec.from_file(path)  # SpecError: invalid, with the key (exit 1)
    registry = get_registry()
    kinds = registry.component_kinds()

    def check(components: dict[str, ComponentSpec], where: str) -> None:
        for key, component in components.items():
            if component.kind not in kinds:
                try:
                    registry.component_class(component.kind)
                except AdapterNotFoundError as exc:
                    raise CommandFailed(f"{path}: {where}.{key}.kind: {exc}") from exc
            check(component.submodules, f"{where}.{key}.submodules")

    check(spec.components, "components")
    out.line(
        f"{path}: valid adapter spec {spec.name!r} for {', '.join(spec.architectures)} "
        f"({len(spec.components)} top-level components, {len(spec.hook_aliases)} hook aliases)",
        style="green",
    )
    for other in registry.adapters():
        shared = sorted(set(other.architectures) & set(spec.architectures))
        if shared and other.name != spec.name and other.priority == spec.priority:
            out.line(
                f"note: adapter {other.name!r} also claims {', '.join(shared)} at priority "
                f"{other.priority}; registering both would conflict (set a different priority)",
                style="yellow",
            )
    return 0
