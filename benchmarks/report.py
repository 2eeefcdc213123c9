"""The results as markdown tables (stdout, docs/performance.md) and a JSON file.

Everything here works on the JSON-ready result dictionary that `benchmarks.run` builds, so
a saved JSON file can be rendered again with `markdown`.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Result = dict[str, Any]


@dataclass(frozen=True)
class Metric:
    """One timed comparison: a bridge variant against an HF baseline."""

    key: str
    label: str
    hf: str
    bridge: str
    targets: dict[str, float] | None = None  # issue 16's ratio targets, by model ("*": all)

    def target(self, model: str) -> float | None:
        """The ratio target for `model`, if the issues set one."""
        if self.targets is None:
            return None
        return self.targets.get(model, self.targets.get("*"))


ALL = {"*": 1.01}
CACHE_ALL = {"tiny": 1.25, "llava": 1.15, "small": 1.05}
METRICS = (
    Metric("forward", "forward, no hooks", "hf_forward", "bridge_forward", ALL),
    Metric(
        "cache_all", "run_with_cache, everything, sdpa model (HF: eager, hidden+attentions)",
        "hf_outputs", "bridge_cache_all", CACHE_ALL,
    ),
    Metric(
        "cache_all_eager", "run_with_cache, everything, over HF's eager copy (like for like)",
        "hf_outputs", "bridge_cache_all_eager", CACHE_ALL,
    ),
    Metric(
        "cache_all_copied", "run_with_cache, everything, every tensor copied", "hf_outputs",
        "bridge_cache_all_copied",
    ),
    Metric(
        "cache_all_results", "run_with_cache, everything + attn.hook_result", "hf_outputs",
        "bridge_cache_all_results",
    ),
    Metric(
        "cache_hf_set", "run_with_cache, HF's set (resid_pre, ln_final, patterns)", "hf_outputs",
        "bridge_cache_hf_set",
    ),
    Metric("cache_one", "run_with_cache, one hook", "hf_forward", "bridge_cache_one", ALL),
    Metric(
        "cache_one_vs_torch", "run_with_cache, one hook (HF: a torch hook)", "hf_torch_save",
        "bridge_cache_one",
    ),
    Metric(
        "ablate", "run_with_hooks, one head zeroed (HF: a torch pre-hook)", "hf_torch_ablate",
        "bridge_ablate",
    ),
    Metric("boot", "boot from a local dir (HF: from_pretrained)", "hf_from_pretrained",
           "bridge_boot", {"*": 1.05}),
)  # fmt: skip
WRAP_TARGET_S = 0.02
IMPORT_TARGET_S = 0.10


def seconds(value: float) -> str:
    """A duration with three significant digits (us, ms or s)."""
    if value < 1e-3:
        return f"{value * 1e6:.3g} us"
    return f"{value * 1e3:.3g} ms" if value < 1 else f"{value:.3g} s"


def mib(value: float | None) -> str:
    """Bytes as KiB below one MiB, else MiB."""
    if value is None:
        return "n/a"
    return f"{value / 2**10:.0f} KiB" if abs(value) < 2**20 else f"{value / 2**20:.1f} MiB"


def _stat(timings: dict[str, Any], name: str) -> tuple[float, float] | None:
    entry = timings.get(name)
    return None if entry is None else (entry["median_s"], entry["min_s"])


def _pair(stat: tuple[float, float] | None) -> str:
    return "n/a" if stat is None else f"{seconds(stat[0])} / {seconds(stat[1])}"


def ratio(timings: dict[str, Any], over: str, under: str) -> tuple[float, float] | None:
    """(median ratio, min ratio) of variant `over` to variant `under`, if both were timed."""
    a, b = _stat(timings, over), _stat(timings, under)
    return None if a is None or b is None else (a[0] / b[0], a[1] / b[1])


def verdict(value: float, target: float | None) -> str:
    """`met` or `MISSED` against an upper bound (on the median); empty without a target."""
    if target is None:
        return ""
    return "met" if value <= target else "MISSED"


def timing_table(result: Result) -> str:
    """One row per model and metric: HF and bridge median / min, ratios, target."""
    head = ["model", "metric", "HF median / min", "bridge median / min", "bridge - HF (median)"]
    head += ["ratio median (min)", "target", "verdict"]
    lines = [row(head), row(["---"] * len(head))]
    for name, model in result["models"].items():
        timings = model["timings"]
        for metric in METRICS:
            if metric.hf not in timings and metric.bridge not in timings:
                continue
            r = ratio(timings, metric.bridge, metric.hf)
            shown = "n/a" if r is None else f"{r[0]:.3f}x ({r[1]:.3f}x)"
            bound = metric.target(name)
            target = "" if bound is None else f"<= {bound:.2f}x"
            judged = verdict(r[0], bound) if r else ""
            cells = [name, metric.label, _pair(_stat(timings, metric.hf))]
            cells += [_pair(_stat(timings, metric.bridge)), _difference(timings, metric)]
            cells += [shown, target, judged]
            lines.append(row(cells))
        wrap = _stat(timings, "bridge_wrap")
        if wrap is not None:
            judged = verdict(wrap[0], WRAP_TARGET_S)
            cells = [name, "wrap the in-memory model", "", _pair(wrap), "", ""]
            cells += ["<= 20 ms", judged]
            lines.append(row(cells))
    return "\n".join(lines)


def _difference(timings: dict[str, Any], metric: Metric) -> str:
    """The bridge's extra time per call (median minus median), signed."""
    a, b = _stat(timings, metric.bridge), _stat(timings, metric.hf)
    if a is None or b is None:
        return "n/a"
    delta = a[0] - b[0]
    return ("+" if delta >= 0 else "-") + seconds(abs(delta))


