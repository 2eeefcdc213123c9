"""Harvested activations on disk: safetensors shards, the index, and the memory-mapped reader.

A harvest directory holds ``settings.json`` (what was harvested, checked on resume),
``shards/shard-NNNNN.safetensors`` (one per block of examples, every hook in it, plus the
``example`` and ``position`` of each row; written to a temporary name and renamed, so a shard
exists whole or not at all) and ``index.json``, written last: hooks, dtypes, row shapes, the
shards in dataset order and each example's id and first row. `HarvestReader` maps the shards
read-only (``mmap``), so a reader costs page cache, not process memory.
"""

from __future__ import annotations

import bisect
import json
import mmap
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from bridge_core.errors import HookNameError, InputError, did_you_mean

FORMAT = "transformer-bridge/harvest"
VERSION = 1
INDEX = "index.json"
SETTINGS = "settings.json"
SHARDS = "shards"
ROW_TABLES = ("example", "position")  # per-row int64 tensors stored next to the hooks

# safetensors dtype codes (the format's own names)
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def shard_name(number: int) -> str:
    """The file name of shard `number`."""
    return f"shard-{number:05d}.safetensors"


def write_json(path: Path, value: Any) -> None:
    """Write JSON atomically: to a temporary file, flushed, then renamed over `path`."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as file:
        json.dump(value, file, indent=1)
        file.write("\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`."""
    value: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return value


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write one shard atomically (temporary file, fsync, rename, fsync of the folder)."""
    from safetensors.torch import save_file

    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with tmp.open("rb") as file:
        os.fsync(file.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes, offsets)."""
    with path.open("rb") as file:
        (size,) = struct.unpack("<Q", file.read(8))
        header: dict[str, Any] = json.loads(file.read(size))
    header["__data_start__"] = 8 + size
    return header


