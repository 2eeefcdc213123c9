"""The side-by-side comparison as markdown: ratios, what each library caches, the baselines'
agreement across processes, the checks against HF, the processes' versions.

Everything here reads the JSON-ready dictionary that `benchmarks.compare` builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from benchmarks.report import mib, row, seconds
from benchmarks.tools import TOOLS

Result = dict[str, Any]


@dataclass(frozen=True)
class Compared:
    """One metric of the comparison: a library's operation and its HF baseline."""

    key: str
    label: str
    hf: str


METRICS = (
    Compared("forward", "forward, no hooks", "hf_forward"),
    Compared(
        "cache_all", "run_with_cache, everything (HF: hidden states + attentions, eager)",
        "hf_outputs",
    ),
    Compared("cache_one", "run_with_cache, one hook (HF: forward)", "hf_forward"),
    Compared("ablate", "one head zeroed (HF: a torch pre-hook)", "hf_torch_ablate"),
    Compared("boot", "boot from the saved directory (HF: from_pretrained)", "hf_from_pretrained"),
    Compared("wrap", "wrap the loaded model: time (x from_pretrained)", "hf_from_pretrained"),
)  # fmt: skip
BASELINES = tuple(dict.fromkeys(metric.hf for metric in METRICS))
CHECKS = {
    "forward_logits": "forward logits",
    "cache_all_logits": "cache-all logits",
    "cache_one_logits": "cache-one logits",
    "cache_one_value": "cached block output (HF: torch hook)",
    "ablate_logits": "ablated logits (HF: torch pre-hook)",
    "ablation_changes_logits": "ablation moves logits by",
}
REFUSED = "†"


def markdown(result: Result) -> str:
    """The whole report."""
    machine, settings = result["machine"], result["settings"]
    loads = (machine["load_average_start"], machine["load_average_end"])
    load = " / ".join(f"{values[0]:.2f}" for values in loads)
    parts = [
        f"Machine: {machine['summary']}; load average (1 min) {load} at the start / end",
        f"Command: `{result['command']}` ({settings['rounds']} rounds, shuffled, after "
        f"{settings['warmup']} warm-up; {settings['torch_threads']} torch thread(s); "
        f"{settings['clock']} clock; {settings['legs']} leg(s)). Each library runs in processes "
        "of its own, one per leg, with the rounds split among the legs and the samples pooled; "
        "ratio = the library's median (min) over the median (min) of the plain HF baseline "
        "measured in the same processes, in the same rounds.",
        "",
        ratio_table(result),
        *_refusals(result),
        "",
        "What each library's run_with_cache of everything holds (entries; tensor bytes, each "
        "storage once). The libraries cache different sets, so the counts are not the same "
        "thing measured three times:",
        "",
        cache_table(result),
        "",
        "HF baselines across the libraries' processes (median in each library's processes; "
        "spread = slowest / fastest - 1):",
        "",
        agreement_table(result),
        "",
        "Checks against HF in each process (max |difference|; `bitwise` when equal; the "
        "logits against HF's sdpa model, or its eager copy where that is closer):",
        "",
        checks_table(result),
        "",
        process_table(result),
    ]
    notes = list(dict.fromkeys(
        note for model in result["models"].values() for worker in model["workers"].values()
        for note in worker.get("notes", [])
    ))  # fmt: skip
    if notes:
        parts += ["", "Notes:", "", *(f"- {note}" for note in notes)]
    if result["problems"]:
        parts += ["", "Problems (exit status 1):", "", *(f"- {p}" for p in result["problems"])]
    else:
        parts += ["", "All checks hold; the HF baselines agree across processes."]
    return "\n".join(parts) + "\n"


def _tools(result: Result) -> list[str]:
    return list(result["settings"]["tools"])


def _timing(worker: dict[str, Any], name: str) -> tuple[float, float] | None:
    entry = worker.get("timings", {}).get(name)
    return None if entry is None else (entry["median_s"], entry["min_s"])


def ratio_cell(worker: dict[str, Any], metric: Compared, refused: bool) -> str:
    """``median ratio (min ratio)``, or for wrap its time and ratio; n/a when not measured."""
    mine, hf = _timing(worker, metric.key), _timing(worker, metric.hf)
    if mine is None or hf is None:
        return "n/a"
    mark = f" {REFUSED}" if refused else ""
    if metric.key == "wrap":
        return f"{seconds(mine[0])} ({mine[0] / hf[0]:.2f}x){mark}"
    return f"{mine[0] / hf[0]:.2f}x ({mine[1] / hf[1]:.2f}x){mark}"


