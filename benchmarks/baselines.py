"""The plain-HF baselines: what a skeptical user writes without any hooking library.

Only torch, transformers and `benchmarks.models` are imported here, so that the same
baselines run unchanged in every process of the side-by-side comparison (`benchmarks.compare`),
including those of a separate virtual environment where transformer-bridge is not installed.

- ``hf_forward``: ``model(**inputs)``.
- ``hf_outputs``: ``model(**inputs, output_hidden_states=True, output_attentions=True)`` on an
  eager-attention copy (with sdpa, transformers returns no attentions).
- ``hf_torch_save`` / ``hf_torch_ablate``: a plain ``register_forward_hook`` /
  ``register_forward_pre_hook`` attached for the call and removed after it, saving one
  block's output / zeroing one head before the attention output projection.
- ``hf_from_pretrained``: ``from_pretrained`` of the saved directory, with the model's class.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from benchmarks.models import Case
from benchmarks.timing import Variant

Runs = dict[str, Variant]


def logits_of(output: Any) -> torch.Tensor:
    """Logits of an HF output or of a hooked run's result (logits, or (logits, cache))."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return logits_of(output[0])
    logits: torch.Tensor = output.logits
    return logits


def hf_runs(case: Case, eager: Any) -> Runs:
    """The per-call HF baselines (`eager`: the same weights with eager attention)."""
    model, inputs = case.model, case.inputs
    block = case.hf_module(case.block_path)
    o_proj = case.hf_module(case.o_proj_path)
    head, d_head = case.head, case.d_head

    def save(module: nn.Module, args: Any, output: Any) -> None:
        saved.append(output[0] if isinstance(output, tuple) else output)

    def ablate(module: nn.Module, args: tuple[Any, ...]) -> None:
        x: torch.Tensor = args[0]
        x.view(*x.shape[:-1], -1, d_head)[:, :, head] = 0.0

    saved: list[torch.Tensor] = []

    def torch_save() -> Any:
        saved.clear()
        handle = block.register_forward_hook(save)
        try:
            return model(**inputs), saved[0]
        finally:
            handle.remove()

    def torch_ablate() -> Any:
        handle = o_proj.register_forward_pre_hook(ablate)
        try:
            return model(**inputs)
        finally:
            handle.remove()

    return {
        "hf_forward": lambda: model(**inputs),
        "hf_outputs": lambda: eager(**inputs, output_hidden_states=True, output_attentions=True),
        "hf_torch_save": torch_save,
        "hf_torch_ablate": torch_ablate,
    }


def from_pretrained_run(case: Case) -> Variant:
    """HF's `from_pretrained` of the saved directory, with the class that was saved."""
    directory, model_class = case.directory, case.model_class
    return lambda: model_class.from_pretrained(directory)


def unique_nbytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views and aliases counted once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())