class MappedShard:
    """One shard file mapped read-only; its tensors share the mapping (no copies)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.header = read_header(path)
        with path.open("rb") as file:
            # copy-on-write: torch wants a writable buffer; pages stay the file's until written
            self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)

    @property
    def metadata(self) -> dict[str, str]:
        """The shard's string metadata (example ids, hooks)."""
        meta: dict[str, str] = self.header.get("__metadata__", {})
        return meta

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor `name`, memory-mapped."""
        entry = self.header[name]
        dtype = _DTYPES[entry["dtype"]]
        shape = tuple(entry["shape"])
        start, stop = entry["data_offsets"]
        if stop == start:
            return torch.empty(shape, dtype=dtype)
        offset = self.header["__data_start__"] + start
        count = (stop - start) // dtype.itemsize
        flat = torch.frombuffer(self._map, dtype=dtype, count=count, offset=offset)
        return flat.view(shape)


class ShardedRows:
    """A ``[rows, ...]`` array stored across shards, read through memory maps.

    It behaves like a read-only tensor for what harvested activations are used for:
    ``len``, ``shape``, ``dtype``, and indexing rows with an int, a slice, a list or tensor
    of row numbers, or a boolean mask. A slice within one shard is a view of the mapping;
    anything else copies only the rows it selects. `shards` are the per-shard tensors
    themselves; `tensor()` concatenates all rows into memory.
    """

    def __init__(self, shards: Sequence[torch.Tensor], name: str) -> None:
        self.shards = list(shards)
        self.name = name
        self._starts = [0]
        for shard in self.shards:
            self._starts.append(self._starts[-1] + shard.shape[0])
        first = self.shards[0] if self.shards else torch.empty(0)
        self.dtype: torch.dtype = first.dtype
        self.shape = torch.Size([self._starts[-1], *first.shape[1:]])

    def __len__(self) -> int:
        return self._starts[-1]

    def __repr__(self) -> str:
        return (
            f"ShardedRows({self.name!r}, shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"shards={len(self.shards)})"
        )

    def __iter__(self) -> Iterator[torch.Tensor]:
        for shard in self.shards:
            yield from shard

    def tensor(self) -> torch.Tensor:
        """Every row in one tensor (a view of the mapping when there is one shard)."""
        if len(self.shards) == 1:
            return self.shards[0]
        return torch.cat(self.shards) if self.shards else torch.empty(self.shape, dtype=self.dtype)

    def __getitem__(self, key: int | slice | Sequence[int] | torch.Tensor) -> torch.Tensor:
        if isinstance(key, int):
            n = len(self)
            if not -n <= key < n:
                raise IndexError(f"row {key} is out of range for {n} rows of {self.name!r}")
            key %= n
            shard = bisect.bisect_right(self._starts, key) - 1
            return self.shards[shard][key - self._starts[shard]]
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1 and stop > start:
                shard = bisect.bisect_right(self._starts, start) - 1
                if stop <= self._starts[shard + 1]:  # within one shard: a view
                    base = self._starts[shard]
                    return self.shards[shard][start - base : stop - base]
            return self._take(torch.arange(start, stop, step))
        rows = torch.as_tensor(key)
        if rows.dtype == torch.bool:
            if rows.shape != (len(self),):
                raise InputError(f"a boolean row mask needs shape ({len(self)},), got {rows.shape}")
            rows = rows.nonzero().flatten()
        return self._take(rows)

    def _take(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.long().flatten()
        n = len(self)
        if rows.numel() and (rows.min() < -n or rows.max() >= n):
            raise IndexError(f"row numbers out of range for {n} rows of {self.name!r}")
        rows = rows % max(n, 1)
        out = torch.empty((rows.numel(), *self.shape[1:]), dtype=self.dtype)
        shard_of = torch.bucketize(rows, torch.tensor(self._starts[1:]), right=True)
        for shard in sorted(set(shard_of.tolist())):
            picked = (shard_of == shard).nonzero().flatten()
            out[picked] = self.shards[shard][rows[picked] - self._starts[shard]]
        return out


@dataclass(frozen=True)
class HarvestIndex:
    """Which rows belong to which example, and at which token position.

    Attributes:
        ids: example ids in dataset order.
        starts: first row of each example (and the total number of rows last).
        example: per row, the example's ordinal in the dataset (`ids[example[row]]`).
        position: per row, the token position in the example's own sequence (no padding).
    """

    ids: list[str | int]
    starts: list[int]
    example: ShardedRows
    position: ShardedRows

    def __len__(self) -> int:
        return len(self.ids)

    def rows_at(self, ordinal: int) -> slice:
        """The rows of the example at `ordinal` in the dataset."""
        if not -len(self.ids) <= ordinal < len(self.ids):
            raise IndexError(f"example {ordinal} is out of range for {len(self.ids)} examples")
        ordinal %= len(self.ids)
        return slice(self.starts[ordinal], self.starts[ordinal + 1])

    def rows(self, example_id: str | int) -> slice:
        """The rows of the example with id `example_id` (a slice for ``reader[hook][...]``)."""
        found = self._by_id.get(example_id)
        if found is None:
            close = did_you_mean(str(example_id), [str(i) for i in self.ids[:10_000]])
            raise InputError(
                f"no example has id {example_id!r}.{close} Accepted: an id of the data "
                f"(e.g. {self.ids[0]!r}), or rows_at(ordinal) for the n-th example"
            )
        if found < 0:
            raise InputError(
                f"several examples have id {example_id!r}; use rows_at(ordinal) for one of them"
            )
        return self.rows_at(found)

    def positions(self, example_id: str | int) -> torch.Tensor:
        """The token positions of the example's rows, in row order."""
        return self.position[self.rows(example_id)]

    @cached_property
    def _by_id(self) -> dict[str | int, int]:
        by_id: dict[str | int, int] = {}
        for ordinal, example_id in enumerate(self.ids):
            by_id[example_id] = -1 if example_id in by_id else ordinal
        return by_id