def ratio_table(result: Result) -> str:
    """One row per model and metric: each process's HF median, each library's ratio."""
    names = _tools(result)
    head = ["model", "metric", "HF median (" + " / ".join(TOOLS[t] for t in names) + " processes)"]
    lines = [row(head + [TOOLS[t] for t in names]), row(["---"] * (len(names) + 3))]
    for model, entry in result["models"].items():
        workers, refused = entry["workers"], not entry["agreement"]["ok"]
        for metric in METRICS:
            hf = [_timing(workers[t], metric.hf) for t in names]
            baseline = " / ".join("n/a" if h is None else seconds(h[0]) for h in hf)
            cells = [ratio_cell(workers[t], metric, refused) for t in names]
            lines.append(row([model, metric.label, baseline, *cells]))
    return "\n".join(lines)


def _refusals(result: Result) -> list[str]:
    refused = [
        f"{REFUSED} {model}: not comparable across processes: "
        + "; ".join(entry["agreement"]["problems"])
        for model, entry in result["models"].items()
        if not entry["agreement"]["ok"]
    ]
    return ["", *refused] if refused else []


def cache_table(result: Result) -> str:
    """Per model and library: the entries and bytes of a full cache."""
    names = _tools(result)
    what: dict[str, str] = {}
    for entry in result["models"].values():
        for tool in names:
            what.setdefault(tool, entry["workers"][tool].get("caches", ""))
    head = ["model", *(f"{TOOLS[t]}: {what[t]}" if what[t] else TOOLS[t] for t in names)]
    lines = [row(head), row(["---"] * len(head))]
    for model, entry in result["models"].items():
        cells = []
        for tool in names:
            cache = entry["workers"][tool].get("cache")
            cells.append(
                "n/a" if cache is None else f"{cache['entries']} ({mib(cache['unique_bytes'])})"
            )
        lines.append(row([model, *cells]))
    return "\n".join(lines)


def agreement_table(result: Result) -> str:
    """Per model and baseline: the medians of each process, their spread and the verdict."""
    names = _tools(result)
    head = ["model", "baseline", " / ".join(TOOLS[t] for t in names), "spread", "tolerance", ""]
    lines = [row(head), row(["---"] * len(head))]
    for model, entry in result["models"].items():
        agreement = entry["agreement"]
        for baseline, found in agreement["baselines"].items():
            medians = " / ".join(
                seconds(found["medians_s"][t]) if t in found["medians_s"] else "n/a" for t in names
            )
            verdict = "agree" if found["spread"] <= found["tolerance"] else "NOT COMPARABLE"
            spread, tolerance = f"{found['spread']:.1%}", f"{found['tolerance']:.0%}"
            lines.append(row([model, baseline, medians, spread, tolerance, verdict]))
        digests = agreement["hf_logits_sha256"]
        same = len(set(digests.values())) <= 1
        shown = next(iter(digests.values()), "n/a") if same else " / ".join(digests.values())
        verdict = "identical" if same else "DIFFERENT"
        lines.append(row([model, "HF logits (sha256, first 16)", shown, "", "", verdict]))
    return "\n".join(lines)


def check_cell(outcome: dict[str, Any] | None) -> str:
    """A check's outcome in a few characters."""
    if outcome is None:
        return "n/a"
    if outcome.get("bitwise"):
        shown = "bitwise"
    else:
        shown = f"{outcome['max_abs_diff']:.1e}"
        if "eager" in outcome.get("against", ""):
            shown += " (eager)"
    return shown if outcome["ok"] else f"{shown} FAILED"


def checks_table(result: Result) -> str:
    """Per model and library: each check against HF."""
    lines = [row(["model", "library", *CHECKS.values()]), row(["---"] * (len(CHECKS) + 2))]
    for model, entry in result["models"].items():
        for tool in _tools(result):
            worker = entry["workers"][tool]
            if "failed" in worker:
                cells = [f"failed: {worker['failed']}"[:120], *([""] * (len(CHECKS) - 1))]
            else:
                checks = worker.get("checks", {})
                cells = [check_cell(checks.get(key)) for key in CHECKS]
            lines.append(row([model, TOOLS[tool], *cells]))
    return "\n".join(lines)


def process_table(result: Result) -> str:
    """Each library's process: its Python, the library's version, torch and transformers, and
    glibc's malloc settings."""
    seen: dict[str, dict[str, Any]] = {}
    for entry in result["models"].values():
        for tool, worker in entry["workers"].items():
            if "process" in worker:
                seen.setdefault(tool, worker)
    columns = ["library", "version", "Python", "torch", "transformers", "malloc"]
    lines = [row(columns), row(["---"] * len(columns))]
    for tool, worker in seen.items():
        process = worker["process"]
        malloc = " ".join(f"{k}={v}" for k, v in process.get("malloc", {}).items())
        lines.append(row([
            TOOLS[tool], worker.get("version", "n/a"), f"`{process['executable']}`",
            process["torch"], process["transformers"],
            malloc or "glibc's defaults",
        ]))  # fmt: skip
    return "\n".join(lines)
