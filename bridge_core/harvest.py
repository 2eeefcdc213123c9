"""Harvest activations over a dataset into sharded safetensors: `harvest` and `HarvestReader`.

Examples are cut into shards of `shard_size` in dataset order, and shards into batches;
neither boundary depends on the number of processes or on where a run stopped. Rank r of
N (torchrun or accelerate launch; one process otherwise) takes shards r, r+N, ...; a shard
is written whole and renamed into place, so a rerun skips the shards that exist and redoes
only the one in flight. Each batch is left-padded (position ids from the mask), runs with a
saving hook on each requested hook point, and keeps the selected positions' rows on the CPU;
the forward stops once every hook has fired. Rank 0 merges the shard headers into the index.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from bridge_core.data import DataArg, Example, Source, open_source
from bridge_core.errors import HookNameError, InputError, did_you_mean
from bridge_core.harvest_run import World, encode, forward_rows, join_world, prefetch
from bridge_core.shards import (
    SETTINGS,
    SHARDS,
    HarvestIndex,
    HarvestReader,
    ShardedRows,
    read_json,
    shard_name,
    write_index,
    write_json,
    write_shard,
)
from bridge_core.tokens import to_device

if TYPE_CHECKING:
    from bridge_core.bridgelike import BridgeLike

PositionName = Literal["all", "last", "text", "image"]
PositionFn = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
POSITIONS: tuple[PositionName, ...] = ("all", "last", "text", "image")
_HEAD_FIRST = ("hook_pattern", "hook_attn_scores")  # [batch, head, q, k]: no token rows


@dataclass(frozen=True)
class Plan:
    """What one harvest does; `settings` is what a resumed run must find unchanged."""

    names: list[str]
    aliases: dict[str, str]
    positions: PositionName | PositionFn
    batch_size: int
    shard_size: int
    dtype: torch.dtype | None
    max_length: int | None
    settings: dict[str, Any] = field(default_factory=dict)


def harvest(
    bridge: BridgeLike,
    data: DataArg,
    hooks: str | Sequence[str],
    out: str | os.PathLike[str],
    *,
    positions: PositionName | PositionFn = "all",
    batch_size: int = 8,
    shard_size: int = 1024,
    dtype: torch.dtype | None = None,
    max_length: int | None = None,
    progress: bool = True,
) -> HarvestReader:
    """Run `bridge` over `data` and store the activations of `hooks` at `positions` in `out`.

    Under ``torchrun`` / ``accelerate launch`` every rank calls this with the same arguments
    (its bridge on its own device); each takes a disjoint set of shards and rank 0 writes the
    index. Rerun the same call to resume an interrupted harvest.

    Args:
        data: a .jsonl or .parquet file, a folder from datasets' ``save_to_disk``, or an
            iterable of rows; rows are ``{"id": ..., "text": ..., "images": [paths]}``.
        hooks: hook names (canonical or alias) whose activations are ``[batch, pos, ...]``.
        positions: "all" tokens, the "last" one, "text" or "image" tokens, or a function of
            the batch's (left-padded) inputs returning a ``[batch, pos]`` boolean mask.
        batch_size: examples per forward.
        shard_size: examples per shard (memory holds about one shard of rows).
        dtype: store the activations in this dtype (default: as the model computes them).
        max_length: truncate longer texts to this many tokens.
        progress: report tokens/s and the ETA on stderr.

    Returns:
        A `HarvestReader` over `out`.

    Raises:
        HookNameError: a hook name the bridge does not have.
        InputError: bad data, options, or an `out` folder holding a different harvest.
    """
    plan = make_plan(bridge, hooks, positions, batch_size, shard_size, dtype, max_length)
    source = open_source(data)
    directory = Path(out)
    world = join_world()
    try:
        settings = {**plan.settings, "data": source.identity}
        _prepare(directory, settings, world)
        done = {p.name for p in (directory / SHARDS).glob("shard-*.safetensors")}
        mine = _Harvester(bridge, plan, source, directory, world, done)
        n_shards = mine.run(progress)
        world.barrier()
        if world.rank == 0:
            write_index(directory, settings, plan.aliases, n_shards)
        world.barrier()
    finally:
        world.leave()
    return HarvestReader(directory)


def make_plan(
    bridge: BridgeLike,
    hooks: str | Sequence[str],
    positions: PositionName | PositionFn,
    batch_size: int,
    shard_size: int,
    dtype: torch.dtype | None,
    max_length: int | None,
) -> Plan:
    """Check the options against `bridge` and resolve the hook names."""
    for option, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if not isinstance(value, int) or value < 1:
            raise InputError(f"{option} must be a positive integer (got {value!r})")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise InputError(f"max_length must be a positive integer or None (got {max_length!r})")
    if not callable(positions) and positions not in POSITIONS:
        raise InputError(
            f"positions must be one of {', '.join(POSITIONS)} or a function of the inputs "
            f"returning a [batch, pos] boolean mask (got {positions!r})"
        )
    if positions == "image" and bridge.cfg.image_token_id is None:
        raise InputError(
            f"positions='image' needs a model with image tokens; {bridge.adapter.name!r} has "
            "no image_token_id. Use 'all', 'last' or 'text'"
        )
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InputError(f"dtype must be a floating-point torch.dtype (got {dtype!r})")
    names, aliases = resolve_hooks(bridge, hooks)
    model = bridge.cfg
    settings = {
        "hooks": names,
        "positions": positions if isinstance(positions, str) else _describe(positions),
        "batch_size": batch_size,
        "shard_size": shard_size,
        "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
        "max_length": max_length,
        "model": {"name": model.model_name, "architecture": model.architecture},
    }
    return Plan(names, aliases, positions, batch_size, shard_size, dtype, max_length, settings)


def resolve_hooks(
    bridge: BridgeLike, hooks: str | Sequence[str]
) -> tuple[list[str], dict[str, str]]:
    """Canonical names of `hooks` (in the order given) and the aliases used for them."""
    given = [hooks] if isinstance(hooks, str) else list(hooks)
    if not given or not all(isinstance(h, str) for h in given):
        raise InputError(f"hooks must be a hook name or a list of them (got {hooks!r})")
    points, aliases = bridge.hook_dict, bridge.hook_aliases()
    names: list[str] = []
    used: dict[str, str] = {}
    for hook in given:
        name = aliases.get(hook, hook)
        if name not in points:
            raise HookNameError(
                f"{hook!r} is not a hook point of this bridge."
                f"{did_you_mean(hook, [*points, *aliases])}"
            )
        if name.rsplit(".", 1)[-1] in _HEAD_FIRST:
            raise InputError(
                f"{hook!r} is [batch, head, q_pos, k_pos]; harvest stores one row per token "
                "position, from hooks shaped [batch, pos, ...] (e.g. hook_resid_post, hook_z)"
            )
        if hook != name:
            used[hook] = name
        if name not in names:
            names.append(name)
    return names, used


def _describe(fn: PositionFn) -> str:
    return f"mask:{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _prepare(directory: Path, settings: dict[str, Any], world: World) -> None:
    """Create `directory`, or check that what it holds was harvested with `settings`."""
    path = directory / SETTINGS
    if world.rank == 0:
        (directory / SHARDS).mkdir(parents=True, exist_ok=True)
        for stale in (directory / SHARDS).glob("*.tmp-*"):  # a killed run's shard in flight
            stale.unlink(missing_ok=True)
        if not path.is_file():
            write_json(path, settings)
    world.barrier()
    found = read_json(path)
    if found != settings:
        changed = sorted(k for k in {*found, *settings} if found.get(k) != settings.get(k))
        raise InputError(
            f"{directory} holds a harvest with other settings ({', '.join(changed)} differ: "
            f"{ {k: found.get(k) for k in changed} } there, "
            f"{ {k: settings.get(k) for k in changed} } now); pass another out folder, or "
            "delete it to start again"
        )


class _Harvester:
    """One rank's share of a harvest: batches in, shards out."""

    def __init__(
        self,
        bridge: BridgeLike,
        plan: Plan,
        source: Source,
        directory: Path,
        world: World,
        done: set[str],
    ) -> None:
        self.bridge, self.plan, self.source = bridge, plan, source
        self.directory, self.world, self.done = directory, world, done
        forward = inspect.signature(bridge.original_model.forward).parameters
        self.position_ids = "position_ids" in forward

    def wanted(self, index: int) -> bool:
        """Whether example `index` is in one of this rank's unfinished shards."""
        shard = index // self.plan.shard_size
        return shard % self.world.size == self.world.rank and shard_name(shard) not in self.done

    def run(self, progress: bool) -> int:
        """Harvest this rank's shards; return the number of shards in the dataset."""
        meter = Progress(self._todo(), self.world, progress)
        buffer: _Shard | None = None
        for shard, batch, inputs in prefetch(self._encoded(), depth=2):
            if buffer is None or buffer.number != shard:
                if buffer is not None:
                    buffer.write(self.directory, self.plan.names)
                buffer = _Shard(shard)
            rows, tokens = self._forward(inputs)
            buffer.add(batch, rows, inputs)
            meter.update(len(batch), tokens)
        if buffer is not None:
            buffer.write(self.directory, self.plan.names)
        meter.finish()
        n_examples = self.source.seen
        if n_examples == 0:
            raise InputError(f"{self.source.name} holds no examples")
        return -(-n_examples // self.plan.shard_size)

    def _todo(self) -> int | None:
        count = self.source.count
        return None if count is None else sum(map(self.wanted, range(count)))

    def _encoded(self) -> Iterator[tuple[int, list[Example], dict[str, torch.Tensor]]]:
        """(shard, examples, CPU inputs) per batch; runs in the prefetch thread."""
        size, shard_size = self.plan.batch_size, self.plan.shard_size
        batch: list[Example] = []
        for example in self.source.examples(self.wanted):
            if batch and (
                len(batch) == size or example.index // shard_size != batch[0].index // shard_size
            ):
                yield batch[0].index // shard_size, batch, self._encode(batch)
                batch = []
            batch.append(example)
        if batch:
            yield batch[0].index // shard_size, batch, self._encode(batch)

    def _encode(self, batch: list[Example]) -> dict[str, torch.Tensor]:
        inputs = encode(self.bridge, batch, self.source, self.plan.max_length)
        inputs["__selected__"] = select_positions(
            self.plan.positions, inputs, self.bridge.cfg.image_token_id
        )
        return inputs

    def _forward(self, inputs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
        model_inputs = {k: v for k, v in inputs.items() if not k.startswith("__")}
        mask = model_inputs["attention_mask"]
        if self.position_ids:
            model_inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        model_inputs = to_device(model_inputs, self.bridge.device, self.bridge.dtype)
        rows = forward_rows(
            self.bridge, model_inputs, self.plan.names, inputs["__selected__"], self.plan.dtype
        )
        return rows, int(mask.sum())


def select_positions(
    positions: PositionName | PositionFn,
    inputs: Mapping[str, torch.Tensor],
    image_token_id: int | None,
) -> torch.Tensor:
    """The ``[batch, pos]`` boolean mask of the positions to keep (never padding)."""
    real = inputs["attention_mask"].bool()
    ids = inputs["input_ids"]
    if callable(positions):
        chosen = positions(inputs)
        if not isinstance(chosen, torch.Tensor) or chosen.shape != real.shape:
            raise InputError(
                f"the positions function must return a [batch, pos] mask of shape "
                f"{tuple(real.shape)} (got {getattr(chosen, 'shape', type(chosen).__name__)})"
            )
        return real & chosen.to(real.device).bool()
    if positions == "all":
        return real
    if positions == "last":
        return real & (real.cumsum(-1) == real.sum(-1, keepdim=True))
    is_image = ids == image_token_id if image_token_id is not None else torch.zeros_like(real)
    return real & (is_image if positions == "image" else ~is_image)


class _Shard:
    """The rows of one shard, collected batch by batch, then written at once."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.ids: list[str | int] = []
        self.row_counts: list[int] = []
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.example: list[torch.Tensor] = []
        self.position: list[torch.Tensor] = []

    def add(
        self,
        batch: list[Example],
        rows: dict[str, torch.Tensor],
        inputs: Mapping[str, torch.Tensor],
    ) -> None:
        selected = inputs["__selected__"]
        real = inputs["attention_mask"].bool()
        position = (real.cumsum(-1) - 1)[selected]  # in the example's own tokens
        which = torch.arange(len(batch)).unsqueeze(1).expand_as(selected)[selected]
        ordinals = torch.tensor([e.index for e in batch], dtype=torch.int64)
        self.ids += [e.id for e in batch]
        self.row_counts += selected.sum(-1).tolist()
        self.example.append(ordinals[which])
        self.position.append(position.to(torch.int64))
        for name, value in rows.items():
            self.parts.setdefault(name, []).append(value)

    def write(self, directory: Path, names: list[str]) -> None:
        tensors = {name: torch.cat(self.parts[name]) for name in names}
        tensors["example"] = torch.cat(self.example)
        tensors["position"] = torch.cat(self.position)
        metadata = {
            "format": "transformer-bridge/harvest-shard",
            "hooks": json.dumps(names),
            "ids": json.dumps(self.ids),
            "row_counts": json.dumps(self.row_counts),
        }
        write_shard(directory / SHARDS / shard_name(self.number), tensors, metadata)


class Progress:
    """Examples, tokens/s and the ETA on stderr, at most every `every` seconds."""

    def __init__(self, total: int | None, world: World, enabled: bool, every: float = 2.0):
        self.total, self.enabled, self.every = total, enabled, every
        self.prefix = "harvest" + (f" [rank {world.rank}/{world.size}]" if world.size > 1 else "")
        self.examples = self.tokens = 0
        self.start = self.last = time.perf_counter()

    def update(self, examples: int, tokens: int) -> None:
        self.examples += examples
        self.tokens += tokens
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            self._print(now)

    def finish(self) -> None:
        self._print(time.perf_counter(), final=True)

    def _print(self, now: float, final: bool = False) -> None:
        if not self.enabled:
            return
        elapsed = max(now - self.start, 1e-9)
        rate = self.tokens / elapsed
        of = f"/{self.total:,}" if self.total is not None else ""
        line = f"{self.prefix}: {self.examples:,}{of} examples, {self.tokens:,} tokens, "
        line += f"{rate:,.0f} tokens/s"
        if final:
            line += f", done in {_clock(elapsed)}"
        elif self.total:
            eta = (self.total - self.examples) * elapsed / max(self.examples, 1)
            line += f", ETA {_clock(eta)}"
        print(line, file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


__all__ = [
    "POSITIONS",
    "HarvestIndex",
    "HarvestReader",
    "PositionFn",
    "PositionName",
    "ShardedRows",
    "harvest",
    "select_positions",
]
