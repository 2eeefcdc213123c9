"""The side-by-side comparison keeps working: the driver starts a worker process for the bridge
on the tiny model (one round, no timed assertions), and refuses baselines that disagree.

TransformerLens's and nnsight's workers need their own venv; `make bench-compare` runs them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def compare(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(ROOT))  # benchmarks/ is not an installed package
    import benchmarks.compare

    return benchmarks.compare


def test_the_bridge_worker_runs_end_to_end(
    compare: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert compare.main(["--smoke", "--tools", "bridge", "--out", str(tmp_path)]) == 0

    table = capsys.readouterr().out
    assert "| tiny | forward, no hooks | " in table
    assert table == (tmp_path / "compare-latest.md").read_text() + "\n"
    result = json.loads((tmp_path / "compare-latest.json").read_text())
    assert result["problems"] == []
    worker = result["models"]["tiny"]["workers"]["bridge"]
    assert worker["process"]["torch_threads"] == 1
    assert worker["process"]["malloc"] == compare.MALLOC_ENV  # freed memory kept, as in all
    assert all(outcome["ok"] for outcome in worker["checks"].values()), worker["checks"]
    assert worker["checks"]["forward_logits"]["bitwise"]
    assert worker["checks"]["cache_one_value"]["bitwise"]
    assert worker["cache"]["entries"] > 100  # every hook point of a 12-layer GPT-2
    for variant in ("hf_forward", "forward", "cache_all", "ablate", "boot", "wrap"):
        assert worker["timings"][variant]["median_s"] > 0
    assert result["models"]["tiny"]["agreement"]["ok"]


def _worker(forward_s: float, digest: str = "0123") -> dict[str, Any]:
    timings = {
        name: {"median_s": 0.05, "min_s": 0.05} for name in ("hf_outputs", "hf_torch_ablate")
    }
    timings |= {"hf_forward": {"median_s": forward_s, "min_s": forward_s}}
    timings |= {"hf_from_pretrained": {"median_s": 0.07, "min_s": 0.07}}
    process = {"torch": "2.13.0+cpu", "transformers": "5.24.0"}
    return {"timings": timings, "hf_logits_sha256": digest, "process": process}


def test_baselines_that_disagree_refuse_the_comparison(compare: Any) -> None:
    settings = compare.parse_args([])
    close = compare.agreement({"bridge": _worker(3.6e-3), "nnsight": _worker(3.7e-3)}, settings)
    assert close["ok"] and close["baselines"]["hf_forward"]["spread"] == pytest.approx(1 / 36)

    # what the in-process comparison once measured: a plain forward slowed down 3.4x
    slowed = {"bridge": _worker(3.6e-3), "transformer_lens": _worker(12.4e-3)}
    refused = compare.agreement(slowed, settings)
    assert not refused["ok"]
    assert refused["problems"] == [
        "hf_forward medians differ by 244% across processes (tolerance 10%)"
    ]

    other_run = {"bridge": _worker(3.6e-3), "nnsight": _worker(3.6e-3, digest="4567")}
    assert "HF logits differ" in compare.agreement(other_run, settings)["problems"][0]

    # a process started by hand, without the settings that keep freed memory
    unlike = {"bridge": _worker(3.6e-3), "nnsight": _worker(3.6e-3)}
    unlike["bridge"]["process"]["malloc"] = dict(compare.MALLOC_ENV)
    (problem,) = compare.agreement(unlike, settings)["problems"]
    assert problem.startswith("the processes run with different glibc malloc settings")


def _leg(samples: list[float], diff: float) -> dict[str, Any]:
    timings = {"hf_forward": {"median_s": 0.0, "min_s": 0.0, "calls_per_sample": 3}}
    timings["hf_forward"]["samples_s"] = samples
    checks = {
        "forward_logits": {"against": "hf_forward", "max_abs_diff": diff, "bitwise": diff == 0},
        "ablation_changes_logits": {"max_abs_diff": 0.3 - diff, "lower_bound": True},
    }
    for outcome in checks.values():
        outcome["ok"] = True
    process = {"load_average_start": [4.0, 4.0, 4.0], "load_average_end": [5.0, 5.0, 5.0]}
    return {"timings": timings, "checks": checks, "hf_logits_sha256": "0123", "process": process}


def test_legs_pool_their_samples_and_keep_each_checks_worst(compare: Any) -> None:
    pooled = compare.pool([_leg([1.0, 3.0], 0.0), _leg([2.0], 1e-6)])

    forward = pooled["timings"]["hf_forward"]
    assert (forward["samples_s"], forward["median_s"], forward["min_s"]) == ([1.0, 3.0, 2.0], 2, 1)
    assert pooled["checks"]["forward_logits"]["max_abs_diff"] == 1e-6
    assert not pooled["checks"]["forward_logits"]["bitwise"]
    assert pooled["checks"]["ablation_changes_logits"]["max_abs_diff"] == 0.3 - 1e-6
    assert (pooled["legs"], pooled["hf_logits_sha256"]) == (2, "0123")
