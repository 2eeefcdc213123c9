"""``python -m benchmarks``: build the models, time them, print the tables, write the JSON."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks import baselines, machine, models, process, report, timing, workloads


@dataclass(frozen=True)
class Settings:
    """What to run, from the command line."""

    models: tuple[str, ...]
    rounds: int
    warmup: int
    process_rounds: int
    smoke: bool
    out: Path
    seed: int
    threads: int | None
    clock: str


def parse_args(argv: list[str]) -> Settings:
    """Settings from the command line (``--smoke``: one round, the tiny model only)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="transformer-bridge against raw HF: interleaved timings, import, memory.",
    )
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up calls (default 2)")
    parser.add_argument(
        "--process-rounds", type=int, default=7, help="fresh processes for import time"
    )
    parser.add_argument("--smoke", action="store_true", help="one round, tiny model only (CI)")
    parser.add_argument("--models", default=",".join(models.MODELS), help="comma-separated")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="JSON folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the round order")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    parser.add_argument(
        "--clock",
        choices=sorted(timing.CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu: process CPU time (with --threads 1, for busy machines)",
    )
    args = parser.parse_args(argv)
    chosen = tuple(m.strip() for m in args.models.split(",") if m.strip())
    unknown = [m for m in chosen if m not in models.MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(models.MODELS)}")
    if args.rounds < 1 or args.warmup < 0 or args.process_rounds < 1:
        parser.error("--rounds and --process-rounds must be >= 1, --warmup >= 0")
    smoke = bool(args.smoke)
    return Settings(
        models=("tiny",) if smoke else chosen,
        rounds=1 if smoke else args.rounds,
        warmup=1 if smoke else args.warmup,
        process_rounds=1 if smoke else args.process_rounds,
        smoke=smoke,
        out=args.out,
        seed=args.seed,
        # one thread for the smoke run: OpenMP workers waiting on a busy CI machine only slow it
        threads=(args.threads or 1) if smoke else args.threads,
        clock=args.clock,
    )


def log(message: str) -> None:
    """Progress, on stderr (stdout is the report)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure(case: models.Case, settings: Settings) -> dict[str, Any]:
    """Every per-model measurement of `case`."""
    log(f"{case.name}: {case.description}")
    eager = case.model_class.from_pretrained(case.directory, attn_implementation="eager").eval()
    bridge, note = workloads.wrap(case)
    hf = baselines.hf_runs(case, eager)
    bridged = workloads.bridge_runs(case, bridge, eager) if bridge is not None else {}
    entry: dict[str, Any] = {
        "description": case.description,
        "params": case.n_params,
        "bridge_note": note,
        "notes": [note] if note else [],
    }
    wraps = {"bridge_wrap": workloads.wrap_run(case)} if bridge is not None else {}
    with torch.no_grad():
        entry["checks"] = workloads.check(case, hf, bridged or None)
        timings = _timed({**hf, **bridged}, settings, f"{case.name}: calls")
        timings |= _timed(workloads.load_runs(case, bridge is not None), settings, "", inner=1)
        timings |= _timed(wraps, settings, "")
        if bridge is not None:
            entry["cache"] = workloads.cache_stats(case, bridge, eager)
    entry["timings"] = {name: stats.as_dict() for name, stats in timings.items()}
    del eager, bridge, hf, bridged
    log(f"{case.name}: peak memory")
    entry["memory"] = process.memory(case.directory, fresh=not settings.smoke)
    return entry


def _timed(
    variants: dict[str, timing.Variant], settings: Settings, what: str, inner: int | None = None
) -> dict[str, timing.Stats]:
    """Interleave `variants`; calls per sample calibrated on the first one unless given."""
    if not variants:
        return {}
    if inner is None:
        first = next(iter(variants.values()))
        inner = 1 if settings.smoke else timing.calibrate(first, timing.SAMPLE_S)
    if what:
        log(f"{what}: {len(variants)} variants, {settings.rounds} rounds x {inner} calls")
    return timing.interleave(
        variants, settings.rounds, settings.warmup, inner, settings.seed, settings.clock
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; exit status 1 if a bitwise check failed."""
    argv = sys.argv[1:] if argv is None else argv
    settings = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        with models.quiet_transformers():
            result = run(settings, " ".join(["python -m benchmarks", *argv]))
    finally:
        torch.set_num_threads(threads)  # as it was, for a caller in the same process (tests)
    print(report.markdown(result))
    path = report.write_json(result, settings.out)
    log(f"wrote {path} ({result['elapsed_s']:.0f} s)")
    failed = [n for n, m in result["models"].items() if not all(m.get("checks", {}).values())]
    if failed:
        log(f"bitwise checks failed for {', '.join(failed)}")
    return 1 if failed else 0


def run(settings: Settings, command: str) -> dict[str, Any]:
    """Every measurement `settings` asks for, as a JSON-ready dictionary."""
    result: dict[str, Any] = {
        "command": command,
        "machine": machine.machine(),
        "settings": {
            "models": list(settings.models),
            "rounds": settings.rounds,
            "warmup": settings.warmup,
            "process_rounds": settings.process_rounds,
            "smoke": settings.smoke,
            "seed": settings.seed,
            "torch_threads": torch.get_num_threads(),
            "clock": settings.clock,
        },
        "models": {},
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bridge-bench-") as tmp:
        for name in settings.models:
            log(f"{name}: building and saving")
            case = models.build(name, Path(tmp))
            result["models"][name] = measure(case, settings)
            del case
    log(f"import time and first wrap: {settings.process_rounds} fresh processes")
    result["process"] = process.import_and_first_wrap(settings.process_rounds)
    if not settings.smoke:
        result["import_breakdown"] = process.import_breakdown()
    result["machine"]["load_average_end"] = os.getloadavg()
    result["elapsed_s"] = time.perf_counter() - started
    return result
