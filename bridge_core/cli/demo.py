"""``transformer-bridge demo``: boot a model by path, cache a run, show it, check exactness.

With no MODEL the demo uses an embedded default, built once into the user cache directory
(``$TRANSFORMER_BRIDGE_CACHE``, else ``$XDG_CACHE_HOME/transformer-bridge``, else
``~/.cache/transformer-bridge``) by a plugin: the entry point named ``default`` in the
group ``transformer_bridge.demo`` is a function returning ``(model, processor)`` (the LLaVA
plugin's tiny random LLaVA). The core names no plugin; a missing one is a clear error.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bridge_core.cli.app import PROG, CommandFailed, UsageError
from bridge_core.cli.model import (
    DTYPES,
    activation_rows,
    boot,
    generated_image,
    inputs_for,
    load_image,
    model_options,
    shape,
)
from bridge_core.cli.render import Output
from bridge_core.components.base import GeneralizedComponent

if TYPE_CHECKING:
    from bridge_core.bridge import TransformerBridge
    from bridge_core.cache import ActivationCache

CACHE_ENV = "TRANSFORMER_BRIDGE_CACHE"
DEMO_GROUP = "transformer_bridge.demo"
DEFAULT_DIR = "demo-default-v1"  # bump when the default builder's output changes
ATTENTION_FILE = "demo-attention-map.png"
INSTALL_HINT = (
    "pip install transformer-bridge-llava (or pip install -e plugins/llava in a clone), "
    "whose tiny LLaVA is the default"
)


def cache_dir() -> Path:
    """The CLI's cache directory (see the module docstring)."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "transformer-bridge"


def setup(parser: argparse.ArgumentParser) -> None:
    """The model options (MODEL optional), ``--prompt`` and ``--fresh``."""
    model_options(parser, model_required=False)
    parser.add_argument("--prompt", help="prompt text (default: a short question)")
    parser.add_argument(
        "--fresh", action="store_true", help="rebuild the embedded default model (no MODEL)"
    )
    parser.add_argument(
        "--attention-map",
        type=Path,
        metavar="FILE.png",
        help="where to write the picture of the last token's attention to the image "
        f"(default: {ATTENTION_FILE} in the CLI cache directory)",
    )
    parser.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace, out: Output) -> int:
    """Run the demo on ``args.model`` or the embedded default; exit 1 if logits differ."""
    if args.model is not None and args.fresh:
        raise UsageError("--fresh rebuilds the embedded default model; it does not apply to MODEL")
    image = load_image(args.image)
    note = ""
    if args.model is None:
        path, built = default_model(args.fresh, out)
        source = str(path)
        note = " (built just now)" if built else " (cached; --fresh rebuilds it)"
    else:
        source = args.model
    bridge = boot(args, source)
    text, inputs, described = inputs_for(bridge, args, image, default_image=True)
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(**inputs)
    _overview(out, bridge, source + note, text, inputs["input_ids"], described)
    out.table(
        "Components and their hook points",
        ("component", "bridge class", "HF module", "hook points", "aliases"),
        component_rows(bridge),
        right=("hook points", "aliases"),
    )
    out.table(
        "A few activations of this run",
        ("hook", "aliases", "shape", "dtype", "norm"),
        activation_rows(bridge, cache, highlights(bridge)),
        right=("norm",),
    )
    if described is not None:
        _image_tokens(out, bridge, cache, inputs["input_ids"][0])
        _attention_map(out, bridge, cache, inputs, image or generated_image(), args)
    exact = _check_exact(out, bridge, source, inputs, logits, args)
    _next_steps(out, source)
    return 0 if exact else 1


def default_model(fresh: bool, out: Output) -> tuple[Path, bool]:
    """The embedded default model's directory, built unless cached; and whether it was built."""
    target = cache_dir() / DEFAULT_DIR
    if (target / "config.json").is_file() and not fresh:
        return target, False
    name, builder = _builder()
    out.line(f"Building the default model ({name}) in {target} ...")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    except OSError as exc:
        raise CommandFailed(
            f"cannot write the default model to {target.parent}: {exc.strerror or exc}; "
            f"set {CACHE_ENV} to a writable directory"
        ) from exc
    try:
        model, processor = builder()
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)  # atomic: an interrupted build leaves no half model
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target, True


