"""The benchmark script keeps working: one round on the tiny model (no timed assertions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bridge_core import TransformerBridge

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_benchmark_runs_and_its_checks_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(ROOT))  # benchmarks/ is not an installed package
    from benchmarks.run import main

    threads = torch.get_num_threads()
    assert main(["--smoke", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads  # the smoke run uses one thread, then restores

    table = capsys.readouterr().out
    assert "| tiny | forward, no hooks |" in table
    assert "`import bridge_core` after torch + transformers" in table
    result = json.loads((tmp_path / "latest.json").read_text())
    tiny = result["models"]["tiny"]
    assert tiny["checks"]["forward_bitwise_equal"]
    assert all(tiny["checks"].values()), tiny["checks"]
    for variant in ("hf_forward", "bridge_forward", "bridge_cache_all", "bridge_boot"):
        assert tiny["timings"][variant]["median_s"] > 0
    assert tiny["cache"]["unique_bytes"] <= tiny["cache"]["bytes_if_aliases_stored_separately"]
    assert tiny["memory"]["bridge_cache_all"]["peak_bytes"] >= 0
    assert len(result["process"]["import_s"]) == 1


def test_phases_script_runs_and_reports_every_kind_of_point(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.phases import main

    assert main(["--model", "tiny", "--rounds", "1"]) == 0
    table = capsys.readouterr().out
    for row in (
        "| attach + remove every point | 274 |",
        "| run_with_hooks, every hook_scale | 25 |",
        "| HF forward + the taps' PyTorch hooks, no-op | 224 |",
        "run_with_cache, every point, over the HF forward: ",
    ):
        assert row in table, table


def test_phases_with_eager_attention_adds_hf_outputs_and_the_floor_of_keeping(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import phases

    assert phases.main(["--model", "tiny", "--rounds", "1", "--attn", "eager"]) == 0
    table = capsys.readouterr().out
    over = "over the HF forward, hidden states and attentions: "
    for row in (
        f"| {phases.HF_OUTPUTS} |",
        f"| {phases.KEEPING} |",
        f"{phases.KEEPING}, {over}",
        f"| {phases.DROPPING} |",
        "keeping the cache's other tensors (the two rows apart): ",
    ):
        assert row in table, table


def test_the_floor_of_keeping_writes_what_a_cache_keeps_beyond_hf_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import models, phases

    case = models.load(models.build("tiny", tmp_path).directory, attn_implementation="eager")
    bridge = TransformerBridge.wrap(case.model, tokenizer=case.tokenizer)
    with torch.no_grad():
        kept = phases.kept_beyond_outputs(bridge, case.model, case.inputs)
        _, cache = bridge.run_with_cache(**case.inputs)
        outputs = case.model(**case.inputs, output_hidden_states=True, output_attentions=True)
        written = phases.keeping(case.model, case.inputs, kept)()[1]
        assert phases.keeping(case.model, case.inputs, kept, keep=False)()[1] == []
    cached = phases._storage_sizes(cache.values())
    returned = phases._storage_sizes([*outputs.hidden_states, *outputs.attentions])
    assert len(kept) == len(cached) - len(returned) > 0
    assert sum(kept) == sum(cached) - sum(returned)
    assert [t.numel() for t in written] == kept and all(bool((t == 1).all()) for t in written)


def test_instruction_count_workers_run_every_variant_and_the_summary_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `python -m benchmarks.instructions` runs under valgrind, without valgrind (not
    installed in CI): each variant's worker, and the reading of cachegrind's summary."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import instructions, models

    with models.quiet_transformers():
        case = models.build("tiny", tmp_path)
    threads = torch.get_num_threads()
    for variant in instructions.VARIANTS:
        instructions.worker(case.directory, "eager", variant, 1)
    assert torch.get_num_threads() == threads
    assert instructions.refs("==12== \n==12== I   refs:      9,120,182,207\n") == 9120182207
    with pytest.raises(RuntimeError, match="no instruction count"):
        instructions.refs("valgrind: command not found")
    table = instructions.table(
        {"hf_outputs": 2e6, "run_with_cache": 3e6, "from_pretrained": 40e6, "boot": 42e6}
    )
    assert "| hf_outputs | 2.00 M |  |" in table
    assert "| run_with_cache | 3.00 M | 1.500x hf_outputs |" in table
    assert "| boot | 42.00 M | 1.050x from_pretrained |" in table
