"""What is supported, and how we know: verify records of tiny models, and the support matrix.

A *family* is a tiny random-weight model of one architecture, built by a function
``(model, tokenizer)`` (``bridge_adapters.families``). Verifying every family is the honest
answer to "does this adapter work?", but takes minutes, so its outcome is *recorded*: a
plugin package may ship ``verified.json`` (`RECORD_FILE`) next to its plugin module, holding
per family the builder, the adapter, a fingerprint of the adapter's spec, the verify outcome
and the hook names the bridge had. Readers compare the fingerprint with the spec registered
now, so a spec changed since its family was verified shows as *stale*, never as passing; the
test suite verifies every family and fails when the record differs from what it found, and
the generated support matrix (docs/architectures.md) is checked against a regeneration.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge_core.spec import AdapterSpec

if TYPE_CHECKING:
    from bridge_core.bridge import TransformerBridge
    from bridge_core.registry import Registry
    from bridge_core.verify import VerifyReport

RECORD_FILE = "verified.json"
"""The name of a plugin package's verify record."""


def fingerprint(spec: AdapterSpec) -> str:
    """A short hash of what the spec says (its JSON; comments and formatting do not count)."""
    text = json.dumps(spec.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def environment() -> dict[str, str]:
    """The versions a record was made with (the suite checks they are the installed ones)."""
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


@dataclass(frozen=True)
class FamilyRecord:
    """The verify outcome of one family's tiny model."""

    builder: str  # "module:function"
    adapter: str
    architecture: str
    spec: str  # fingerprint of the adapter's spec
    ok: bool
    failed: list[str] = field(default_factory=list)  # "check hook" of each failure
    skipped: dict[str, str] = field(default_factory=dict)  # check -> the adapter's reason
    hooks: list[str] = field(default_factory=list)  # hook names, layers as {i}

    @classmethod
    def of(cls, builder: str, bridge: TransformerBridge, report: VerifyReport) -> FamilyRecord:
        """The record of `report`, a verify run of `bridge` (built by `builder`)."""
        skipped = {r.check: r.detail for r in report.results if r.ok is None and not r.hook}
        return cls(
            builder=builder,
            adapter=bridge.adapter.name,
            architecture=type(bridge.original_model).__name__,
            spec=fingerprint(bridge.adapter),
            ok=report.ok,
            failed=[f"{r.check} {r.hook or '(model)'}" for r in report.failures()],
            skipped=skipped,
            hooks=hook_templates(bridge.hook_names()),
        )


def hook_templates(names: Iterable[str]) -> list[str]:
    """Hook names with layer indices as ``{i}``, each once, in first-seen order."""
    return list(dict.fromkeys(re.sub(r"\.\d+\.", ".{i}.", name) for name in names))


def builder_path(build: Any) -> str:
    """``module:function`` of a builder (what `verify_family` imports)."""
    return f"{build.__module__}:{build.__qualname__}"


def verify_family(builder: str) -> FamilyRecord:
    """Build the family's tiny model with `builder` (``module:function``), wrap and verify it."""
    from bridge_core.bridge import TransformerBridge

    module, _, name = builder.partition(":")
    model, tokenizer = getattr(importlib.import_module(module), name)()
    bridge = TransformerBridge.wrap(model, tokenizer=tokenizer)
    return FamilyRecord.of(builder, bridge, bridge.verify())


@dataclass
class Records:
    """A verify record: the environment it was made in, and each family's outcome."""

    environment: dict[str, str] = field(default_factory=dict)
    families: dict[str, FamilyRecord] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path | Any) -> Records:
        """Read a record file (a missing file is an empty record)."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls()
        families = {k: FamilyRecord(**v) for k, v in data.get("families", {}).items()}
        return cls(dict(data.get("environment", {})), families)

    def to_json(self) -> str:
        """The record as stable JSON (sorted, one family after the other)."""
        families = {k: asdict(v) for k, v in sorted(self.families.items())}
        data = {"environment": self.environment, "families": families}
        return json.dumps(data, indent=1, sort_keys=True) + "\n"


def plugin_records(registry: Registry) -> dict[str, FamilyRecord]:
    """Every family record the loaded plugins ship (`RECORD_FILE` in each plugin's package)."""
    found: dict[str, FamilyRecord] = {}
    for plugin in registry.plugins():
        package = plugin.module.rpartition(".")[0] or plugin.module
        try:
            resource = files(package).joinpath(RECORD_FILE)
        except (ModuleNotFoundError, TypeError):
            continue
        if resource.is_file():
            found.update(Records.read(resource).families)
    return found


# -- status and the support matrix ----------------------------------------------------------


def family_status(record: FamilyRecord, spec: AdapterSpec | None) -> str:
    """``passed``, ``FAILED: <checks>``, or ``stale`` when the spec changed since the record."""
    if spec is None:
        return f"stale: adapter {record.adapter!r} is no longer registered"
    if record.spec != fingerprint(spec):
        return "stale: the spec changed since it was verified"
    if not record.ok:
        return (
            "FAILED: " + ", ".join(record.failed[:3]) + (" ..." if len(record.failed) > 3 else "")
        )
    return "passed" + (f" ({', '.join(sorted(record.skipped))} skipped)" if record.skipped else "")


@dataclass(frozen=True)
class AdapterRow:
    """One adapter of the support matrix."""

    spec: AdapterSpec
    source: str  # "built-in spec" or "plugin <name>", and any Python kinds it needs
    distribution: str  # "<distribution> <version>"
    families: dict[str, FamilyRecord]

    @property
    def statuses(self) -> dict[str, str]:
        """Each family's status."""
        return {name: family_status(r, self.spec) for name, r in self.families.items()}

    @property
    def verified(self) -> str:
        """One cell: each family and its status, or why there is none."""
        if not self.families:
            return "no tiny model recorded"
        return "; ".join(f"{name}: {status}" for name, status in self.statuses.items())

    def caveats(self) -> list[str]:
        """What the spec says verify cannot check, and what cannot reach the outputs."""
        notes = [f"verify skips {check}: {why}" for check, why in self.spec.verify.skip.items()]
        if self.spec.verify.unreachable:
            patterns = ", ".join(f"`{p}`" for p in self.spec.verify.unreachable)
            notes.append(f"edits of {patterns} cannot reach the outputs")
        return notes


def adapter_rows(registry: Registry, records: Mapping[str, FamilyRecord]) -> list[AdapterRow]:
    """Every registered adapter, with its source and its families' records, by name."""
    from bridge_core.registry import DEFAULT_PLUGINS

    rows = []
    for spec in sorted(registry.adapters(), key=lambda s: s.name):
        plugin = registry.adapter_source(spec.name)
        source = "built-in spec" if plugin.name in DEFAULT_PLUGINS else f"plugin {plugin.name}"
        code = _python_kinds(spec, registry)
        if code:  # the spec needs component kinds written in Python (a kernel of their own)
            source += f" + Python kind {', '.join(code)}"
        dist = f"{plugin.distribution or '-'} {plugin.version or ''}".strip()
        mine = {k: r for k, r in sorted(records.items()) if r.adapter == spec.name}
        rows.append(AdapterRow(spec, source, dist, mine))
    return rows


def _python_kinds(spec: AdapterSpec, registry: Registry) -> list[str]:
    """The component kinds a spec uses that are no core kind (`bridge_core.components`)."""
    kinds = registry.component_kinds()
    used: list[str] = []
    todo = list(spec.components.values())
    while todo:
        component = todo.pop(0)
        todo.extend(component.submodules.values())
        cls = kinds.get(component.kind)
        core = cls is not None and cls.__module__.startswith("bridge_core.components")
        if not core and component.kind not in used:
            used.append(component.kind)
    return used


def matrix_markdown(rows: list[AdapterRow], records: Records, command: str) -> str:
    """docs/architectures.md: the table, then each adapter's families and hook names."""
    lines = [
        "# Supported architectures",
        "",
        f"<!-- generated by `{command}`; tests/test_architectures.py checks it is current -->",
        "",
        "Every adapter the registry holds, where it comes from, and whether `verify` passes on",
        "a tiny random-weight model of each family (`bridge_adapters.families`). The verify",
        "outcomes are recorded by running every family (the record names the spec it verified,",
        "so a changed spec shows as stale, never as passing); the test suite verifies every",
        "family again and fails when the record differs. Environment of the record: "
        + ", ".join(f"{k} {v}" for k, v in sorted(records.environment.items()))
        + ".",
        "",
        "| adapter | architectures | task | source | example checkpoints | verify (tiny models) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        spec = row.spec
        examples = ", ".join(f"`{e}`" for e in spec.examples) or "-"
        lines.append(
            f"| [{spec.name}](#{spec.name}) | "
            f"{', '.join(f'`{a}`' for a in spec.architectures)} | {_task(spec)} | "
            f"{row.source} ({row.distribution}) | {examples} | {_cell(row.verified)} |"
        )
    for row in rows:
        lines += ["", f"## {row.spec.name}", "", row.spec.description or "-", ""]
        lines += [f"- caveat: {note}" for note in row.caveats()]
        if not row.families:
            lines.append(
                "- no tiny model recorded here: `transformer-bridge verify MODEL` checks one"
            )
        for name, record in row.families.items():
            lines.append(
                f"- `{name}` ({record.architecture}, `{record.builder}`): {row.statuses[name]}"
            )
        if row.families:
            hooks = hook_templates(h for r in row.families.values() for h in r.hooks)
            lines += ["", "Hook names (of its tiny models; `{i}` is the layer):", ""]
            lines.append(_hook_block(hooks))
    return "\n".join(lines) + "\n"


def _task(spec: AdapterSpec) -> str:
    from bridge_core.loading import task_for

    return task_for(spec) or "-"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _hook_block(hooks: list[str]) -> str:
    """Hook names grouped by the component that owns them, one line per component."""
    groups: dict[str, list[str]] = {}
    for name in hooks:
        owner, _, point = name.rpartition(".")
        groups.setdefault(owner, []).append(point)
    body = [f"{owner or '(top level)'}: {', '.join(points)}" for owner, points in groups.items()]
    return "```text\n" + "\n".join(body) + "\n```"
