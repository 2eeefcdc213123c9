"""Optional comparison columns: TransformerLens and nnsight, when they are importable.

Neither is a dependency of transformer-bridge. When one is installed, its versions of the
same operations on the same HF model are timed in the same rounds; a step it cannot do
(or an API that changed) becomes a note instead of a failure.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.models import Case
from benchmarks.timing import Variant

TOOLS = {"transformer_lens": "TransformerLens", "nnsight": "nnsight"}


def installed() -> list[str]:
    """The comparison tools importable here (module names)."""
    return [name for name in TOOLS if importlib.util.find_spec(name) is not None]


def zero_head_any(head: int, d_head: int) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """Zero one head of ``hook_z``, given per head (4-d) or flattened (3-d)."""

    def ablate(z: torch.Tensor, hook: Any) -> torch.Tensor:
        heads = z if z.dim() == 4 else z.view(*z.shape[:-1], -1, d_head)
        heads[:, :, head] = 0.0
        return z

    return ablate


def runs(tool: str, case: Case) -> tuple[dict[str, Variant], list[str]]:
    """The tool's variants (``"<tool>:<metric>"``) that work on `case`, and notes on the rest."""
    build = {"transformer_lens": _transformer_lens, "nnsight": _nnsight}[tool]
    notes: list[str] = []
    try:
        candidates = build(case)
    except Exception as exc:  # an optional tool: any failure is reported, not raised
        return {}, [f"{TOOLS[tool]}: cannot wrap the model ({type(exc).__name__}: {exc})"]
    working: dict[str, Variant] = {}
    for metric, run in candidates.items():
        try:
            with torch.no_grad():
                run()
        except Exception as exc:  # same: the column shows n/a with the reason
            notes.append(f"{TOOLS[tool]} {metric}: {type(exc).__name__}: {exc}"[:200])
            continue
        working[f"{tool}:{metric}"] = run
    return working, notes


def _transformer_lens(case: Case) -> dict[str, Variant]:
    LensBridge = importlib.import_module("transformer_lens.model_bridge").TransformerBridge

    if case.processor is not None:
        raise NotImplementedError("only the text models are compared")

    def wrap() -> Any:
        return LensBridge.boot_transformers(str(case.directory), hf_model=case.model, device="cpu")

    lens = wrap()
    inputs = case.inputs["input_ids"]
    resid = f"blocks.{case.layer}.hook_resid_post"
    ablation = [(f"blocks.{case.layer}.attn.hook_z", zero_head_any(case.head, case.d_head))]
    return {
        "wrap": wrap,
        "forward": lambda: lens(inputs),
        "cache_all": lambda: lens.run_with_cache(inputs),
        "cache_one": lambda: lens.run_with_cache(inputs, names_filter=resid),
        "ablate": lambda: lens.run_with_hooks(inputs, fwd_hooks=ablation),
    }


def _nnsight(case: Case) -> dict[str, Variant]:
    NNsight = importlib.import_module("nnsight").NNsight

    model = NNsight(case.model)
    inputs, head, d_head = case.inputs, case.head, case.d_head

    def envoy(path: str) -> Any:
        found: Any = model
        for part in path.split("."):
            found = found[int(part)] if part.isdigit() else getattr(found, part)
        return found

    def forward() -> Any:
        with model.trace(**inputs):
            logits = model.output.save()
        return logits

    def cache_one() -> Any:
        with model.trace(**inputs):
            saved = envoy(case.block_path).output[0].save()
            logits = model.output.save()
        return logits, saved

    def ablate() -> Any:
        with model.trace(**inputs):
            z = envoy(case.o_proj_path).input
            z[:, :, head * d_head : (head + 1) * d_head] = 0.0
            logits = model.output.save()
        return logits

    return {
        "wrap": lambda: NNsight(case.model),
        "forward": forward,
        "cache_one": cache_one,
        "ablate": ablate,
    }
