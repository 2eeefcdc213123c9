"""Harvesting activations over a dataset: what a researcher reads back equals single runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from bridge_core import HookNameError, InputError, TransformerBridge
from bridge_core.harvest import HarvestReader, Progress, harvest
from bridge_core.harvest_run import World

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world!",
    "Paris is the capital of France, Rome is the capital of Italy.",
    "One, two, three.",
    "The cat sat at the window and watched the boats go by.",
    "What color is the sky?",
    "A spider has eight legs.",
]
HOOKS = ["blocks.1.hook_resid_pre", "blocks.0.attn.hook_z"]


def rows() -> list[dict[str, Any]]:
    return [{"id": f"ex-{i}", "text": text} for i, text in enumerate(TEXTS)]


def write_jsonl(path: Path, data: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in data), encoding="utf-8")
    return path


def single_run(bridge: TransformerBridge, text: str, hook: str) -> torch.Tensor:
    with torch.no_grad():
        _, cache = bridge.run_with_cache(text, names_filter=hook)
    return cache[hook][0]


@pytest.mark.parametrize("name", ["gpt2_bridge", "llama_bridge"])
def test_rows_equal_single_runs_of_each_example(
    name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    bridge: TransformerBridge = request.getfixturevalue(name)
    reader = harvest(bridge, rows(), HOOKS, tmp_path, batch_size=3, shard_size=4, progress=False)
    assert reader.index.ids == [row["id"] for row in rows()]
    for hook in HOOKS:
        activations = reader[hook]
        n_tokens = sum(len(bridge.to_tokens(t)[0]) for t in TEXTS)
        assert activations.shape[0] == n_tokens == len(reader.index.position)
        for row in rows():
            expected = single_run(bridge, row["text"], hook)
            got = activations[reader.index.rows(row["id"])]
            # left padding with position ids from the mask: the same numbers up to rounding
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            assert reader.index.positions(row["id"]).tolist() == list(range(len(expected)))


def test_reader_round_trip_and_row_indexing(gpt2_bridge: TransformerBridge, tmp_path: Path) -> None:
    harvest(gpt2_bridge, rows(), HOOKS, tmp_path, batch_size=2, shard_size=3, progress=False)
    reader = HarvestReader(tmp_path)  # a fresh reader of the folder
    acts = reader["blocks.1.hook_in"]  # canonical and alias name alike
    assert len(acts.shards) == 3 and reader.hooks == ["blocks.1.hook_in", "blocks.0.attn.hook_z"]
    full = acts.tensor()
    assert full.shape == acts.shape and torch.equal(full, torch.cat(list(acts.shards)))
    assert torch.equal(acts[-1], full[-1]) and torch.equal(acts[3:70], full[3:70])
    picks = torch.tensor([0, len(full) - 1, 17, 17, 40])
    assert torch.equal(acts[picks], full[picks]) and torch.equal(acts[[5, 2]], full[[5, 2]])
    mask = full[:, 0] > 0
    assert torch.equal(acts[mask], full[mask])
    assert reader["blocks.0.attn.hook_z"].shape[1:] == (4, 16)  # [rows, head, d_head]
    example = reader.index.example.tensor()
    assert example.tolist() == sorted(example.tolist())  # dataset order
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["hooks"]["blocks.1.hook_in"] == {"dtype": "float32", "shape": [64]}
    assert index["aliases"] == {"blocks.1.hook_resid_pre": "blocks.1.hook_in"}
    with pytest.raises(HookNameError, match="Did you mean"):
        reader["blocks.1.hook_resid_prev"]
    with pytest.raises(InputError, match="Did you mean 'ex-1'"):
        reader.index.rows("ex_1")


def test_positions_last_text_and_a_mask(gpt2_bridge: TransformerBridge, tmp_path: Path) -> None:
    hook = "blocks.1.hook_resid_post"
    every = harvest(gpt2_bridge, rows(), hook, tmp_path / "all", batch_size=4, progress=False)
    last = harvest(
        gpt2_bridge, rows(), hook, tmp_path / "last", batch_size=4, positions="last", progress=False
    )
    for i in range(len(TEXTS)):
        whole = every.index.rows_at(i)
        assert torch.equal(last[hook][i], every[hook][whole.stop - 1])
        assert last.index.position[i] == whole.stop - whole.start - 1

    def even(inputs: Any) -> torch.Tensor:
        return inputs["input_ids"] % 2 == 0

    chosen = harvest(
        gpt2_bridge, rows(), hook, tmp_path / "mask", batch_size=4, positions=even, progress=False
    )
    ids = [gpt2_bridge.to_tokens(t)[0] for t in TEXTS]
    assert chosen.index.position.tensor().tolist() == [
        p for row in ids for p in (row % 2 == 0).nonzero().flatten().tolist()
    ]
    text = harvest(
        gpt2_bridge, rows(), hook, tmp_path / "text", batch_size=4, positions="text", progress=False
    )
    assert torch.equal(text[hook].tensor(), every[hook].tensor())  # no image tokens: all


def test_parquet_and_saved_dataset_equal_jsonl(
    gpt2_bridge: TransformerBridge, tmp_path: Path
) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    hook = "blocks.0.hook_resid_post"
    jsonl = harvest(
        gpt2_bridge, write_jsonl(tmp_path / "d.jsonl", rows()), hook, tmp_path / "j", progress=False
    )
    pq.write_table(pa.Table.from_pylist(rows()), tmp_path / "d.parquet", row_group_size=3)
    parquet = harvest(gpt2_bridge, tmp_path / "d.parquet", hook, tmp_path / "p", progress=False)
    datasets.Dataset.from_list(rows()).save_to_disk(str(tmp_path / "saved"))
    saved = harvest(gpt2_bridge, tmp_path / "saved", hook, tmp_path / "s", progress=False)
    for other in (parquet, saved):
        assert other.index.ids == jsonl.index.ids
        assert torch.equal(other[hook].tensor(), jsonl[hook].tensor())


def test_store_dtype_and_truncation(gpt2_bridge: TransformerBridge, tmp_path: Path) -> None:
    hook = "blocks.0.hook_resid_post"
    half = harvest(
        gpt2_bridge, rows(), hook, tmp_path, dtype=torch.float16, max_length=5, progress=False
    )
    assert half[hook].dtype == torch.float16
    assert max(s.stop - s.start for s in map(half.index.rows_at, range(len(TEXTS)))) == 5


def test_bad_inputs_are_named(gpt2_bridge: TransformerBridge, tmp_path: Path) -> None:
    with pytest.raises(HookNameError, match=r"blocks\.0\.hook_resid_pre"):
        harvest(gpt2_bridge, rows(), "blocks.0.hook_resid_pri", tmp_path)
    with pytest.raises(InputError, match=r"\[batch, head, q_pos, k_pos\]"):
        harvest(gpt2_bridge, rows(), "blocks.0.attn.hook_pattern", tmp_path)
    with pytest.raises(InputError, match="all, last, text, image"):
        harvest(gpt2_bridge, rows(), "hook_embed", tmp_path, positions="first")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="no image_token_id"):
        harvest(gpt2_bridge, rows(), "hook_embed", tmp_path, positions="image")
    with pytest.raises(InputError, match="does not exist"):
        harvest(gpt2_bridge, tmp_path / "missing.jsonl", "hook_embed", tmp_path / "o")
    with pytest.raises(InputError, match="accepted are"):
        harvest(gpt2_bridge, write_jsonl(tmp_path / "d.csv", rows()), "hook_embed", tmp_path)
    broken = write_jsonl(tmp_path / "b.jsonl", [{"id": 1, "txt": "hi"}])
    with pytest.raises(InputError, match="'text' must be a string"):
        harvest(gpt2_bridge, broken, "hook_embed", tmp_path / "b", progress=False)
    with pytest.raises(InputError, match="have images, but this bridge has no processor"):
        data = [{"text": "hi", "images": ["x.png"]}]
        harvest(gpt2_bridge, data, "hook_embed", tmp_path / "i", progress=False)
    with pytest.raises(InputError, match="batch_size"):
        harvest(gpt2_bridge, rows(), "hook_embed", tmp_path, batch_size=0)


def test_a_rerun_with_other_settings_is_refused(
    gpt2_bridge: TransformerBridge, tmp_path: Path
) -> None:
    harvest(gpt2_bridge, rows(), "hook_embed", tmp_path, progress=False)
    with pytest.raises(InputError, match="positions differ"):
        harvest(gpt2_bridge, rows(), "hook_embed", tmp_path, positions="last", progress=False)
    with pytest.raises(InputError, match="no finished harvest"):
        HarvestReader(tmp_path / "nothing")


def test_resume_after_an_error_mid_run_equals_an_uninterrupted_run(
    gpt2_bridge: TransformerBridge, tmp_path: Path
) -> None:
    hook = "blocks.1.hook_resid_post"
    whole = harvest(gpt2_bridge, rows(), hook, tmp_path / "a", batch_size=2, shard_size=2)
    calls = 0

    def interrupt(tensor: torch.Tensor, hook: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:  # shard 2's batch, after shards 0 and 1 were written
            raise KeyboardInterrupt

    [handle] = gpt2_bridge.add_hook("hook_embed", interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            harvest(gpt2_bridge, rows(), hook, tmp_path / "b", batch_size=2, shard_size=2)
    finally:
        handle.remove()
    written = sorted(p.name for p in (tmp_path / "b" / "shards").iterdir())
    assert written == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert not (tmp_path / "b" / "index.json").exists()
    calls = -100
    [handle] = gpt2_bridge.add_hook("hook_embed", interrupt)
    try:
        resumed = harvest(gpt2_bridge, rows(), hook, tmp_path / "b", batch_size=2, shard_size=2)
    finally:
        handle.remove()
    assert calls == -98  # shards 2 and 3 ran; the finished shards 0 and 1 did not
    assert (tmp_path / "a" / "index.json").read_text() == (
        tmp_path / "b" / "index.json"
    ).read_text()
    assert torch.equal(resumed[hook].tensor(), whole[hook].tensor())


def test_progress_reports_tokens_per_second_and_eta(capsys: pytest.CaptureFixture[str]) -> None:
    meter = Progress(total=10, world=World(), enabled=True, every=0.0)
    meter.update(4, 100)
    meter.finish()
    first, last = capsys.readouterr().err.splitlines()
    assert (
        first.startswith("harvest: 4/10 examples, 100 tokens, ") and "tokens/s, ETA 0:00:" in first
    )
    assert "done in" in last


def test_command_line_harvest(
    saved_gpt2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bridge_core.cli import main

    data = write_jsonl(tmp_path / "d.jsonl", rows())
    out = tmp_path / "out"
    args = ["harvest", str(saved_gpt2), "--data", str(data), "--out", str(out)]
    code = main([*args, "--hooks", "blocks.0.hook_resid_post,hook_embed", "--positions", "last",
                 "--batch-size", "3", "--store-dtype", "float16"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "tokens/s" in captured.err and f"{len(TEXTS)} examples -> {out}" in captured.out
    reader = HarvestReader(out)
    assert reader["hook_embed"].shape == (len(TEXTS), 64) and reader.settings["dtype"] == "float16"
    assert main([*args, "--hooks", "blocks.0.hook_resid_pots"]) == 2
    assert "Did you mean 'blocks.0.hook_resid_post'" in capsys.readouterr().err
    missing = ["harvest", str(saved_gpt2), "--data", "nope.jsonl", "--hooks", "x", "--out", "o"]
    assert main(missing) == 2
    assert "does not exist" in capsys.readouterr().err


def test_duplicate_ids_are_reached_by_ordinal(
    gpt2_bridge: TransformerBridge, tmp_path: Path
) -> None:
    data = [{"id": "same", "text": "Hello world!"}, {"id": "same", "text": "One, two."}]
    reader = harvest(gpt2_bridge, data, "hook_embed", tmp_path, progress=False)
    with pytest.raises(InputError, match="several examples have id 'same'"):
        reader.index.rows("same")
    assert reader.index.rows_at(1).start == reader.index.rows_at(0).stop
