"""One process of the side-by-side comparison: one library on one saved case, against the
plain HF model measured in the same process, in the same shuffled rounds.

``python -m benchmarks.compare_worker --tool NAME --case DIR --out FILE`` (the driver,
`benchmarks.compare`, starts it with the right venv's Python). It imports only torch,
transformers, the library under test and `benchmarks`' torch-only modules, so that it runs in
the comparison venv, where transformer-bridge is not installed.

Before timing it checks the library's results against HF's: logits (against the sdpa model
and its eager copy, since a library may switch attention kernels), the cached block output
against a plain torch hook's, the ablated logits against a plain torch pre-hook's. Float32
kernels that differ only in the order of operations agree to about 1e-6 of the logits' scale;
`TOLERANCE` is a hundred times that, and anything beyond it computes something else.
The JSON it writes holds every sample, the checks, the cache's size and the process's
versions; a library that cannot do an operation leaves a note instead of failing the run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, cast

import torch

from benchmarks import baselines, machine, models, timing, tools
from benchmarks.baselines import logits_of

TOLERANCE = 1e-4
"""Largest |tool - HF| allowed, relative to the largest |HF logit| (at least 1)."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare_worker")
    parser.add_argument("--tool", required=True, choices=sorted(tools.TOOLS))
    parser.add_argument("--case", required=True, type=Path, help="a saved benchmark case")
    parser.add_argument("--out", required=True, type=Path, help="the JSON file to write")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(timing.CLOCKS), default="cpu")
    parser.add_argument("--inner", type=int, default=None, help="calls per sample (calibrated)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Measure, write the JSON file; exit status 0 when it was written."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    with models.quiet_transformers():
        result = measure(args)
    result["process"]["load_average_end"] = os.getloadavg()
    args.out.write_text(json.dumps(result, indent=2))
    return 0


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Baselines and the tool's runs on the case in `args.case`: checks, cache size, timings."""
    directory: Path = args.case
    case = models.load(directory)
    model_class = models.hf_class(directory)
    eager = model_class.from_pretrained(directory, attn_implementation="eager").eval()
    hf = baselines.hf_runs(case, eager)
    result: dict[str, Any] = {
        "tool": args.tool,
        "model": case.name,
        "process": machine.machine() | {"executable": sys.executable, "clock": args.clock},
        "settings": {"rounds": args.rounds, "warmup": args.warmup, "seed": args.seed},
        "notes": [],
    }
    label = tools.TOOLS[args.tool]
    try:
        tool: tools.Tool | None = tools.build(
            args.tool, case, lambda: model_class.from_pretrained(directory).eval()
        )
    except Exception as exc:  # an optional library: any failure is reported, not raised
        result["notes"].append(f"{label}: cannot wrap the model ({type(exc).__name__}: {exc})")
        tool = None
    calls: dict[str, timing.Variant] = {name: hf[name] for name in ("hf_forward", "hf_outputs")}
    calls["hf_torch_ablate"] = hf["hf_torch_ablate"]
    loads: dict[str, timing.Variant] = {"hf_from_pretrained": baselines.from_pretrained_run(case)}
    with torch.no_grad():
        result["hf_logits_sha256"] = _digest(logits_of(hf["hf_forward"]()))
        if tool is not None:
            result |= {"version": tool.version, "caches": tool.caches}
            result["notes"] += tool.notes
            outputs = _working(tool, label, result["notes"])
            result["checks"] = check(tool, outputs, hf)
            if "cache_all" in outputs:
                result["cache"] = cache_size(tool, outputs["cache_all"])
            calls |= {m: tool.runs[m] for m in tools.CALLS if m in outputs}
            loads |= {m: tool.runs[m] for m in tools.LOADS if m in outputs}
        inner = args.inner or timing.calibrate(calls["hf_forward"], timing.SAMPLE_S)
        timed = timing.interleave(calls, args.rounds, args.warmup, inner, args.seed, args.clock)
        timed |= timing.interleave(loads, args.rounds, args.warmup, 1, args.seed, args.clock)
    result["timings"] = {name: stats.as_dict() for name, stats in timed.items()}
    return result


def _working(tool: tools.Tool, label: str, notes: list[str]) -> dict[str, Any]:
    """Run each of the tool's variants once: metric -> its result, for those that work."""
    outputs: dict[str, Any] = {}
    for metric, run in tool.runs.items():
        try:
            outputs[metric] = run()
        except Exception as exc:  # same: the table shows n/a with the reason
            notes.append(f"{label} {metric}: {type(exc).__name__}: {exc}"[:300])
    return outputs


def check(tool: tools.Tool, outputs: dict[str, Any], hf: baselines.Runs) -> dict[str, Any]:
    """The tool's results against HF's, each as max |difference| and whether it is in bounds."""
    reference = logits_of(hf["hf_forward"]())
    eager = logits_of(hf["hf_outputs"]())
    _, saved = cast(tuple[Any, torch.Tensor], hf["hf_torch_save"]())
    ablated = logits_of(hf["hf_torch_ablate"]())
    bound = TOLERANCE * max(1.0, reference.abs().max().item())
    checks: dict[str, dict[str, Any]] = {}
    for metric in ("forward", "cache_all", "cache_one"):
        if metric in outputs:
            checks[f"{metric}_logits"] = _closest(
                logits_of(outputs[metric]), reference, eager, bound
            )
    if "cache_one" in outputs:
        one = tool.read_one(outputs["cache_one"])
        checks["cache_one_value"] = _compare(one, saved, "hf_torch_save", bound)
    if "ablate" in outputs:
        mine = logits_of(outputs["ablate"])
        checks["ablate_logits"] = _compare(mine, ablated, "hf_torch_ablate", bound)
        moved = (mine - reference).abs().max().item()
        checks["ablation_changes_logits"] = {
            "max_abs_diff": moved,
            "lower_bound": True,
            "ok": moved > bound,
        }
    return checks


def _closest(
    logits: torch.Tensor, reference: torch.Tensor, eager: torch.Tensor, bound: float
) -> dict[str, Any]:
    """`logits` against HF's sdpa and eager logits, reporting the closer of the two."""
    found = _compare(logits, reference, "hf_forward", bound)
    if found["bitwise"]:
        return found
    other = _compare(logits, eager, "hf_outputs (eager)", bound)
    return other if other["max_abs_diff"] < found["max_abs_diff"] else found


def _compare(
    mine: torch.Tensor, theirs: torch.Tensor, against: str, bound: float
) -> dict[str, Any]:
    if mine.shape != theirs.shape:
        return {"against": against, "ok": False, "bitwise": False, "max_abs_diff": float("inf"),
                "shape": f"{tuple(mine.shape)} vs {tuple(theirs.shape)}"}  # fmt: skip
    diff = (mine - theirs).abs().max().item()
    bitwise = torch.equal(mine, theirs)
    return {"against": against, "max_abs_diff": diff, "bitwise": bitwise, "ok": diff <= bound}


def cache_size(tool: tools.Tool, result: Any) -> dict[str, Any]:
    """Entries of a full cache, its tensors, and their bytes with each storage once."""
    names, tensors = tool.read_cache(result)
    return {
        "entries": len(names),
        "tensors": len(tensors),
        "unique_bytes": baselines.unique_nbytes(tensors),
        "what": tool.caches,
    }


def _digest(tensor: torch.Tensor) -> str:
    """A short fingerprint of a tensor's bytes (the same model and inputs give the same one)."""
    return hashlib.sha256(tensor.detach().contiguous().numpy().tobytes()).hexdigest()[:16]


if __name__ == "__main__":
    sys.exit(main())
