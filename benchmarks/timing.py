"""Interleaved timing: every variant once per round, in a fresh shuffled order, after warm-up.

Interleaving spreads slow drift of the machine (other processes, frequency changes) over
all variants alike; the median is robust to spikes and the min approximates the
undisturbed cost.

The garbage collector stays on while a sample runs, as it is in use: allocating many
small objects per call (hook handles, closures) costs collections, and that cost is part of
the overhead. The objects that exist before timing starts (models, modules, imports) are
frozen (`gc.freeze`), so a collection costs what the calls allocated and not the size of
the process, and a full collection runs between samples.
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Variant = Callable[[], object]
"""A zero-argument callable: one run of the operation being timed."""

SAMPLE_S = 0.1
"""A sample of a short call repeats it to last about this long (see `calibrate`)."""


@dataclass(frozen=True)
class Prepared:
    """A variant whose every call needs something fresh, made off the clock.

    For operations that change what they are given, such as wrapping a model with a library
    that replaces the model's modules: `setup` loads a fresh model before each call, and
    only `run` on it is timed.
    """

    setup: Callable[[], Any]
    run: Callable[[Any], object]

    def __call__(self) -> object:
        """One untimed call (warm-up, checks)."""
        return self.run(self.setup())


CLOCKS: dict[str, Callable[[], float]] = {
    "wall": time.perf_counter,
    "cpu": time.process_time,
}
"""``wall``: elapsed time. ``cpu``: CPU time of this process, which, with one torch thread,
is the elapsed time minus the time other processes held the cores (for busy machines)."""


@dataclass(frozen=True)
class Stats:
    """Seconds per call, one sample per round (each the mean of `inner` calls)."""

    samples: tuple[float, ...]
    inner: int = 1

    @property
    def median(self) -> float:
        """Median seconds per call."""
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        """Fastest sample, seconds per call."""
        return min(self.samples)

    def as_dict(self) -> dict[str, float | int | list[float]]:
        """JSON-ready summary."""
        return {
            "median_s": self.median,
            "min_s": self.min,
            "calls_per_sample": self.inner,
            "samples_s": list(self.samples),
        }


def sample(fn: Variant, inner: int = 1, clock: str = "wall") -> float:
    """Seconds per call of `fn` on `clock`, averaged over `inner` back-to-back calls
    (for a `Prepared` variant, the clock runs over its `run` calls only)."""
    now = CLOCKS[clock]
    gc.collect()  # cheap once `interleave` froze the objects that predate the timing
    if isinstance(fn, Prepared):
        total = 0.0
        for _ in range(inner):
            given = fn.setup()
            start = now()
            fn.run(given)
            total += now() - start
            del given
        return total / inner
    start = now()
    for _ in range(inner):
        fn()
    return (now() - start) / inner


def calibrate(fn: Variant, target_s: float, max_inner: int = 64) -> int:
    """Calls per sample so that one sample of `fn` lasts about `target_s` (at least one)."""
    once = min(sample(fn, clock="cpu") for _ in range(3))
    return max(1, min(max_inner, round(target_s / max(once, 1e-9))))


def interleave(
    variants: Mapping[str, Variant],
    rounds: int,
    warmup: int = 1,
    inner: int = 1,
    seed: int = 0,
    clock: str = "wall",
) -> dict[str, Stats]:
    """Time each variant `rounds` times, all variants once per round in a shuffled order.

    Args:
        variants: name -> callable.
        rounds: samples per variant.
        warmup: untimed calls of every variant first (lazy init, allocator, caches).
        inner: calls per sample (for calls too short to time one by one).
        seed: seed of the shuffling, so that a run is reproducible in its order.
        clock: "wall" or "cpu" (see `CLOCKS`).

    Returns:
        name -> Stats, in the order of `variants`.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {name: [] for name in names}
    order = list(names)
    gc.collect()
    gc.freeze()  # the models and modules stay alive anyway: keep them out of every collection
    try:
        for _ in range(rounds):
            rng.shuffle(order)
            for name in order:
                samples[name].append(sample(variants[name], inner, clock))
    finally:
        gc.unfreeze()
    return {name: Stats(tuple(samples[name]), inner) for name in names}
