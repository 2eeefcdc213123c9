"""``transformer-bridge harvest``: activations over a dataset into sharded safetensors.

Runs the same under ``torchrun --nproc-per-node N`` (each rank boots the model on
``cuda:LOCAL_RANK`` when GPUs are present, and takes its own shards).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bridge_core.cli.app import UsageError
from bridge_core.cli.model import DTYPES, adapter_arg, check_model, device_arg
from bridge_core.cli.render import Output
from bridge_core.errors import BootError, HookNameError

if TYPE_CHECKING:
    from bridge_core.bridge import TransformerBridge

POSITIONS = ("all", "last", "text", "image")


def setup(sub: argparse.ArgumentParser) -> None:
    """MODEL, ``--data``, ``--hooks``, ``--out`` and the harvest and placement options."""
    sub.add_argument("model", metavar="MODEL", help="local model directory or hub id")
    sub.add_argument(
        "--data", required=True, type=Path, metavar="FILE",
        help="JSONL or Parquet rows {id, text, images}, or a datasets save_to_disk folder",
    )  # fmt: skip
    sub.add_argument(
        "--hooks", required=True, metavar="NAMES",
        help="comma-separated hook names or aliases, e.g. blocks.6.hook_resid_post",
    )  # fmt: skip
    sub.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    sub.add_argument("--positions", choices=POSITIONS, default="all", help="default: all")
    sub.add_argument("--batch-size", type=int, default=8, metavar="N", help="default: 8")
    sub.add_argument(
        "--shard-size", type=int, default=1024, metavar="N", help="examples per shard (1024)"
    )
    sub.add_argument("--max-length", type=int, metavar="N", help="truncate texts to N tokens")
    sub.add_argument(
        "--store-dtype", choices=sorted(DTYPES), help="dtype of the stored activations"
    )
    sub.add_argument("--adapter", metavar="NAME|FILE", help="adapter name or spec file")
    sub.add_argument(
        "--device",
        type=device_arg,
        help="device to run on (default: cuda:LOCAL_RANK with GPUs, else cpu)",
    )
    sub.add_argument(
        "--dtype", choices=("float32", "float16", "bfloat16", "auto"), help="weights dtype"
    )
    sub.add_argument(
        "--device-map", metavar="auto|JSON",
        help="place the model with accelerate: 'auto' or a JSON object {module: device}",
    )  # fmt: skip
    sub.add_argument("--offload-folder", type=Path, metavar="DIR", help="for disk offload")
    sub.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    sub.set_defaults(handler=cmd_harvest)


def cmd_harvest(args: argparse.Namespace, out: Output) -> int:
    """Boot the model and harvest; rank 0 prints where the rows went."""
    from bridge_core.harvest import harvest

    if not args.data.exists():
        raise UsageError(
            f"--data {str(args.data)!r} does not exist. Accepted: a .jsonl or .parquet file, "
            "or a folder written by datasets' save_to_disk"
        )
    hooks = [h.strip() for h in args.hooks.split(",") if h.strip()]
    bridge = _boot(args)
    try:
        reader = harvest(
            bridge, args.data, hooks, args.out, positions=args.positions,
            batch_size=args.batch_size, shard_size=args.shard_size,
            dtype=DTYPES.get(args.store_dtype) if args.store_dtype else None,
            max_length=args.max_length, progress=not args.no_progress,
        )  # fmt: skip
    except HookNameError as exc:
        raise UsageError(str(exc)) from exc
    if int(os.environ.get("RANK", "0")) == 0:
        shapes = ", ".join(f"{h} {list(reader[h].shape)}" for h in reader.hooks)
        out.line(f"{len(reader.index):,} examples -> {args.out}: {shapes}")
    return 0


def _boot(args: argparse.Namespace) -> TransformerBridge:

    from bridge_core.bridge import TransformerBridge

    check_model(args.model)
    placement: dict[str, Any] = {}
    if args.device_map:
        placement["device_map"] = _device_map(args.device_map)
    if args.offload_folder:
        placement["offload_folder"] = str(args.offload_folder)
    device = args.device
    if device is None and "device_map" not in placement:
        local = os.environ.get("LOCAL_RANK", "0")
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    try:
        return TransformerBridge.boot(
            args.model, device=device, dtype=DTYPES.get(args.dtype, args.dtype),
            adapter=adapter_arg(args.adapter), **placement,
        )  # fmt: skip
    except BootError as exc:
        if isinstance(exc.__cause__, OSError):
            raise UsageError(str(exc)) from exc
        raise


def _device_map(value: str) -> str | dict[str, Any]:
    if not value.lstrip().startswith("{"):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--device-map is not valid JSON ({exc}); e.g. auto") from exc
    if not isinstance(parsed, dict):
        raise UsageError("--device-map must be 'auto' or a JSON object {module: device}")
    return parsed
