"""Harvests that stop and resume, and that run on two torchrun ranks, equal a plain run.

Both start real processes (a harvest killed with SIGKILL mid-run; ``torch.distributed.run``
with two gloo ranks) on the tiny GPT-2 saved to a folder, and compare what they wrote with an
uninterrupted single-process harvest bit for bit (same torch thread count everywhere).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from bridge_core import TransformerBridge
from bridge_core.harvest import HarvestReader, harvest

HOOKS = ["blocks.1.hook_resid_post", "hook_embed"]
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world!",
    "Paris is the capital of France.",
    "One, two, three, four, five.",
    "The cat sat at the window.",
    "What color is the sky?",
    "A spider has eight legs, an insect has six legs.",
    "Monday, Tuesday and Sunday.",
    "She said: I will be there at 5.",
]
SCRIPT = """
import os, signal, sys
import torch
from bridge_core import TransformerBridge
from bridge_core.harvest import harvest

model, data, out, threads, kill_at = sys.argv[1:6]
torch.set_num_threads(int(threads))
bridge = TransformerBridge.boot(model)
calls = 0

def kill(tensor, hook):
    global calls
    calls += 1
    if calls == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)

if int(kill_at):
    bridge.add_perma_hook("hook_embed", kill)
harvest(bridge, data, HOOKS, out, batch_size=2, shard_size=3)
""".replace("HOOKS", repr(HOOKS))


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    rows = [{"id": f"doc-{i}", "text": text} for i, text in enumerate(TEXTS)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@contextmanager
def threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "harvest_script.py"
    script.write_text(SCRIPT, encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [a if a != "SCRIPT" else str(script) for a in args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def assert_same_harvest(a: Path, b: Path) -> None:
    assert (a / "index.json").read_text() == (b / "index.json").read_text()
    left, right = HarvestReader(a), HarvestReader(b)
    for hook in HOOKS:
        assert torch.equal(left[hook].tensor(), right[hook].tensor()), hook
    assert torch.equal(left.index.position.tensor(), right.index.position.tensor())


def test_a_killed_harvest_resumes_to_the_uninterrupted_result(
    saved_gpt2: Path, data: Path, tmp_path: Path
) -> None:
    n = torch.get_num_threads()
    out = tmp_path / "killed"
    # batch 4 is shard 1's second batch: shard 0 is on disk, shard 1 in flight
    killed = run(
        [sys.executable, "SCRIPT", str(saved_gpt2), str(data), str(out), str(n), "4"], tmp_path
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-00000.safetensors"]
    assert not (out / "index.json").exists()
    (out / "shards" / "shard-00001.safetensors.tmp-12345").write_bytes(b"half a shard")

    bridge = TransformerBridge.boot(saved_gpt2)
    harvest(bridge, data, HOOKS, out, batch_size=2, shard_size=3, progress=False)
    assert sorted(p.name for p in (out / "shards").iterdir()) == [
        f"shard-0000{i}.safetensors" for i in range(3)
    ]
    whole = tmp_path / "whole"
    harvest(bridge, data, HOOKS, whole, batch_size=2, shard_size=3, progress=False)
    assert_same_harvest(out, whole)


def test_two_torchrun_ranks_equal_one_process(saved_gpt2: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "ranks"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "SCRIPT",
        str(saved_gpt2),
        str(data),
        str(out),
        "1",
        "0",
    ]
    done = run(command, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[rank 1/2]" in done.stderr and "tokens/s" in done.stderr
    shards = json.loads((out / "index.json").read_text())["shards"]
    assert [s["examples"] for s in shards] == [[0, 3], [3, 6], [6, 9]]  # ranks 0, 1, 0
    single = tmp_path / "single"
    with threads(1):
        harvest(
            TransformerBridge.boot(saved_gpt2),
            data,
            HOOKS,
            single,
            batch_size=2,
            shard_size=3,
            progress=False,
        )
    assert_same_harvest(out, single)
