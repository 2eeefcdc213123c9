"""Benchmarks of transformer-bridge against the plain HF model (run ``python -m benchmarks``),
and side by side with TransformerLens and nnsight (``python -m benchmarks.compare``).

Not part of the shipped distribution. Modules, one concept each:

- `timing`: interleaved, shuffled rounds after warm-up; median and min.
- `models`: the three locally built models ("tiny", "small", "llava") and their inputs.
- `baselines`: the plain-HF baselines (torch and transformers only, runnable in any venv).
- `workloads`: what is timed on the bridge: its variants of each measured operation.
- `process`: measurements in fresh processes (import time, first wrap, peak memory).
- `report`: the markdown table and the JSON file.
- `run`: the command line, tying them together.
- `machine`: what the numbers were measured on.

The side-by-side comparison, each library in a process of its own:

- `tools`: the bridge's, TransformerLens's and nnsight's versions of each operation.
- `compare_worker`: one process: one library on one saved case, against HF in that process.
- `compare`: the command line: saves the cases, starts the workers, checks that their HF
  baselines agree.
- `compare_report`: its markdown tables.
"""
