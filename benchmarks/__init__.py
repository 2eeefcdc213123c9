"""Benchmarks of transformer-bridge against the plain HF model (run ``python -m benchmarks``).

Not part of the shipped distribution. Modules, one concept each:

- `timing`: interleaved, shuffled rounds after warm-up; median and min.
- `models`: the three locally built models ("tiny", "small", "llava") and their inputs.
- `baselines`: the plain-HF baselines (torch and transformers only, runnable in any venv).
- `workloads`: what is timed on the bridge: its variants of each measured operation.
- `external`: optional TransformerLens / nnsight columns, when they are importable.
- `process`: measurements in fresh processes (import time, first wrap, peak memory).
- `report`: the markdown table and the JSON file.
- `run`: the command line, tying them together.
"""
