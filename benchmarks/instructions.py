"""``python -m benchmarks.instructions``: CPU instructions per call, counted by valgrind.

On a shared machine a timed ratio moves by several percent from run to run, more than most
single changes to the per-hook path are worth. The number of instructions a call executes
does not depend on the load: this counts them with valgrind's cachegrind (``--cache-sim=no``)
for the same variants that `benchmarks.phases` times, on one benchmark model. Each variant
runs in two worker processes under valgrind, one making `--calls` more calls than the other
after the same warm-up; the difference of their totals over those calls is the count per
call, free of the import and the model load. Repeated counts of a variant agreed within
about 1 % on the development machine.

Instructions are not time: they leave out cache misses and page faults (much of what keeping
a cache of activations costs). Use them to compare versions of the Python path, and `python
-m benchmarks` for the ratios the targets are set in.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from benchmarks import models, phases
from bridge_core import TransformerBridge

VARIANTS = (
    "hf_outputs",
    "hf_forward",
    "bridge_forward",
    "run_with_hooks_one_point",
    "run_with_cache_one_point",
    "run_with_cache",
    "run_with_hooks_every_point",
    "attach_remove_every_point",
    "hooks_alone",
    "from_pretrained",
    "boot",
    "wrap",
)
LOADING = {"boot": "from_pretrained", "wrap": "from_pretrained"}
"""Loading variants, with the variant their ratio is over (the calls' is HF's outputs)."""
WARM_UP = 3
ENV = {"PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


def calls(case: models.Case, bridge: TransformerBridge) -> dict[str, Callable[[], Any]]:
    """Each variant, as a call (see `benchmarks.phases`; ``hf_outputs`` needs eager attention)."""
    model, inputs = case.model, case.inputs
    every = [(lambda name: True, phases.noop)]
    one = f"blocks.{case.layer}.hook_resid_post"

    def attach_remove() -> None:
        with bridge.hooks(every):
            pass

    return {
        "hf_outputs": lambda: model(**inputs, output_hidden_states=True, output_attentions=True),
        "hf_forward": lambda: model(**inputs),
        "bridge_forward": lambda: bridge(**inputs),
        "run_with_hooks_one_point": lambda: bridge.run_with_hooks(
            **inputs, fwd_hooks=[(one, phases.noop)]
        ),
        "run_with_cache_one_point": lambda: bridge.run_with_cache(**inputs, names_filter=one),
        "run_with_cache": lambda: bridge.run_with_cache(**inputs),
        "run_with_hooks_every_point": lambda: bridge.run_with_hooks(**inputs, fwd_hooks=every),
        "attach_remove_every_point": attach_remove,
        "hooks_alone": phases.hooks_alone(model, phases.tapped(bridge), inputs),
        "from_pretrained": lambda: case.model_class.from_pretrained(case.directory),
        "boot": lambda: TransformerBridge.boot(case.directory),
        "wrap": lambda: TransformerBridge.wrap(
            model, tokenizer=case.tokenizer, processor=case.processor
        ),
    }


def worker(directory: Path, attn: str, variant: str, count: int) -> None:
    """Load the saved model, warm `variant` up, and make `count` more calls of it (one torch
    thread, the collector frozen as in `benchmarks.timing`; both restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with models.quiet_transformers():
            case = models.load(directory, attn_implementation=attn)
        bridge = TransformerBridge.wrap(
            case.model, tokenizer=case.tokenizer, processor=case.processor
        )
        call = calls(case, bridge)[variant]
        with torch.no_grad():
            for _ in range(WARM_UP):
                call()
            gc.collect()
            gc.freeze()  # collections then cost what the calls allocate, not the model's size
            for _ in range(count):
                call()
    finally:
        gc.unfreeze()
        torch.set_num_threads(threads)


def refs(output: str) -> int:
    """The total instruction count in cachegrind's summary."""
    found = _REFS.search(output)
    if found is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{output[-2000:]}")
    return int(found.group(1).replace(",", ""))


def count(directory: Path, attn: str, variant: str, extra: int) -> float:
    """Instructions per call of `variant`: two processes under valgrind, `extra` calls
    apart, run side by side."""
    command = [
        "valgrind",
        "--tool=cachegrind",
        "--cache-sim=no",
        "--cachegrind-out-file=/dev/null",
        sys.executable,
        "-m",
        "benchmarks.instructions",
        "--worker",
        str(directory),
        "--attn",
        attn,
        "--variant",
        variant,
    ]
    env = {**os.environ, **ENV}

    def run(calls: int) -> int:
        done = subprocess.run(
            [*command, "--calls", str(calls)], capture_output=True, text=True, env=env
        )
        if done.returncode != 0:
            raise RuntimeError(f"{variant} with {calls} calls failed:\n{done.stderr[-3000:]}")
        return refs(done.stderr)

    with ThreadPoolExecutor(2) as pool:
        few, many = pool.map(run, (0, extra))
    return (many - few) / extra


def table(counts: dict[str, float]) -> str:
    """Markdown: instructions per call, and over the baseline: HF's outputs (else its
    forward) for calls, `from_pretrained` for `boot`."""
    calls_base = "hf_outputs" if "hf_outputs" in counts else "hf_forward"
    lines = ["| variant | instructions per call | over |", "| --- | --- | --- |"]
    for name, value in counts.items():
        base_name = LOADING.get(name, calls_base)
        base = counts.get(base_name) if base_name != name else None
        over = f"{value / base:.3f}x {base_name}" if base else ""
        lines.append(f"| {name} | {value / 1e6:.2f} M | {over} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.instructions", description=__doc__)
    parser.add_argument("--model", default="tiny", choices=models.MODELS)
    parser.add_argument("--attn", choices=("sdpa", "eager"), default="eager")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--calls", type=int, default=40, help="calls counted (default 40)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.attn, args.variant, args.calls)
        return 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if args.attn != "eager" and "hf_outputs" in variants:
        variants.remove("hf_outputs")  # HF returns attentions from its eager kernel only
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt install valgrind)", file=sys.stderr)
        return 2
    counts: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as root, models.quiet_transformers():
        case = models.build(args.model, Path(root))
        for variant in variants:
            counts[variant] = count(case.directory, args.attn, variant, args.calls)
            print(f"{variant}: {counts[variant] / 1e6:.2f} M", file=sys.stderr, flush=True)
    print(f"{args.model} ({args.attn}): instructions per call, {args.calls} calls counted")
    print(table(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
