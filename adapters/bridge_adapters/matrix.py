"""Regenerate the verify record of the built-in families and the support matrix.

``python -m bridge_adapters.matrix --update`` verifies the tiny model of every family in
`bridge_adapters.families.FAMILIES` (a few minutes), writes the record shipped with this
package (``verified.json``, read by ``transformer-bridge architectures``) and regenerates
docs/architectures.md from the registry (every adapter of every installed plugin) and the
record. ``--docs-only`` regenerates the page from the record as it is; ``--check`` only says
whether both are current (exit 1 if not). The test suite runs the same comparisons.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bridge_adapters.families import FAMILIES
from bridge_core.registry import Registry
from bridge_core.support import (
    RECORD_FILE,
    Records,
    adapter_rows,
    builder_path,
    environment,
    matrix_markdown,
    verify_family,
)

RECORD = Path(__file__).with_name(RECORD_FILE)
"""The built-in families' verify record."""

DOCS = Path("docs") / "architectures.md"
COMMAND = "python -m bridge_adapters.matrix --update"


def builders() -> dict[str, str]:
    """``module:function`` of each family's builder, by family name."""
    return {name: builder_path(build) for name, build in FAMILIES.items()}


def record_all(names: list[str] | None = None) -> Records:
    """Verify the families named (all if None), keeping the others' records as they are."""
    records = Records.read(RECORD) if names else Records()
    known = builders()
    for name in names or sorted(known):
        print(f"verifying {name} ...", file=sys.stderr, flush=True)
        records.families[name] = verify_family(known[name])
    records.families = {k: v for k, v in records.families.items() if k in known}
    records.environment = environment()
    return records


def render(records: Records, registry: Registry | None = None) -> str:
    """docs/architectures.md for `records` and every adapter of a freshly loaded registry."""
    registry = registry or Registry(autoload=True)
    return matrix_markdown(adapter_rows(registry, records.families), records, COMMAND)


def main(argv: list[str] | None = None) -> int:
    """Update or check the record and the page (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m bridge_adapters.matrix")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--update", nargs="*", metavar="FAMILY", help="verify (these) families")
    mode.add_argument("--docs-only", action="store_true", help="regenerate the page only")
    mode.add_argument("--check", action="store_true", help="exit 1 unless both are current")
    parser.add_argument("--docs", type=Path, default=DOCS, help=f"the page (default {DOCS})")
    args = parser.parse_args(argv)
    if args.check:
        stale = args.docs.read_text(encoding="utf-8") != render(Records.read(RECORD))
        print(f"{args.docs} is {'stale: run ' + COMMAND if stale else 'current'}")
        return int(stale)
    records = Records.read(RECORD) if args.docs_only else record_all(args.update or None)
    if not args.docs_only:
        RECORD.write_text(records.to_json(), encoding="utf-8")
        print(f"wrote {RECORD}", file=sys.stderr)
    args.docs.write_text(render(records), encoding="utf-8")
    print(f"wrote {args.docs}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
