"""What is timed: each operation as a user runs it on the HF model and on the bridge.

Baselines are what a skeptical user would write without the bridge:

- ``hf_forward``: ``model(**inputs)``.
- ``hf_outputs``: ``model(**inputs, output_hidden_states=True, output_attentions=True)`` on an
  eager-attention copy (with sdpa, transformers returns no attentions). The bridge's
  ``run_with_cache`` of everything caches far more (every hook point); ``bridge_cache_hf_set``
  caches just what HF returns, for a like-for-like comparison.
- ``hf_torch_save`` / ``hf_torch_ablate``: a plain ``register_forward_hook`` /
  ``register_forward_pre_hook`` attached for the call and removed after it, saving one
  block's output / zeroing one head before the attention output projection.

The bridge variants do the same through hook names. `check` verifies the claims the
timings rest on (bitwise-equal logits, the same cached and ablated values) before timing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from benchmarks.models import Case
from benchmarks.timing import Variant
from bridge_core import ActivationCache, HookPoint, TransformerBridge
from bridge_core.errors import AdapterNotFoundError, BridgeError

Runs = dict[str, Variant]


@dataclass(frozen=True)
class Names:
    """Hook names of a case's hooked block."""

    resid_post: str
    hook_z: str

    @classmethod
    def of(cls, case: Case) -> Names:
        return cls(f"blocks.{case.layer}.hook_resid_post", f"blocks.{case.layer}.attn.hook_z")


def wrap(case: Case) -> tuple[TransformerBridge | None, str]:
    """The case's bridge, or None and why not (e.g. no adapter for the architecture)."""
    try:
        bridge = TransformerBridge.wrap(
            case.model, tokenizer=case.tokenizer, processor=case.processor
        )
    except AdapterNotFoundError as exc:
        return None, f"no bridge: {str(exc).split('.')[0]}"
    except BridgeError as exc:
        return None, f"no bridge: {type(exc).__name__}: {exc}"
    return bridge, ""


