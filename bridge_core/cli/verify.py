"""``transformer-bridge verify MODEL [--adapter SPEC] [--json]``: check every hook point."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from bridge_core.cli.app import CommandFailed
from bridge_core.cli.model import boot, model_options
from bridge_core.cli.render import Output

if TYPE_CHECKING:
    from bridge_core.verify import VerifyReport

COLUMNS = ("fires", "shape", "causal", "heads", "pattern", "residual")


def setup(parser: argparse.ArgumentParser) -> None:
    """The model options and ``--json``."""
    model_options(parser, image_default=True)
    parser.add_argument(
        "--json", action="store_true", help="print the report as JSON (every check's detail)"
    )
    parser.set_defaults(handler=cmd_verify)


def cmd_verify(args: argparse.Namespace, out: Output) -> int:
    """Verify ``args.model`` with its adapter: a table per hook point, the summary last.

    Exit status 1 when any check fails (the summary names the check and the hook point).
    """
    bridge = boot(args)
    report = bridge.verify()
    if args.json:
        sys.stdout.write(report.to_json() + "\n")
    else:
        show(report, out)
    if not report.ok:
        raise CommandFailed(report.summary())
    return 0


def show(report: VerifyReport, out: Output) -> None:
    """The per-hook-point table, the model-wide checks, the failures' details, the summary."""
    table = report.by_hook()
    rows = [
        [hook, *(_cell(checks.get(c)) for c in COLUMNS)]
        for hook, checks in table.items()
        if hook and not hook.endswith("(decompose_resid)")
    ]
    out.table(f"verify {report.adapter} ({report.model})", ("hook point", *COLUMNS), rows)
    model_wide = [r for r in report.results if not r.hook or r.hook.endswith("(decompose_resid)")]
    out.table(
        "whole model", ("check", "where", "result", "detail"),
        [(r.check, r.hook or "-", r.status, r.detail) for r in model_wide],
    )  # fmt: skip
    for failure in report.failures():
        out.line(f"FAIL {failure.check} {failure.hook or '(model)'}: {failure.detail}")
    if report.ok:
        out.line(report.summary())


def _cell(result: object) -> str:
    status = getattr(result, "status", None)
    return "-" if status is None else str(status)