def process_table(result: Result) -> str:
    """Fresh-process rows: import time, first and second wrap."""
    process = result.get("process")
    if not process:
        return ""
    labels = {
        "import_s": ("`import bridge_core` after torch + transformers", IMPORT_TARGET_S),
        "first_wrap_s": ("first wrap in the process (loads the registry), tiny", None),
        "second_wrap_s": ("second wrap, tiny", WRAP_TARGET_S),
    }
    lines = [row(["fresh process", "median / min", "target", "verdict"]), row(["---"] * 4)]
    for key, (label, target) in labels.items():
        samples = process[key]
        median = statistics.median(samples)
        shown = "" if target is None else f"<= {seconds(target)}"
        lines.append(
            row([label, f"{seconds(median)} / {seconds(min(samples))}", shown,
                  verdict(median, target)])
        )  # fmt: skip
    return "\n".join(lines)


def _breakdown(result: Result) -> list[str]:
    """One line naming the slowest modules that ``import bridge_core`` imports, if measured."""
    found = result.get("import_breakdown")
    if not found:
        return []
    shown = ", ".join(f"{e['module']} {seconds(e['self_s'])}" for e in found)
    return [f"Slowest modules under `import bridge_core` (self time, one run): {shown}", ""]


def memory_table(result: Result) -> str:
    """Cache sizes and peak RSS per model."""
    head = ["model", "cache entries (names incl. aliases)", "cache unique bytes"]
    head += ["if aliases stored again", "HF hidden+attentions", "peak RSS: HF fwd / bridge fwd"]
    head += ["peak RSS: HF outputs / bridge cache all / bridge HF's set"]
    lines = [row(head), row(["---"] * len(head))]
    for name, model in result["models"].items():
        cache, memory = model.get("cache"), model.get("memory", {})
        if not cache:
            continue

        def peak(run: str, memory: dict[str, Any] = memory) -> str:
            entry = memory.get(run)
            return mib(None if entry is None else entry["peak_bytes"])

        lines.append(
            row([
                name,
                f"{cache['entries']} ({cache['names_incl_aliases']})",
                mib(cache["unique_bytes"]),
                mib(cache["bytes_if_aliases_stored_separately"]),
                f"{mib(cache['hf_outputs_unique_bytes'])} ({cache['hf_outputs_tensors']} tensors)",
                f"{peak('hf_forward')} / {peak('bridge_forward')}",
                f"{peak('hf_outputs')} / {peak('bridge_cache_all')} / "
                f"{peak('bridge_cache_hf_set')}",
            ])
        )  # fmt: skip
    return "\n".join(lines)


def checks_lines(result: Result) -> str:
    """The bitwise checks per model, as a bullet list."""
    lines = []
    for name, model in result["models"].items():
        checks = model.get("checks", {})
        if not checks:
            lines.append(f"- {name}: {model.get('bridge_note') or 'no checks'}")
            continue
        failed = [key for key, ok in checks.items() if not ok]
        status = "all hold" if not failed else "FAILED: " + ", ".join(failed)
        lines.append(f"- {name}: {status} ({', '.join(checks)})")
    return "\n".join(lines)


def markdown(result: Result) -> str:
    """The whole report: machine, command, timing, process and memory tables, checks, notes."""
    machine = result["machine"]
    settings = result["settings"]
    parts = [
        f"Machine: {machine['summary']}",
        f"Command: `{result['command']}` ({settings['rounds']} rounds, shuffled, after "
        f"{settings['warmup']} warm-up; {settings['torch_threads']} torch thread(s); "
        f"{settings['clock']} clock; ratio = bridge / HF)",
        "",
        timing_table(result),
        "",
        process_table(result),
        "",
        *_breakdown(result),
        memory_table(result),
        "",
        "Bitwise checks:",
        "",
        checks_lines(result),
    ]
    notes = [f"- {n}: {note}" for n, m in result["models"].items() for note in m.get("notes", [])]
    if notes:
        parts += ["", "Notes:", "", *notes]
    return "\n".join(parts) + "\n"


def write_json(
    result: Result, out: Path, name: str = "benchmark", latest: str = "latest.json"
) -> Path:
    """Write the result to ``out/<name>-<time>.json`` and ``out/<latest>``."""
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2)
    path = out / time.strftime(f"{name}-%Y%m%d-%H%M%S.json")
    path.write_text(text)
    (out / latest).write_text(text)
    return path


def row(cells: list[str]) -> str:
    """One markdown table row."""
    return "| " + " | ".join(cells) + " |"
