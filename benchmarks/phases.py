"""``python -m benchmarks.phases``: where the per-hook-point time of one model goes.

`python -m benchmarks` answers "how much does the bridge cost against HF"; this answers
"which part of it": the same model's forward with no hooks, with one, with a no-op hook on
every point, attaching and removing those hooks without a forward, caching everything, and
``run_with_hooks`` with only one kind of point hooked (``hook_scale``, ``hook_pattern`` ...),
which shows what each kind of tap costs. Two rows measure the HF model without the bridge:
with ``--attn eager``, the forward that returns hidden states and attentions (the baseline of
caching everything in `python -m benchmarks`); and the forward with the PyTorch hooks that
the taps of every point register, each doing nothing, registered and removed per call as the
taps do. That is the floor of any hook point that observes an unchanged HF module: what
caching everything costs before a tap computes, runs or keeps anything. With ``--attn eager``
two more rows give the floor of keeping: HF's outputs call, then fresh memory written for
each tensor that a cache of everything keeps beyond HF's outputs (matched by size), kept to
the end of the call; and the same with each tensor dropped once written. A cache's tensors
are new memory on every call, where HF's forward reuses what it freed a layer before; the
two rows apart cost that (page faults, cold cache lines) without any hook or the calls that
write them. Everything is timed
interleaved (`benchmarks.timing`), one torch thread, the CPU clock, under ``torch.no_grad()``.
``--attn eager`` loads the saved model with eager attention, whose kernel computes the
patterns that the hooks then see (with sdpa, the bridge computes them beside the kernel).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks import models, timing
from bridge_core import HookPoint, TransformerBridge
from bridge_core.torch_hooks import TorchHook, forward_hook, forward_pre_hook

HOOKS_ALONE = "HF forward + the taps' PyTorch hooks, no-op"
HF_OUTPUTS = "HF forward, hidden states and attentions"
KEEPING = "HF outputs + the cache's other tensors written"
DROPPING = "HF outputs + those tensors written, each dropped at once"


def noop(tensor: torch.Tensor, hook: HookPoint) -> None:
    """A hook that only reads."""


def _nothing(*args: Any) -> None:
    """A PyTorch module hook (pre or post) that does nothing."""


def variants(bridge: TransformerBridge, case: models.Case) -> dict[str, timing.Variant]:
    """The phases of one model, and the forward with each kind of point hooked alone."""
    inputs, model = case.inputs, case.model
    one = f"blocks.{case.layer}.hook_resid_post"
    every = [(lambda name: True, noop)]

    def attach_detach() -> None:
        with bridge.hooks(every):
            pass

    runs: dict[str, timing.Variant] = {
        "HF forward": lambda: model(**inputs),
        "bridge forward": lambda: bridge(**inputs),
        "run_with_cache, one point": lambda: bridge.run_with_cache(**inputs, names_filter=one),
        "run_with_cache, every point": lambda: bridge.run_with_cache(**inputs),
        "run_with_hooks, one point": lambda: bridge.run_with_hooks(
            **inputs, fwd_hooks=[(one, noop)]
        ),
        "run_with_hooks, every point": lambda: bridge.run_with_hooks(**inputs, fwd_hooks=every),
        "attach + remove every point": attach_detach,
    }
    for kind in sorted(_kinds(bridge)):
        runs[f"run_with_hooks, every {kind}"] = _hooked(bridge, inputs, kind)
    runs[HOOKS_ALONE] = hooks_alone(model, tapped(bridge), inputs)
    if model.config._attn_implementation == "eager":
        runs[HF_OUTPUTS] = lambda: model(
            **inputs, output_hidden_states=True, output_attentions=True
        )
        sizes = kept_beyond_outputs(bridge, model, inputs)
        runs[KEEPING] = keeping(model, inputs, sizes)
        runs[DROPPING] = keeping(model, inputs, sizes, keep=False)
    return runs


def kept_beyond_outputs(
    bridge: TransformerBridge, model: nn.Module, inputs: dict[str, Any]
) -> list[int]:
    """The sizes in bytes of the storages that a cache of every point keeps and HF's outputs
    (hidden states and attentions) do not, in the cache's order, as on every call after the
    first: each storage of the outputs takes away one of the cache's of its size."""
    for _ in range(2):  # a point's first cache copies, until it knows whether it must
        _, cache = bridge.run_with_cache(**inputs)
    outputs = model(**inputs, output_hidden_states=True, output_attentions=True)
    left = Counter(_storage_sizes([*outputs.hidden_states, *outputs.attentions]))
    kept = []
    for size in _storage_sizes(cache.values()):
        if left[size]:
            left[size] -= 1
        else:
            kept.append(size)
    return kept


def _storage_sizes(tensors: Iterable[torch.Tensor]) -> list[int]:
    """The size of each distinct storage behind `tensors` (views and aliases once), in order."""
    sizes = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return list(sizes.values())


def keeping(
    model: nn.Module, inputs: dict[str, Any], sizes: list[int], keep: bool = True
) -> timing.Variant:
    """HF's outputs call, then a fresh tensor of each of `sizes` written, all kept until the
    call returns: the memory a cache keeps, without the hooks that fill it. With `keep`
    False each is dropped once written and the next reuses its memory: the same calls
    without the keeping, so that the two rows apart cost the keeping alone."""

    def run() -> tuple[Any, list[torch.Tensor]]:
        outputs = model(**inputs, output_hidden_states=True, output_attentions=True)
        kept = []
        for size in sizes:
            tensor = torch.empty(size, dtype=torch.uint8).fill_(1)
            if keep:
                kept.append(tensor)
        return outputs, kept

    return run


