"""``transformer-bridge run MODEL --prompt TEXT``: a cached run, shown and saved."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bridge_core.cli.app import UsageError
from bridge_core.cli.model import (
    activation_rows,
    boot,
    inputs_for,
    load_image,
    model_options,
    non_negative_int,
    select_names,
)
from bridge_core.cli.render import Output

if TYPE_CHECKING:
    from bridge_core.bridge import TransformerBridge
    from bridge_core.cache import ActivationCache

CACHE_FORMAT = "transformer-bridge/activation-cache"


def setup(parser: argparse.ArgumentParser) -> None:
    """The model options, ``--prompt``, ``--names``, ``--save`` and ``--top-k``."""
    model_options(parser, image_default=False)
    parser.add_argument("--prompt", required=True, help="prompt text")
    parser.add_argument(
        "--names",
        nargs="+",
        action="extend",
        metavar="NAME",
        help="hook names, aliases or glob patterns to cache, e.g. "
        "'blocks.*.hook_resid_post' (default: all)",
    )
    parser.add_argument(
        "--save",
        metavar="FILE.safetensors",
        type=Path,
        help="save the cache with safetensors (JSON metadata in the header)",
    )
    parser.add_argument(
        "--top-k",
        type=non_negative_int,
        default=5,
        metavar="K",
        help="show the K most likely next tokens (default: 5; 0: none)",
    )
    parser.set_defaults(handler=cmd_run)


def cmd_run(args: argparse.Namespace, out: Output) -> int:
    """Run ``--prompt`` (and ``--image``) through run_with_cache; print and save the cache."""
    if args.save is not None:
        _check_save_path(args.save)
    image = load_image(args.image)
    bridge = boot(args)
    names = select_names(bridge, args.names)
    text, inputs, described = inputs_for(bridge, args, image, default_image=False)
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(**inputs, names_filter=names)
    n_tokens = inputs["input_ids"].shape[-1]
    out.fields(
        [
            ("model", args.model),
            ("adapter", f"{bridge.adapter.name} ({bridge.cfg.architecture})"),
            ("input", f"{text!r}, {n_tokens} tokens" + (f", image {described}" if image else "")),
        ]
    )
    rows = activation_rows(bridge, cache, list(cache.keys()))
    out.table(
        f"Cached activations ({len(rows)})",
        ("hook", "aliases", "shape", "dtype", "norm"),
        rows,
        right=("norm",),
    )
    silent = [n for n in names or () if n not in cache]
    if silent:
        hint = " (vision hook points fire only with --image)" if image is None else ""
        out.line(
            f"{len(silent)} selected hook points did not fire in this run{hint}: "
            + ", ".join(silent[:5])
            + (", ..." if len(silent) > 5 else ""),
            style="yellow",
        )
    if args.top_k > 0:
        _print_top_k(out, bridge, logits, args.top_k)
    if args.save is not None:
        meta = _metadata(args, bridge, text, described, cache, inputs["input_ids"])
        size = save_cache(args.save, cache, meta)
        out.line(f"Saved {len(cache)} activations ({size / 1e6:.2f} MB) to {args.save}")
    return 0


def _print_top_k(out: Output, bridge: TransformerBridge, logits: torch.Tensor, k: int) -> None:
    probs = logits[0, -1].float().softmax(-1)
    top = probs.topk(min(k, probs.numel()))
    tokenizer = bridge.tokenizer
    rows = [
        (str(rank), repr(tokenizer.decode([i])) if tokenizer else "?", str(i), f"{p:.4f}")
        for rank, (p, i) in enumerate(
            zip(top.values.tolist(), top.indices.tolist(), strict=True), 1
        )
    ]
    out.table("Next token", ("#", "token", "id", "prob"), rows, right=("#", "id", "prob"))


def _check_save_path(path: Path) -> None:
    if path.is_dir():
        raise UsageError(f"--save {str(path)!r} is a directory; expected a file path")
    if not path.parent.is_dir():
        raise UsageError(f"--save: directory {str(path.parent)!r} does not exist")


def _metadata(
    args: argparse.Namespace,
    bridge: TransformerBridge,
    text: str,
    image: str | None,
    cache: ActivationCache,
    input_ids: torch.Tensor,
) -> dict[str, Any]:
    from bridge_core import __version__

    names = list(cache.keys())
    return {
        "format": CACHE_FORMAT,
        "transformer_bridge": __version__,
        "model": args.model,
        "adapter": bridge.adapter.name,
        "architecture": bridge.cfg.architecture or "",
        "prompt": text,
        "image": image or "",
        "input_ids": input_ids[0].tolist(),
        "names": names,
        "aliases": {a: t for a, t in bridge.hook_aliases().items() if t in cache.cache_dict},
        "shapes": {n: list(cache[n].shape) for n in names},
    }


def save_cache(path: Path, cache: ActivationCache, metadata: dict[str, Any]) -> int:
    """Save `cache` with safetensors; metadata values go into the header (JSON unless str).

    Returns:
        The file's size in bytes.
    """
    from safetensors.torch import save_file

    # Cached tensors may be views of one another (q/k/v of a fused projection); safetensors
    # refuses shared storage, so each is saved as its own contiguous copy.
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in cache.items()}
    header = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    save_file(tensors, str(path), metadata=header)
    return path.stat().st_size
