"""``transformer-bridge spec show NAME`` and ``spec validate FILE``: adapter specs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bridge_core.cli.app import UsageError, add_command
from bridge_core.cli.render import Output
from bridge_core.errors import AdapterNotFoundError, SpecError
from bridge_core.registry import get_registry


def setup(parser: argparse.ArgumentParser) -> None:
    """The actions ``show NAME [--format toml|json]`` and ``validate FILE``."""
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = add_command(actions, "show", "print a registered adapter's spec")
    show.add_argument("name", metavar="NAME", help="adapter name (see `architectures`)")
    show.add_argument("--format", choices=("toml", "json"), default="toml")
    show.set_defaults(handler=cmd_spec_show)
    validate = add_command(actions, "validate", "check a TOML/JSON spec file")
    validate.add_argument("file", metavar="FILE", type=Path, help="a .toml or .json spec")
    validate.set_defaults(handler=cmd_spec_validate)


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
    """Validate a spec file with every check `wrap` makes that needs no model (a SpecError
    naming the file or the key exits 1)."""
    from bridge_core.assembly import check_spec
    from bridge_core.bridge import RESERVED_NAMES
    from bridge_core.spec import AdapterSpec

    path: Path = args.file
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise UsageError(f"spec file {str(path)!r} {what}; expected a .toml or .json adapter spec")
    spec = AdapterSpec.from_file(path)
    registry = get_registry()
    try:
        check_spec(spec, registry, RESERVED_NAMES)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from exc
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