def logits_of(output: Any) -> torch.Tensor:
    """Logits of an HF output or of a bridge result (logits, or (logits, cache))."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return logits_of(output[0])
    logits: torch.Tensor = output.logits
    return logits


def zero_head(head: int) -> Callable[[torch.Tensor, HookPoint], torch.Tensor]:
    """TransformerLens's head ablation: ``z[:, :, head] = 0`` on ``hook_z``."""

    def ablate(z: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        z[:, :, head] = 0.0
        return z

    return ablate


def hf_runs(case: Case, eager: Any) -> Runs:
    """The HF baselines (`eager`: the same weights with eager attention)."""
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


def hf_output_names(bridge: TransformerBridge) -> list[str]:
    """The hook names holding what HF returns with hidden states and attentions.

    Each block's input, the final norm's output (HF's last hidden state) and each
    block's attention pattern (of the language model, for a multimodal model).
    """
    layers = range(bridge.cfg.n_layers)
    return [
        *(f"blocks.{i}.hook_resid_pre" for i in layers),
        "ln_final.hook_out",
        *(f"blocks.{i}.attn.hook_pattern" for i in layers),
    ]


def bridge_runs(case: Case, bridge: TransformerBridge) -> Runs:
    """The bridge's versions of the same operations, and what cache protection and the opt-in
    ``hook_result`` cost (each on a bridge of its own over the same model)."""
    inputs, names = case.inputs, Names.of(case)
    ablation = [(names.hook_z, zero_head(case.head))]
    hf_set = hf_output_names(bridge)
    copying, results = _copying_bridge(case), _result_bridge(case)
    return {
        "bridge_forward": lambda: bridge(**inputs),
        "bridge_cache_all": lambda: bridge.run_with_cache(**inputs),
        "bridge_cache_all_copied": lambda: copying.run_with_cache(**inputs),
        "bridge_cache_all_results": lambda: results.run_with_cache(**inputs),
        "bridge_cache_hf_set": lambda: bridge.run_with_cache(**inputs, names_filter=hf_set),
        "bridge_cache_one": lambda: bridge.run_with_cache(**inputs, names_filter=names.resid_post),
        "bridge_ablate": lambda: bridge.run_with_hooks(**inputs, fwd_hooks=ablation),
    }


def _copying_bridge(case: Case) -> TransformerBridge:
    """A bridge whose caches copy every activation (as if each were changed in place later).

    Caches copy a point's tensor on its first cache and afterwards only where the model was
    seen changing it; this bridge shows the cost of copying everything, every time.
    """
    bridge = TransformerBridge.wrap(case.model, tokenizer=case.tokenizer, processor=case.processor)
    for point in bridge.hook_dict.values():
        point.copy_on_cache = True
    return bridge


def _result_bridge(case: Case) -> TransformerBridge:
    """A bridge with the opt-in ``attn.hook_result`` on (caching everything includes it)."""
    bridge = TransformerBridge.wrap(case.model, tokenizer=case.tokenizer, processor=case.processor)
    bridge.set_use_attn_result(True)
    return bridge


def load_runs(case: Case, with_bridge: bool = True) -> Runs:
    """Loading from the saved directory: HF's `from_pretrained` of the same class vs `boot`."""
    directory, model_class = case.directory, case.model_class
    runs: Runs = {"hf_from_pretrained": lambda: model_class.from_pretrained(directory)}
    if with_bridge:
        runs["bridge_boot"] = lambda: TransformerBridge.boot(directory)
    return runs


def wrap_run(case: Case) -> Variant:
    """Wrapping the in-memory model (the registry is already loaded)."""
    model, tokenizer, processor = case.model, case.tokenizer, case.processor
    return lambda: TransformerBridge.wrap(model, tokenizer=tokenizer, processor=processor)


def check(case: Case, hf: Runs, bridge: Runs | None) -> dict[str, bool]:
    """Correctness behind the timings, each compared bitwise (``torch.equal``)."""
    if bridge is None:
        return {}
    name = Names.of(case).resid_post
    reference = logits_of(hf["hf_forward"]())
    _, saved = cast(tuple[Any, torch.Tensor], hf["hf_torch_save"]())
    logits, cache = cast(tuple[torch.Tensor, ActivationCache], bridge["bridge_cache_all"]())
    one_logits, one = cast(tuple[torch.Tensor, ActivationCache], bridge["bridge_cache_one"]())
    ablated = logits_of(bridge["bridge_ablate"]())
    return {
        "forward_bitwise_equal": torch.equal(logits_of(bridge["bridge_forward"]()), reference),
        "cache_all_logits_bitwise_equal": torch.equal(logits, reference),
        "cache_all_equals_torch_hook": torch.equal(cache[name], saved),
        "cache_one_logits_bitwise_equal": torch.equal(one_logits, reference),
        "cache_one_equals_torch_hook": torch.equal(one[name], saved) and len(one) == 1,
        "ablation_equals_torch_hook": torch.equal(ablated, logits_of(hf["hf_torch_ablate"]())),
        "ablation_changes_logits": not torch.equal(ablated, reference),
    }


def cache_stats(case: Case, bridge: TransformerBridge, eager: Any) -> dict[str, int]:
    """Sizes of a full cache: entries, names, bytes naively and with each storage once."""
    _, cache = bridge.run_with_cache(**case.inputs)
    aliases = bridge.hook_aliases()
    aliased = [alias for alias, target in aliases.items() if target in cache.cache_dict]
    per_entry = sum(t.nbytes for t in cache.values())
    alias_copies = sum(cache.cache_dict[aliases[a]].nbytes for a in aliased)
    outputs = eager(**case.inputs, output_hidden_states=True, output_attentions=True)
    hf_tensors = [t for t in (*outputs.hidden_states, *(outputs.attentions or ())) if t is not None]
    return {
        "entries": len(cache),
        "names_incl_aliases": len(cache) + len(aliased),
        "bytes_per_entry_sum": per_entry,
        "bytes_if_aliases_stored_separately": per_entry + alias_copies,
        "unique_bytes": cache.unique_nbytes(),
        "hf_outputs_tensors": len(hf_tensors),
        "hf_outputs_unique_bytes": _unique_nbytes(hf_tensors),
    }


def _unique_nbytes(tensors: list[torch.Tensor]) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())