def _builder() -> tuple[str, Callable[[], tuple[Any, Any]]]:
    """The plugin function that builds the default model, and where it comes from."""
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group=DEMO_GROUP) if ep.name == "default"]
    if not found:
        raise CommandFailed(
            f"no installed plugin provides the demo's default model (entry point 'default' "
            f"in group {DEMO_GROUP!r}): {INSTALL_HINT}. "
            f"Or run `{PROG} demo MODEL` with a model directory or hub id of your own"
        )
    builder: Callable[[], tuple[Any, Any]] = found[0].load()
    return found[0].value, builder


def _overview(
    out: Output,
    bridge: TransformerBridge,
    model: str,
    text: str,
    input_ids: torch.Tensor,
    image: str | None,
) -> None:
    from bridge_core.registry import get_registry

    try:
        src = get_registry().adapter_source(bridge.adapter.name)
        origin = f"plugin {src.name}, {src.distribution or '-'} {src.version or ''}".strip()
    except KeyError:
        origin = "given with --adapter"
    n_params = sum(p.numel() for p in bridge.original_model.parameters())
    dtype = str(bridge.dtype).removeprefix("torch.")
    shown = text if len(text) <= 80 else text[:77] + "..."
    out.heading(f"{PROG} demo")
    out.fields(
        [
            ("model", model),
            ("adapter", f"{bridge.adapter.name} ({origin})"),
            (
                "HF class",
                f"{bridge.cfg.architecture}, {n_params:,} parameters, {bridge.device} {dtype}",
            ),
            ("input", f"{shown!r} -> {input_ids.shape[-1]} tokens"),
        ]
        + ([("image", image)] if image else [])
    )


def component_rows(bridge: TransformerBridge) -> list[tuple[str, str, str, str, str]]:
    """(component, class, HF module, hook points, aliases) for each top-level component and
    each list of layers inside one, then a total."""
    paths = {id(m): n for n, m in bridge.original_model.named_modules()}
    aliases = bridge.hook_aliases()

    def row(name: str, entry: nn.Module) -> tuple[str, str, str, str, str]:
        prefix = name + "."
        hooks = sum(n.startswith(prefix) for n in bridge.hook_dict)
        n_aliases = sum(t.startswith(prefix) for t in aliases.values())
        first = entry[0] if isinstance(entry, nn.ModuleList) and len(entry) else entry
        module = paths.get(id(getattr(first, "original_component", None)), "?")
        if isinstance(entry, nn.ModuleList):
            return (
                name,
                f"{len(entry)} x {type(first).__name__}",
                module.removesuffix(".0"),
                str(hooks),
                str(n_aliases),
            )
        return (name, type(entry).__name__, module, str(hooks), str(n_aliases))

    rows = []
    for name, entry in _top_components(bridge):
        rows.append(row(name, entry))
        for child, sub in entry.named_children():
            if isinstance(entry, GeneralizedComponent) and isinstance(sub, nn.ModuleList):
                rows.append(row(f"{name}.{child}", sub))
    rows.append(("total", "", "", str(len(bridge.hook_dict)), str(len(aliases))))
    return rows


def _top_components(bridge: TransformerBridge) -> list[tuple[str, nn.Module]]:
    modules = dict(bridge.named_children())
    return [(name, modules[name]) for name in bridge.adapter.components if name in modules]


def highlights(bridge: TransformerBridge) -> list[str]:
    """A few telling hook names, in forward order: each component's output, the first and
    last layer of each list of layers, and the first block's attention pattern."""
    picks: set[str] = set()
    for name, entry in _top_components(bridge):
        if isinstance(entry, nn.ModuleList):
            last = len(entry) - 1
            picks |= {f"{name}.0.hook_in", f"{name}.{last}.hook_out", f"{name}.0.attn.hook_pattern"}
            continue
        picks.add(f"{name}.hook_out")
        for child, sub in entry.named_children():
            if isinstance(sub, nn.ModuleList) and len(sub):
                picks.add(f"{name}.{child}.{len(sub) - 1}.hook_out")
    return [name for name in bridge.hook_dict if name in picks]


