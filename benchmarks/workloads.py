"""What is timed on the bridge: each operation as a user runs it through hook names.

The HF baselines they are compared with are in `benchmarks.baselines`. The bridge's
``run_with_cache`` of everything caches far more than HF's ``hf_outputs`` (every hook point);
``bridge_cache_hf_set`` caches just what HF returns, for a like-for-like comparison.
``hf_outputs`` runs an eager-attention copy of the model (the kernel that returns the
patterns); ``bridge_cache_all`` runs the model as loaded (sdpa), beside whose fused kernel the
bridge computes every pattern a second time, and ``bridge_cache_all_eager`` bridges the same
eager copy as HF, whose kernel computes each pattern once for both.
`check` verifies the claims the timings rest on (bitwise-equal logits, the same cached and
ablated values) before timing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch

from benchmarks.baselines import Runs, from_pretrained_run, logits_of, unique_nbytes
from benchmarks.models import Case
from benchmarks.timing import Variant
from bridge_core import ActivationCache, HookPoint, TransformerBridge
from bridge_core.errors import AdapterNotFoundError, BridgeError


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


def zero_head(head: int) -> Callable[[torch.Tensor, HookPoint], torch.Tensor]:
    """TransformerLens's head ablation: ``z[:, :, head] = 0`` on ``hook_z``."""

    def ablate(z: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        z[:, :, head] = 0.0
        return z

    return ablate


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


def bridge_runs(case: Case, bridge: TransformerBridge, eager: Any) -> Runs:
    """The bridge's versions of the same operations, and what cache protection and the opt-in
    ``hook_result`` cost (each on a bridge of its own over the same model); caching
    everything is also timed on a bridge over `eager`, HF's eager-attention copy."""
    inputs, names = case.inputs, Names.of(case)
    ablation = [(names.hook_z, zero_head(case.head))]
    hf_set = hf_output_names(bridge)
    copying, results = _copying_bridge(case), _result_bridge(case)
    over_eager = TransformerBridge.wrap(eager, tokenizer=case.tokenizer, processor=case.processor)
    return {
        "bridge_forward": lambda: bridge(**inputs),
        "bridge_cache_all": lambda: bridge.run_with_cache(**inputs),
        "bridge_cache_all_eager": lambda: over_eager.run_with_cache(**inputs),
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
    directory = case.directory
    runs: Runs = {"hf_from_pretrained": from_pretrained_run(case)}
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
    outputs: Any = hf["hf_outputs"]()
    eager_logits, eager_cache = cast(
        tuple[torch.Tensor, ActivationCache], bridge["bridge_cache_all_eager"]()
    )
    patterns = [eager_cache["pattern", i] for i in range(len(outputs.attentions))]
    return {
        "forward_bitwise_equal": torch.equal(logits_of(bridge["bridge_forward"]()), reference),
        "cache_all_logits_bitwise_equal": torch.equal(logits, reference),
        "cache_all_equals_torch_hook": torch.equal(cache[name], saved),
        "cache_one_logits_bitwise_equal": torch.equal(one_logits, reference),
        "cache_one_equals_torch_hook": torch.equal(one[name], saved) and len(one) == 1,
        "ablation_equals_torch_hook": torch.equal(ablated, logits_of(hf["hf_torch_ablate"]())),
        "ablation_changes_logits": not torch.equal(ablated, reference),
        "eager_cache_all_logits_bitwise_equal": torch.equal(eager_logits, outputs.logits),
        "eager_patterns_equal_hf_attentions": all(
            torch.equal(p, a) for p, a in zip(patterns, outputs.attentions, strict=True)
        ),
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
        "hf_outputs_unique_bytes": unique_nbytes(hf_tensors),
    }
