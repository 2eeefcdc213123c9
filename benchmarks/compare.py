"""``python -m benchmarks.compare``: TransformerLens and nnsight side by side with the bridge.

Each library is measured in a process of its own (`benchmarks.compare_worker`): the bridge
with this venv's Python, TransformerLens and nnsight with the comparison venv's
(``--compare-python``, made by ``make bench-compare``), against the plain HF model measured
in that same process, on the same saved model directory and the same saved inputs. Importing
a library can change the process it is imported into (nnsight patches torch and mounts
``.save`` on every object; TransformerLens replaces the modules of the model it wraps): with
all three in one process, the plain forward of the tiny GPT-2 once measured 12.4 ms instead of
3.6 ms, so the comparison had disturbed its own baseline. Here every ratio is a library over
its own process's baseline, measured in the same rounds. A shared machine's speed drifts over
minutes, so the rounds are split into ``--legs`` (default 3): each leg starts one process per
library, in an order that rotates from leg to leg, and a library's samples from all its legs
are pooled. The driver checks that the baselines agree across the libraries' processes:

- the HF logits have the same digest in every process (same model, inputs and numerics), and
  every process runs the same torch and transformers;
- each baseline's median differs across processes by at most ``--tolerance`` (per-call
  baselines, default 10 %, about three times the run-to-run noise of a ratio on this
  machine) or ``--load-tolerance`` (``from_pretrained``, default 30 %, twice the noise
  of loading). A baseline outside them refuses that model's comparison: the table still shows
  each process's ratios, marked as not comparable, and the exit status is 1.

Every worker runs with glibc told to keep the memory it frees (`MALLOC_ENV`). By default
glibc returns a large freed block to the system, and raises the size above which it does so
each time such a block is freed: after that, a process reuses its freed memory instead of
taking fresh pages, which fault on first touch. When that happens depends on everything the
process allocated before, so it differs between the libraries' processes. On the tiny LLaVA,
whose eager outputs call allocates most, the same HF baseline measured 22 ms in one library's
processes and 25 ms in another's, in every run, and the comparison was refused. With the
settings all processes reuse freed memory from their first rounds on.

The exit status is also 1 when a library's results are not HF's (see the worker's checks) or
a worker failed; a library that cannot do an operation leaves a note instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import compare_report, machine, models, report, timing, tools

ROOT = Path(__file__).resolve().parents[1]
COMPARE_PYTHON = ROOT / ".venv-compare" / "bin" / "python"
WORKER_ENV = {
    # no hub downloads and no installs at run time (TransformerLens pip-installs torchvision
    # when it cannot load an image processor)
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PIP_NO_INDEX": "1",
    "UV_OFFLINE": "1",
    "WANDB_MODE": "disabled",
}
MALLOC_ENV = {
    # glibc keeps what it frees, in every process alike (see the module docstring): no block
    # below 1 GiB is mapped on its own, the heap is trimmed only beyond 4 GiB free, and it
    # grows by 256 MiB at a time
    "MALLOC_MMAP_THRESHOLD_": "1073741824",
    "MALLOC_TRIM_THRESHOLD_": "4294967296",
    "MALLOC_TOP_PAD_": "268435456",
}
LOAD_BASELINES = ("hf_from_pretrained",)


@dataclass(frozen=True)
class Settings:
    """What to run, from the command line."""

    models: tuple[str, ...]
    tools: tuple[str, ...]
    rounds: int
    warmup: int
    seed: int
    threads: int
    clock: str
    tolerance: float
    load_tolerance: float
    compare_python: Path
    out: Path
    inner: int | None
    legs: int


def parse_args(argv: list[str]) -> Settings:
    """Settings from the command line (``--smoke``: one round, the tiny model only)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description="The bridge, TransformerLens and nnsight, each in its own process.",
    )
    parser.add_argument("--models", default=",".join(models.MODELS), help="comma-separated")
    parser.add_argument("--tools", default=",".join(tools.TOOLS), help="comma-separated")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument(
        "--legs", type=int, default=3, help="processes per library, the rounds split among them"
    )
    parser.add_argument("--warmup", type=int, default=2, help="warm-up calls (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the round order")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--clock", choices=sorted(timing.CLOCKS), default="cpu")
    parser.add_argument(
        "--tolerance", type=float, default=0.10, help="per-call baselines' spread (0.10)"
    )
    parser.add_argument(
        "--load-tolerance", type=float, default=0.30, help="from_pretrained's spread (0.30)"
    )
    parser.add_argument(
        "--compare-python", type=Path, default=COMPARE_PYTHON,
        help="Python of the venv with transformer-lens and nnsight (make bench-compare)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="results folder")
    parser.add_argument("--smoke", action="store_true", help="one round, tiny model only (CI)")
    args = parser.parse_args(argv)
    chosen = {
        "models": tuple(m.strip() for m in args.models.split(",") if m.strip()),
        "tools": tuple(t.strip() for t in args.tools.split(",") if t.strip()),
    }
    for what, known in (("models", models.MODELS), ("tools", tuple(tools.TOOLS))):
        unknown = [name for name in chosen[what] if name not in known]
        if unknown or not chosen[what]:
            parser.error(f"--{what}: unknown or none {unknown}; choose from {', '.join(known)}")
    if args.rounds < 1 or args.warmup < 0 or not 1 <= args.legs <= args.rounds:
        parser.error("--rounds must be >= 1, --warmup >= 0, 1 <= --legs <= --rounds")
    return Settings(
        models=("tiny",) if args.smoke else chosen["models"],
        tools=chosen["tools"],
        rounds=1 if args.smoke else args.rounds,
        warmup=1 if args.smoke else args.warmup,
        seed=args.seed,
        threads=args.threads,
        clock=args.clock,
        tolerance=args.tolerance,
        load_tolerance=args.load_tolerance,
        compare_python=args.compare_python,
        out=args.out,
        inner=1 if args.smoke else None,
        legs=1 if args.smoke else args.legs,
    )


def log(message: str) -> None:
    """Progress, on stderr (stdout is the report)."""
    print(f"[compare {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the comparison, print and write the tables and JSON; exit status 1 on a problem."""
    argv = sys.argv[1:] if argv is None else argv
    settings = parse_args(argv)
    with models.quiet_transformers():
        result = run(settings, " ".join(["python -m benchmarks.compare", *argv]))
    text = compare_report.markdown(result)
    print(text)
    path = report.write_json(result, settings.out, name="compare", latest="compare-latest.json")
    (settings.out / "compare-latest.md").write_text(text)
    log(f"wrote {path} and {settings.out / 'compare-latest.md'} ({result['elapsed_s']:.0f} s)")
    for problem in result["problems"]:
        log(f"problem: {problem}")
    return 1 if result["problems"] else 0


def run(settings: Settings, command: str) -> dict[str, Any]:
    """Every process `settings` asks for, their agreement and problems, JSON-ready."""
    result: dict[str, Any] = {
        "command": command,
        "machine": machine.machine(),
        "settings": {
            "models": list(settings.models),
            "tools": list(settings.tools),
            "rounds": settings.rounds,
            "legs": settings.legs,
            "warmup": settings.warmup,
            "seed": settings.seed,
            "torch_threads": settings.threads,
            "clock": settings.clock,
            "tolerance": settings.tolerance,
            "load_tolerance": settings.load_tolerance,
        },
        "models": {},
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bridge-compare-") as tmp:
        for name in settings.models:
            log(f"{name}: building and saving")
            directory = models.build(name, Path(tmp)).directory
            legs: dict[str, list[dict[str, Any]]] = {tool: [] for tool in settings.tools}
            for leg in range(settings.legs):
                turn = leg % len(settings.tools)
                for tool in settings.tools[turn:] + settings.tools[:turn]:
                    log(f"{name}, leg {leg + 1}/{settings.legs}: {tools.TOOLS[tool]}")
                    legs[tool].append(run_worker(tool, directory, settings, leg))
            workers = {tool: pool(found) for tool, found in legs.items()}
            result["models"][name] = {"workers": workers, "agreement": agreement(workers, settings)}
    result["machine"]["load_average_end"] = os.getloadavg()
    result["problems"] = problems(result)
    result["elapsed_s"] = time.perf_counter() - started
    return result


def run_worker(tool: str, directory: Path, settings: Settings, leg: int = 0) -> dict[str, Any]:
    """One worker process's JSON (its share of the rounds), or ``{"failed": why}``."""
    python = Path(sys.executable) if tool == "bridge" else settings.compare_python
    if not python.exists():
        return {"tool": tool, "failed": f"no Python at {python} (run `make bench-compare`)"}
    out = directory.parent / f"{directory.name}-{tool}-{leg}.json"
    rounds = -(-settings.rounds // settings.legs)  # at least `rounds` samples in all
    command = [str(python), "-m", "benchmarks.compare_worker", "--tool", tool]
    command += ["--case", str(directory), "--out", str(out), "--rounds", str(rounds)]
    command += ["--warmup", str(settings.warmup), "--seed", str(settings.seed + leg)]
    command += ["--threads", str(settings.threads), "--clock", settings.clock]
    if settings.inner is not None:
        command += ["--inner", str(settings.inner)]
    env = {**os.environ, **WORKER_ENV, **MALLOC_ENV}
    completed = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )  # fmt: skip
    if completed.returncode != 0 or not out.exists():
        tail = completed.stderr.strip().splitlines()[-5:]
        return {"tool": tool, "failed": f"exit status {completed.returncode}: {' | '.join(tail)}"}
    worker: dict[str, Any] = json.loads(out.read_text())
    worker["process"]["executable"] = os.path.relpath(worker["process"]["executable"], ROOT)
    return worker


def pool(legs: list[dict[str, Any]]) -> dict[str, Any]:
    """One library's legs as one worker result: samples pooled, each check at its worst.

    A failed leg fails the whole; versions and notes are the first leg's (the legs run the
    same Python); the HF logits' digest is the first leg's when all agree, else all of them.
    """
    failed = [leg for leg in legs if "failed" in leg]
    if failed:
        return failed[0]
    pooled = dict(legs[0])
    timings: dict[str, Any] = {}
    for name in legs[0]["timings"]:
        samples = [s for leg in legs for s in leg["timings"][name]["samples_s"]]
        per = [leg["timings"][name]["calls_per_sample"] for leg in legs]
        stats = timing.Stats(tuple(samples), per[0]).as_dict()
        timings[name] = stats | {"calls_per_sample": per}
    pooled["timings"] = timings
    if "checks" in legs[0]:
        checks = legs[0]["checks"]
        pooled["checks"] = {key: _worst([leg["checks"][key] for leg in legs]) for key in checks}
    digests = list(dict.fromkeys(leg["hf_logits_sha256"] for leg in legs))
    pooled["hf_logits_sha256"] = " / ".join(digests)
    pooled["legs"] = len(legs)
    pooled["load_averages"] = [
        [leg["process"]["load_average_start"][0], leg["process"]["load_average_end"][0]]
        for leg in legs
    ]
    return pooled


def _worst(outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    """The worst of one check's outcomes: the largest difference (the smallest, for a lower
    bound such as "the ablation moves the logits")."""
    worst = dict(outcomes[0])
    pick = min if worst.get("lower_bound") else max
    worst["max_abs_diff"] = pick(outcome["max_abs_diff"] for outcome in outcomes)
    worst["ok"] = all(outcome["ok"] for outcome in outcomes)
    if "bitwise" in worst:
        worst["bitwise"] = all(outcome["bitwise"] for outcome in outcomes)
    return worst


def agreement(workers: dict[str, dict[str, Any]], settings: Settings) -> dict[str, Any]:
    """Whether the HF baselines of a model's processes agree, and why not if they do not."""
    measured = {tool: w for tool, w in workers.items() if "timings" in w}
    found: list[str] = []
    baselines: dict[str, Any] = {}
    names = [
        n for n in compare_report.BASELINES if all(n in w["timings"] for w in measured.values())
    ]
    for name in names:
        medians = {tool: w["timings"][name]["median_s"] for tool, w in measured.items()}
        spread = max(medians.values()) / min(medians.values()) - 1 if medians else 0.0
        limit = settings.load_tolerance if name in LOAD_BASELINES else settings.tolerance
        baselines[name] = {"medians_s": medians, "spread": spread, "tolerance": limit}
        if spread > limit:
            found.append(
                f"{name} medians differ by {spread:.0%} across processes (tolerance {limit:.0%})"
            )
    digests = {tool: w["hf_logits_sha256"] for tool, w in measured.items()}
    if len({d for found in digests.values() for d in found.split(" / ")}) > 1:
        found.append(f"the HF logits differ across processes ({digests}): not the same run")
    versions = {
        tool: f"torch {w['process']['torch']}, transformers {w['process']['transformers']}"
        for tool, w in measured.items()
    }
    if len(set(versions.values())) > 1:
        found.append(f"the processes run different torch or transformers: {versions}")
    mallocs = {tool: w["process"].get("malloc", {}) for tool, w in measured.items()}
    if len({json.dumps(m, sort_keys=True) for m in mallocs.values()}) > 1:
        found.append(f"the processes run with different glibc malloc settings: {mallocs}")
    return {
        "baselines": baselines,
        "hf_logits_sha256": digests,
        "versions": versions,
        "malloc": mallocs,
        "problems": found,
        "ok": not found,
    }


def problems(result: dict[str, Any]) -> list[str]:
    """Everything that makes the comparison wrong or incomplete, one line each."""
    found = []
    for name, model in result["models"].items():
        found += [f"{name}: baselines not comparable: {p}" for p in model["agreement"]["problems"]]
        for tool, worker in model["workers"].items():
            label = tools.TOOLS[tool]
            if "failed" in worker:
                found.append(f"{name}: {label} failed: {worker['failed']}")
            for check, outcome in worker.get("checks", {}).items():
                if not outcome["ok"]:
                    found.append(f"{name}: {label} {check} does not hold: {outcome}")
    return found


if __name__ == "__main__":
    sys.exit(main())
