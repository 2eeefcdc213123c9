"""Measurements that need a fresh Python process: import time, first wrap, peak memory.

- Import: ``import torch, transformers`` first, then the clock runs over ``import bridge_core``
  and the first access to ``bridge_core.TransformerBridge`` (so lazy attributes cannot hide
  work). The same process then builds a 12-layer GPT-2 (d_model 64) and times its first wrap
  (which loads the plugin registry) and a second wrap.
- Memory: ``python -m benchmarks.process memory DIR`` loads a saved case and reports, per
  operation, the peak resident set size (RSS) above the RSS before the call (Linux: the
  ``VmHWM`` high-water mark, reset through ``/proc/self/clear_refs``), and the RSS still
  held while the result is alive. glibc is told to serve allocations of 64 KiB and more with
  mmap and to trim eagerly, so freed tensors leave the RSS and one call's peak is not hidden
  by memory kept from the previous one.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

IMPORT_PROBE = """
import json, time
import torch, transformers
start = time.perf_counter()
import bridge_core
bridge_core.TransformerBridge
imported = time.perf_counter()
from transformers import GPT2Config, GPT2LMHeadModel
config = GPT2Config(n_layer=12, n_embd=64, n_head=4, vocab_size=512, n_positions=128)
model = GPT2LMHeadModel(config).eval()
times = [time.perf_counter()]
for _ in range(2):
    bridge_core.TransformerBridge.wrap(model)
    times.append(time.perf_counter())
print(json.dumps({
    "import_s": imported - start,
    "first_wrap_s": times[1] - times[0],
    "second_wrap_s": times[2] - times[1],
}))
"""

MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
MEMORY_RUNS = (
    "hf_forward",
    "bridge_forward",
    "hf_outputs",
    "bridge_cache_all",
    "bridge_cache_all_eager",
    "bridge_cache_hf_set",
    "hf_torch_save",
    "bridge_cache_one",
)


def _python(args: list[str], env: dict[str, str] | None = None) -> str:
    """Run ``python ARGS`` from the repository root and return its stdout."""
    completed = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"python {' '.join(args[:3])} failed ({completed.returncode}):\n{completed.stderr}"
        )
    return completed.stdout


def import_and_first_wrap(rounds: int) -> dict[str, list[float]]:
    """Seconds for ``import bridge_core`` (after torch + transformers), first and second wrap."""
    samples: dict[str, list[float]] = {"import_s": [], "first_wrap_s": [], "second_wrap_s": []}
    for _ in range(rounds):
        result = json.loads(_python(["-c", IMPORT_PROBE]).strip().splitlines()[-1])
        for key in samples:
            samples[key].append(float(result[key]))
    return samples


def import_breakdown(top: int = 8) -> list[dict[str, Any]]:
    """The slowest modules ``import bridge_core`` imports (``python -X importtime``)."""
    code = "import torch, transformers; import bridge_core"
    completed = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    lines = completed.stderr.splitlines()
    start = max(i for i, line in enumerate(lines) if line.rstrip().endswith("| transformers"))
    found: list[dict[str, Any]] = []
    for line in lines[start + 1 :]:
        parts = line.removeprefix("import time:").split("|")
        if len(parts) == 3 and parts[0].strip().isdigit():
            name = parts[2].strip()
            found.append({"module": name, "self_s": int(parts[0]) / 1e6})
    found.sort(key=lambda entry: entry["self_s"], reverse=True)
    return found[:top]


def memory(directory: Path, fresh: bool = True) -> dict[str, Any]:
    """Peak and held RSS per operation for the case saved in `directory`.

    Args:
        fresh: in a fresh process with glibc tuned as described above; False runs the same
            code in this process (a quick check that it works, for ``--smoke``).
    """
    if not fresh:
        return _memory_worker(directory, repeats=1) | {"method": "in-process (smoke only)"}
    output = _python(["-m", "benchmarks.process", "memory", str(directory)], MEMORY_ENV)
    result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    return result


# -- inside the worker process -----------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _peak(fn: Callable[[], object]) -> tuple[int, int]:
    """(peak RSS above the start, RSS held while the result lives), in bytes."""
    gc.collect()
    base = _status_kib("VmRSS")
    _reset_peak()
    result = fn()
    peak, held = _status_kib("VmHWM"), _status_kib("VmRSS")
    del result
    gc.collect()
    return (peak - base) * 1024, (held - base) * 1024


def _memory_worker(directory: Path, repeats: int = 3) -> dict[str, Any]:
    import torch

    from benchmarks import baselines, models, workloads

    case = models.load(directory)
    eager = models.hf_class(directory).from_pretrained(directory, attn_implementation="eager")
    bridge, note = workloads.wrap(case)
    runs = baselines.hf_runs(case, eager.eval())
    if bridge is not None:
        runs |= workloads.bridge_runs(case, bridge, eager)
    result: dict[str, Any] = {"method": "RSS (VmHWM above VmRSS before the call)", "note": note}
    with torch.no_grad():
        for run in runs.values():
            run()
        for name in MEMORY_RUNS:
            if name in runs:
                peaks, helds = zip(*(_peak(runs[name]) for _ in range(repeats)), strict=True)
                result[name] = {
                    "peak_bytes": int(statistics.median(peaks)),
                    "held_bytes": int(statistics.median(helds)),
                }
    return result


def main(argv: list[str]) -> int:
    """``python -m benchmarks.process memory DIR``: print the memory result as JSON."""
    if len(argv) != 2 or argv[0] != "memory":
        print("usage: python -m benchmarks.process memory DIR", file=sys.stderr)
        return 2
    from benchmarks.models import quiet_transformers

    with quiet_transformers():
        print(json.dumps(_memory_worker(Path(argv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
