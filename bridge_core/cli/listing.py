"""``transformer-bridge architectures`` and ``plugins``: what the registry has loaded."""

from __future__ import annotations

import argparse
import warnings

from bridge_core.cli.app import UsageError
from bridge_core.cli.render import Output
from bridge_core.errors import did_you_mean
from bridge_core.registry import get_registry
from bridge_core.spec import AdapterSpec


def setup_architectures(parser: argparse.ArgumentParser) -> None:
    """``architectures [ADAPTER ...] [--verify]``."""
    parser.add_argument("adapters", nargs="*", metavar="ADAPTER", help="only these adapters")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="verify each listed adapter's tiny models now instead of reading the record",
    )
    parser.set_defaults(handler=cmd_architectures)


def setup_plugins(parser: argparse.ArgumentParser) -> None:
    """``plugins`` takes no arguments."""
    parser.set_defaults(handler=cmd_plugins)


def cmd_architectures(args: argparse.Namespace, out: Output) -> int:
    """Each adapter: its architectures, task, source (built-in spec or plugin, with the
    distribution) and whether verify passes on its tiny models.

    The verify column reads the record the plugins ship (`bridge_core.support`): ``passed``,
    ``FAILED``, or ``stale`` when the spec changed since; ``--verify`` runs verify on the
    recorded tiny models now, and then exits 1 when one of them does not pass.
    """
    from bridge_core.support import adapter_rows, family_status, plugin_records, verify_family

    registry = get_registry()
    records = plugin_records(registry)
    rows = adapter_rows(registry, records)
    if args.adapters:
        known = [row.spec.name for row in rows]
        for name in args.adapters:
            if name not in known:  # a usage error: exit 2
                raise UsageError(
                    f"no adapter is named {name!r}.{did_you_mean(name, known)} "
                    f"Known adapters: {', '.join(known)}"
                )
        rows = [row for row in rows if row.spec.name in args.adapters]
    table, failed = [], False
    for row in rows:
        statuses = row.statuses
        if args.verify:
            for family, record in row.families.items():
                out.line(f"verifying {family} ({record.builder}) ...")
                statuses[family] = family_status(verify_family(record.builder), row.spec)
            failed = failed or any(not s.startswith("passed") for s in statuses.values())
        verified = "; ".join(f"{f}: {s}" for f, s in statuses.items()) or row.verified
        table.append(
            (
                row.spec.name,
                ", ".join(row.spec.architectures),
                _task(row.spec),
                f"{row.source} ({row.distribution})",
                verified,
            )
        )
    out.table("Adapters", ("adapter", "architectures", "task", "source", "verify"), table)
    return int(failed)


def _task(spec: AdapterSpec) -> str:
    from bridge_core.loading import task_for

    return task_for(spec) or "-"


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
