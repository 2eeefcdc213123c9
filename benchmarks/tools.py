"""The compared libraries' versions of each measured operation, one builder per library.

Each builder imports its library when called, so this module loads in any venv: the bridge's
builder runs in the main venv, TransformerLens's and nnsight's in the comparison venv
(`benchmarks.compare`). A builder returns a `Tool`: what is timed (the calls a user writes
with that library), how to read logits and cached values back from their results for the
checks, and, in words, what its "cache everything" caches, since the libraries cache
different sets and their counts must never be compared as if they were the same.

Every tool gets a model loaded for it alone (``fresh()``), never the baseline's: TransformerLens
replaces the HF model's modules with its own components and switches it to eager attention,
which would change the baseline it is compared with.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from benchmarks.models import Case
from benchmarks.timing import Prepared, Variant

TOOLS = {
    "bridge": "transformer-bridge",
    "transformer_lens": "TransformerLens",
    "nnsight": "nnsight",
}
"""Tool name -> label, in the order of the table's columns."""

CALLS = ("forward", "cache_all", "cache_one", "ablate")
LOADS = ("boot", "wrap")

Fresh = Callable[[], Any]
"""Loads a new copy of the case's HF model (eval mode, its default attention kernel)."""


@dataclass
class Tool:
    """One library's runs on a case, and how to read their results.

    Attributes:
        name: a key of `TOOLS`.
        version: the installed distribution's version.
        runs: metric (`CALLS` and `LOADS`) -> variant; a metric the library cannot do is
            missing, with the reason in `notes`.
        read_one: the cached block output, from the result of ``runs["cache_one"]``.
        read_cache: (entry names, tensors) from the result of ``runs["cache_all"]``.
        caches: what ``cache_all`` caches, in words.
        notes: what differs from the other libraries' versions, or could not be done.
    """

    name: str
    version: str
    runs: dict[str, Variant]
    read_one: Callable[[Any], torch.Tensor]
    read_cache: Callable[[Any], tuple[list[str], list[torch.Tensor]]]
    caches: str
    notes: list[str] = field(default_factory=list)


def build(name: str, case: Case, fresh: Fresh) -> Tool:
    """The `Tool` called `name` on `case` (its library imported here)."""
    builders: dict[str, Callable[[Case, Fresh], Tool]] = {
        "bridge": _bridge,
        "transformer_lens": _transformer_lens,
        "nnsight": _nnsight,
    }
    if name not in builders:
        raise ValueError(f"unknown tool {name!r}; choose from {', '.join(TOOLS)}")
    return builders[name](case, fresh)