class HarvestReader:
    """A finished harvest: ``reader[hook]`` rows in dataset order, ``reader.index`` for them.

    Args:
        directory: the ``out`` folder of `harvest`.

    Raises:
        InputError: the folder holds no finished harvest (no ``index.json``).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        path = self.directory / INDEX
        if not path.is_file():
            partial = (self.directory / SETTINGS).is_file()
            raise InputError(
                f"{self.directory} holds no finished harvest (no {INDEX})"
                + ("; run the same harvest again to finish it" if partial else "")
            )
        self.meta: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        if self.meta.get("format") != FORMAT:
            raise InputError(f"{path} is not a harvest index (format {self.meta.get('format')!r})")
        self._shards = [MappedShard(self.directory / s["file"]) for s in self.meta["shards"]]

    @property
    def hooks(self) -> list[str]:
        """The harvested hook names (canonical)."""
        return list(self.meta["hooks"])

    @property
    def settings(self) -> dict[str, Any]:
        """The settings the harvest ran with."""
        settings: dict[str, Any] = self.meta["settings"]
        return settings

    def __len__(self) -> int:
        return int(self.meta["n_rows"])

    def __contains__(self, hook: object) -> bool:
        return isinstance(hook, str) and self._canonical(hook) in self.meta["hooks"]

    def __getitem__(self, hook: str) -> ShardedRows:
        name = self._canonical(hook)
        if name not in self.meta["hooks"]:
            known = [*self.meta["hooks"], *self.meta.get("aliases", {})]
            raise HookNameError(
                f"{hook!r} was not harvested into {self.directory}.{did_you_mean(hook, known)} "
                f"Harvested: {', '.join(self.meta['hooks'])}"
            )
        return ShardedRows([s.tensor(name) for s in self._shards], name)

    def _canonical(self, hook: str) -> str:
        aliases: Mapping[str, str] = self.meta.get("aliases", {})
        return aliases.get(hook, hook)

    @cached_property
    def index(self) -> HarvestIndex:
        """Rows to example ids and token positions (and back)."""
        examples = self.meta["examples"]
        tables = {t: ShardedRows([s.tensor(t) for s in self._shards], t) for t in ROW_TABLES}
        return HarvestIndex(
            examples["ids"], examples["row_starts"], tables["example"], tables["position"]
        )


def write_index(
    directory: Path, settings: dict[str, Any], aliases: dict[str, str], n_shards: int
) -> dict[str, Any]:
    """Merge the shards' headers into ``index.json`` (written atomically) and return it.

    Raises:
        InputError: a shard is missing, or the shards disagree on a hook's dtype or shape.
    """
    hooks: dict[str, dict[str, Any]] = {}
    shards: list[dict[str, Any]] = []
    ids: list[str | int] = []
    starts = [0]
    for number in range(n_shards):
        path = directory / SHARDS / shard_name(number)
        if not path.is_file():
            raise InputError(f"{path} is missing: a rank did not finish its shards")
        header = read_header(path)
        meta = header["__metadata__"]
        for name in json.loads(meta["hooks"]):
            entry = header[name]
            found = {"dtype": _dtype_name(entry["dtype"]), "shape": entry["shape"][1:]}
            if hooks.setdefault(name, found) != found:
                raise InputError(f"{path}: {name} is {found}, other shards have {hooks[name]}")
        counts = json.loads(meta["row_counts"])
        ids += json.loads(meta["ids"])
        first = starts[-1]
        for count in counts:
            starts.append(starts[-1] + count)
        shards.append(
            {
                "file": f"{SHARDS}/{path.name}",
                "examples": [len(ids) - len(counts), len(ids)],
                "rows": [first, starts[-1]],
            }
        )
    index = {
        "format": FORMAT,
        "version": VERSION,
        "settings": settings,
        "hooks": hooks,
        "aliases": aliases,
        "n_examples": len(ids),
        "n_rows": starts[-1],
        "shards": shards,
        "examples": {"ids": ids, "row_starts": starts},
    }
    write_json(directory / INDEX, index)
    return index


def _dtype_name(code: str) -> str:
    return str(_DTYPES[code]).removeprefix("torch.")


__all__ = ["HarvestIndex", "HarvestReader", "MappedShard", "ShardedRows"]
