"""The support matrix: docs/architectures.md and `transformer-bridge architectures` are current.

Whether verify passes is recorded in bridge_adapters/verified.json by
``python -m bridge_adapters.matrix --update``; tests/test_families.py checks each family's
record against a verify run. Here: the record covers exactly the families, names the specs
registered now, and the generated page equals a regeneration.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge_adapters.families import FAMILIES
from bridge_adapters.matrix import COMMAND, RECORD, render
from bridge_core import get_registry
from bridge_core.cli import main
from bridge_core.registry import Registry
from bridge_core.support import (
    Records,
    adapter_rows,
    builder_path,
    family_status,
    fingerprint,
)

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "architectures.md"


@pytest.fixture(scope="module")
def records() -> Records:
    return Records.read(RECORD)


def test_the_support_matrix_is_current(records: Records) -> None:
    assert PAGE.read_text(encoding="utf-8") == render(records), f"stale: run `{COMMAND}`"


def test_the_record_covers_every_family_with_the_registered_specs(records: Records) -> None:
    assert set(records.families) == set(FAMILIES), f"run `{COMMAND}`"
    registry = Registry(autoload=True)
    for name, record in records.families.items():
        assert record.builder == builder_path(FAMILIES[name])
        spec = registry.adapter(record.adapter)
        assert record.spec == fingerprint(spec), f"{name}: {spec.name}'s spec changed: {COMMAND}"


def test_every_registered_adapter_is_in_the_matrix() -> None:
    page = PAGE.read_text(encoding="utf-8")
    for spec in Registry(autoload=True).adapters():
        assert f"\n## {spec.name}\n" in page
        for architecture in spec.architectures:
            assert f"`{architecture}`" in page


def test_a_changed_spec_is_stale_never_passing(records: Records) -> None:
    record = records.families["t5"]
    spec = get_registry().adapter("t5")
    assert family_status(record, spec) == "passed (pattern skipped)"
    changed = spec.model_copy(update={"description": "T5, edited"})
    assert family_status(record, changed) == "stale: the spec changed since it was verified"


@pytest.mark.usefixtures("fresh_registry")
def test_an_adapter_registered_in_process_is_listed_without_a_record(records: Records) -> None:
    from types import SimpleNamespace

    from bridge_core import hookimpl

    mine = (
        get_registry()
        .adapter("gpt2")
        .model_copy(update={"name": "my_gpt2", "architectures": ["MyGPT2"]})
    )
    get_registry().register(SimpleNamespace(register_adapters=hookimpl(lambda: [mine])), "mine")
    rows = {row.spec.name: row for row in adapter_rows(get_registry(), records.families)}
    assert rows["my_gpt2"].source == "plugin mine"
    assert rows["my_gpt2"].verified == "no tiny model recorded"
    assert rows["t5"].verified == "t5: passed (pattern skipped); t5_gated: passed (pattern skipped)"


def test_cli_lists_source_task_and_recorded_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--plain", "architectures", "t5", "bert", "llava"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line}
    assert "seq2seq-lm" in rows["t5"] and "t5_gated: passed (pattern skipped)" in rows["t5"]
    assert "built-in spec (transformer-bridge" in rows["bert"]
    assert "BertModel: passed" in rows["bert"] and "bert: passed" in rows["bert"]
    assert "plugin llava + Python kind clip_vision_encoder" in rows["llava"]
    assert "(transformer-bridge-llava 0.1.0)" in rows["llava"]
    assert "no tiny model recorded" in rows["llava"]


def test_cli_verifies_live_on_request(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--plain", "architectures", "opt", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "verifying opt (bridge_adapters.families:tiny_opt)" in out
    assert "opt: passed" in out


def test_cli_names_an_unknown_adapter(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["architectures", "gpt-2"]) == 2
    assert "no adapter is named 'gpt-2'. Did you mean 'gpt2'" in capsys.readouterr().err