def tensors_in(value: Any) -> list[torch.Tensor]:
    """The tensors in a module output (a tensor, a tuple or list, a dict or ModelOutput)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in tensors_in(item)]
    if isinstance(value, dict):  # transformers' ModelOutput is an OrderedDict
        return [t for item in value.values() for t in tensors_in(item)]
    return []


def zero_head_any(head: int, d_head: int) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """Zero one head of ``hook_z``, given per head (4-d) or flattened (3-d)."""

    def ablate(z: torch.Tensor, hook: Any) -> torch.Tensor:
        heads = z if z.dim() == 4 else z.view(*z.shape[:-1], -1, d_head)
        heads[:, :, head] = 0.0
        return z

    return ablate


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _bridge(case: Case, fresh: Fresh) -> Tool:
    from bridge_core import TransformerBridge

    model, inputs = fresh(), case.inputs
    text = {"tokenizer": case.tokenizer, "processor": case.processor}
    bridge = TransformerBridge.wrap(model, **text)
    resid = f"blocks.{case.layer}.hook_resid_post"
    ablation = [(f"blocks.{case.layer}.attn.hook_z", zero_head_any(case.head, case.d_head))]
    directory = case.directory

    def read_cache(result: Any) -> tuple[list[str], list[torch.Tensor]]:
        cache = result[1]
        return list(cache.keys()), list(cache.values())

    return Tool(
        name="bridge",
        version=_version("transformer-bridge"),
        runs={
            "forward": lambda: bridge(**inputs),
            "cache_all": lambda: bridge.run_with_cache(**inputs),
            "cache_one": lambda: bridge.run_with_cache(**inputs, names_filter=resid),
            "ablate": lambda: bridge.run_with_hooks(**inputs, fwd_hooks=ablation),
            "boot": lambda: TransformerBridge.boot(directory),
            "wrap": Prepared(fresh, lambda m: TransformerBridge.wrap(m, **text)),
        },
        read_one=lambda result: result[1][resid],
        read_cache=read_cache,
        caches="every hook point (aliases once)",
    )


def _transformer_lens(case: Case, fresh: Fresh) -> Tool:
    lens_bridge = importlib.import_module("transformer_lens.model_bridge").TransformerBridge
    directory = str(case.directory)

    def wrap(model: Any) -> Any:
        # the tokenizer already loaded, as the other tools get it; a processor it loads itself
        return lens_bridge.boot_transformers(
            directory, hf_model=model, tokenizer=case.tokenizer, device="cpu"
        )

    lens = wrap(fresh())
    tokens = case.inputs["input_ids"]
    rest = {key: value for key, value in case.inputs.items() if key != "input_ids"}
    resid = f"blocks.{case.layer}.hook_resid_post"
    ablation = [(f"blocks.{case.layer}.attn.hook_z", zero_head_any(case.head, case.d_head))]

    def read_cache(result: Any) -> tuple[list[str], list[torch.Tensor]]:
        cache = result[1]
        return list(cache.keys()), [cache[name] for name in cache]

    notes = [
        "TransformerLens: boot_transformers(dir, hf_model=model) switches the model to eager "
        "attention and replaces its modules with its own components"
    ]
    if case.processor is not None:
        notes.append("TransformerLens: wrap and boot load the processor themselves")
    return Tool(
        name="transformer_lens",
        version=_version("transformer-lens"),
        runs={
            "forward": lambda: lens(tokens, **rest),
            "cache_all": lambda: lens.run_with_cache(tokens, **rest),
            "cache_one": lambda: lens.run_with_cache(tokens, **rest, names_filter=resid),
            "ablate": lambda: lens.run_with_hooks(tokens, **rest, fwd_hooks=ablation),
            "boot": lambda: lens_bridge.boot_transformers(directory, device="cpu"),
            "wrap": Prepared(fresh, wrap),
        },
        read_one=lambda result: result[1][resid],
        read_cache=read_cache,
        caches="its hook points (each alias a separate entry)",
        notes=notes,
    )


def _nnsight(case: Case, fresh: Fresh) -> Tool:
    nnsight = importlib.import_module("nnsight")
    model = nnsight.NNsight(fresh())
    inputs, head, d_head = case.inputs, case.head, case.d_head
    task = "image-text-to-text" if case.processor is not None else "text-generation"
    directory = str(case.directory)

    def envoy(path: str) -> Any:
        found: Any = model
        for part in path.split("."):
            found = found[int(part)] if part.isdigit() else getattr(found, part)
        return found

    block, o_proj = envoy(case.block_path), envoy(case.o_proj_path)

    def forward() -> Any:
        with model.trace(**inputs):
            output = model.output.save()
        return output

    def cache_all() -> Any:
        with model.trace(**inputs) as tracer:
            cache = tracer.cache()
            output = model.output.save()
        return output, cache

    def cache_one() -> Any:
        with model.trace(**inputs):
            saved = block.output.save()
            output = model.output.save()
        return output, saved

    def ablate() -> Any:
        with model.trace(**inputs):
            z = o_proj.input
            z[:, :, head * d_head : (head + 1) * d_head] = 0.0
            output = model.output.save()
        return output

    def read_cache(result: Any) -> tuple[list[str], list[torch.Tensor]]:
        cache = result[1]
        names = list(cache.keys())
        return names, [t for name in names for t in tensors_in(cache[name].output)]

    def read_one(result: Any) -> torch.Tensor:
        saved = result[1]
        return cast(torch.Tensor, saved[0] if isinstance(saved, tuple) else saved)

    return Tool(
        name="nnsight",
        version=_version("nnsight"),
        runs={
            "forward": forward,
            "cache_all": cache_all,
            "cache_one": cache_one,
            "ablate": ablate,
            "boot": lambda: nnsight.TransformersModel(directory, task=task, dispatch=True),
            "wrap": Prepared(fresh, nnsight.NNsight),
        },
        read_one=read_one,
        read_cache=read_cache,
        caches="every module's output (tracer.cache())",
        notes=[
            "nnsight: the ablation zeroes the head's slice of the attention output "
            "projection's input (it has no hook_z)",
            f"nnsight: boot is TransformersModel(dir, task={task!r}, dispatch=True)",
        ],
    )