def tapped(bridge: TransformerBridge) -> list[tuple[nn.Module, int, int]]:
    """Each HF module that the taps hook while every point is hooked, with the number of
    forward pre-hooks and forward hooks they register on it."""
    modules = list(bridge.original_model.modules())
    before = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in modules]
    with bridge.hooks([(lambda name: True, noop)]):
        after = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in modules]
    return [
        (module, pre - pre_before, post - post_before)
        for module, (pre, post), (pre_before, post_before) in zip(
            modules, after, before, strict=True
        )
        if (pre, post) != (pre_before, post_before)
    ]


def hooks_alone(
    model: nn.Module, hooked: list[tuple[nn.Module, int, int]], inputs: dict[str, Any]
) -> timing.Variant:
    """The HF forward with `hooked`'s PyTorch hooks, each doing nothing, registered and
    removed per call the way the taps do it (`bridge_core.torch_hooks`)."""

    def run() -> None:
        handles: list[TorchHook] = []
        try:
            for module, pre, post in hooked:
                handles += [forward_pre_hook(module, _nothing) for _ in range(pre)]
                handles += [forward_hook(module, _nothing) for _ in range(post)]
            model(**inputs)
        finally:
            for handle in handles:
                handle.remove()

    return run


def _hooked(bridge: TransformerBridge, inputs: dict[str, Any], kind: str) -> timing.Variant:
    """``run_with_hooks`` with a no-op hook on every point of one kind."""
    hooks = [(lambda name: name.endswith("." + kind), noop)]
    return lambda: bridge.run_with_hooks(**inputs, fwd_hooks=hooks)


def _kinds(bridge: TransformerBridge) -> Counter[str]:
    """How many points of each kind (the last part of the name) are on."""
    return Counter(n.rpartition(".")[2] for n, p in bridge.hook_dict.items() if p.enabled)


def table(bridge: TransformerBridge, stats: dict[str, timing.Stats]) -> str:
    """Markdown: each variant's median and min, and its cost over the bridge's forward.

    Attaching and removing runs no forward: its cost is its time. The per-point cost of one
    kind of point is over ``run_with_hooks`` of one point, so that the call's own cost is not
    spread over the kind's points. The row of the taps' PyTorch hooks alone counts PyTorch
    hooks, not points, and is over the HF forward. Below the table, the ratios of `python -m
    benchmarks`: caching everything and the floors (the taps' hooks; with ``--attn eager`` also
    the keeping), over HF's forward with hidden states and attentions (with ``--attn eager``;
    else over the HF forward).
    """
    kinds = _kinds(bridge)
    every = sum(kinds.values())
    torch_hooks = sum(pre + post for _, pre, post in tapped(bridge))
    points = {name: kinds[name.removeprefix("run_with_hooks, every ")] for name in stats}
    points.update({"run_with_cache, one point": 1, "run_with_hooks, one point": 1})
    for name in ("run_with_cache, every point", "run_with_hooks, every point"):
        points[name] = every
    points["attach + remove every point"] = every
    points[HOOKS_ALONE] = torch_hooks
    base, one = stats["bridge forward"].median, stats["run_with_hooks, one point"].median
    hf = stats["HF forward"].median
    lines = [
        "| variant | points | median | min | over the bridge forward | per point |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, stat in stats.items():
        count = points.get(name, 0)
        over = stat.median - base
        if name == "attach + remove every point":
            over = stat.median  # no forward: its cost is its time
        if name == HOOKS_ALONE:  # no bridge: over the HF forward, per PyTorch hook
            over = stat.median - hf
        per_point = over / count if count else 0.0
        if name.startswith("run_with_hooks, every hook_"):  # less one point's call and hook
            per_point = (stat.median - one) / max(count - 1, 1)
        cells = [name, str(count or ""), f"{stat.median * 1e3:.3f} ms", f"{stat.min * 1e3:.3f} ms"]
        cells.append(f"{over * 1e3:+.3f} ms" if count else "")
        cells.append(f"{per_point * 1e6:.1f} us" if count else "")
        lines.append("| " + " | ".join(cells) + " |")
    baseline = stats[HF_OUTPUTS] if HF_OUTPUTS in stats else stats["HF forward"]
    label = HF_OUTPUTS if HF_OUTPUTS in stats else "HF forward"
    lines.append("")
    for name in ("run_with_cache, every point", HOOKS_ALONE, KEEPING, DROPPING):
        if name not in stats:
            continue
        ratio = stats[name].median / baseline.median
        lines.append(f"{name}, over the {label}: {ratio:.3f}x (medians)")
    if KEEPING in stats:
        kept = (stats[KEEPING].median - stats[DROPPING].median) / baseline.median
        lines.append(f"keeping the cache's other tensors (the two rows apart): +{kept:.3f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.phases", description=__doc__)
    parser.add_argument("--model", default="tiny", choices=models.MODELS)
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (default 7)")
    parser.add_argument(
        "--attn", choices=("sdpa", "eager"), default="sdpa", help="attention kernel (default sdpa)"
    )
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as root, models.quiet_transformers():
            case = models.build(args.model, Path(root))
            if args.attn != "sdpa":
                case = models.load(case.directory, attn_implementation=args.attn)
            bridge = TransformerBridge.wrap(
                case.model, tokenizer=case.tokenizer, processor=case.processor
            )
            with torch.no_grad():
                runs = variants(bridge, case)
                inner = timing.calibrate(runs["bridge forward"], timing.SAMPLE_S)
                stats = timing.interleave(runs, args.rounds, inner=inner, clock="cpu")
    finally:
        torch.set_num_threads(threads)
    print(f"{args.model} ({args.attn}): {args.rounds} rounds of {inner} calls, median and min")
    print(table(bridge, stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
