"""``transformer-bridge architectures`` and ``plugins``: what the registry has loaded."""

from __future__ import annotations

import argparse
import warnings

from bridge_core.cli.render import Output
from bridge_core.registry import get_registry


def setup_architectures(parser: argparse.ArgumentParser) -> None:
    """``architectures`` takes no arguments."""
    parser.set_defaults(handler=cmd_architectures)


def setup_plugins(parser: argparse.ArgumentParser) -> None:
    """``plugins`` takes no arguments."""
    parser.set_defaults(handler=cmd_plugins)


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