def _image_tokens(
    out: Output, bridge: TransformerBridge, cache: ActivationCache, ids: torch.Tensor
) -> None:
    """Where the image tokens sit, the residual stream there, and what it equals."""
    token_id = bridge.cfg.image_token_id
    mask = ids == token_id if token_id is not None else torch.zeros_like(ids, dtype=torch.bool)
    positions = mask.nonzero().flatten().tolist()
    if not positions:
        out.line("No image tokens in the input.")
        return
    span = f"{positions[0]}-{positions[-1]}"
    if len(positions) != positions[-1] - positions[0] + 1:
        span = ", ".join(map(str, positions))
    d_model = bridge.cfg.d_model
    residual = [n for n in highlights(bridge) if _is_residual(cache, n, len(ids), d_model)]
    rows = []
    for name in residual:
        norms = cache[name][0].float().norm(dim=-1)
        there, elsewhere = norms[mask].mean().item(), norms[~mask].mean().item()
        rows.append((name, shape(cache[name][0, mask]), f"{there:.4g}", f"{elsewhere:.4g}"))
    out.table(
        f"Image tokens: {len(positions)} of {len(ids)} positions ({span}, token id {token_id})",
        ("hook", "at image positions", "mean norm (image)", "mean norm (text)"),
        rows,
        right=("mean norm (image)", "mean norm (text)"),
    )
    match = _landing(bridge, cache, residual, mask)
    if match:
        out.line(
            f"{match[0]} equals {match[1]} at the image positions: the projected image "
            "features enter the residual stream there."
        )


def _attention_map(
    out: Output,
    bridge: TransformerBridge,
    cache: ActivationCache,
    inputs: dict[str, Any],
    image: Any,
    args: argparse.Namespace,
) -> None:
    """Paint the last token's attention to the image (last block, mean over heads)."""
    from bridge_core.cli.attention import describe, draw_attention_map

    path = args.attention_map or cache_dir() / ATTENTION_FILE
    if args.attention_map is None:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.parent.is_dir():
        raise UsageError(f"--attention-map: directory {str(path.parent)!r} does not exist")
    if f"blocks.{bridge.cfg.n_layers - 1}.attn.hook_pattern" not in cache:
        return  # this adapter has no pattern hooks
    out.line(describe(draw_attention_map(bridge, cache, inputs, image, path)))


def _landing(
    bridge: TransformerBridge, cache: ActivationCache, residual: list[str], mask: torch.Tensor
) -> tuple[str, str] | None:
    """(a cached non-sequence activation, a residual-stream hook) that it equals at `mask`."""
    d_model, n_image = bridge.cfg.d_model, int(mask.sum())
    for source in highlights(bridge):
        if source in residual or source not in cache:
            continue
        features = cache[source]
        if features.shape[-1] != d_model or features.numel() != n_image * d_model:
            continue
        for target in residual:
            if torch.equal(features.reshape(-1, d_model), cache[target][0, mask]):
                return source, target
    return None


def _is_residual(cache: ActivationCache, name: str, seq: int, d_model: int) -> bool:
    if name not in cache:
        return False
    t = cache[name]
    return t.dim() == 3 and t.shape[:2] == (1, seq) and t.shape[-1] == d_model


def _check_exact(
    out: Output,
    bridge: TransformerBridge,
    source: str,
    inputs: dict[str, Any],
    logits: torch.Tensor,
    args: argparse.Namespace,
) -> bool:
    """Compare the run's logits with the plain HF class loaded from the same place."""
    model_class: Any = type(bridge.original_model)
    kwargs = {"dtype": DTYPES.get(args.dtype, args.dtype)} if args.dtype else {}
    plain = model_class.from_pretrained(source, **kwargs).to(args.device)
    with torch.no_grad():
        expected = plain(**inputs).logits
    what = f"{model_class.__name__}.from_pretrained(...)"
    ok, bad = ("✓", "✗") if out.is_rich else ("OK:", "FAILED:")
    if torch.equal(logits, expected):
        out.line(
            f"{ok} the logits of this cached run equal the plain HF model's exactly "
            f"({what}, same inputs, torch.equal on {shape(logits)})",
            style="bold green",
        )
        return True
    diff = (logits.float() - expected.float()).abs().max().item()
    with torch.no_grad():
        bare = bridge(**inputs)
    if torch.equal(bare, expected):
        out.line(
            f"{ok} with no hooks the logits equal the plain HF model's exactly ({what}, "
            f"torch.equal); caching every hook moved them by at most {diff:.3g}, because "
            "attention-pattern hooks compute attention eagerly",
            style="yellow",
        )
        return True
    out.line(
        f"{bad} the logits differ from the plain HF model's ({what}): max |difference| {diff:.3g}",
        style="bold red",
    )
    return False


def _next_steps(out: Output, source: str) -> None:
    model = shlex.quote(source)
    out.line()
    out.line("Next:", style="bold")
    out.line(f"  {PROG} hooks {model} --filter resid_pre")
    out.line(
        f"  {PROG} run {model} --prompt 'Hello' --names 'blocks.*.hook_resid_post' "
        "--save cache.safetensors"
    )
    out.line(f"  in Python: bridge = TransformerBridge.boot({source!r})")
