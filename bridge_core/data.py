"""Examples to harvest, streamed from JSONL, Parquet, a saved `datasets` dataset or Python.

Every source yields `Example`s in dataset order and reads only what it is asked for: a
caller passes which ordinals it wants (its ranks' shards, the shards a resumed run still
lacks) and the others are skipped without being parsed or decoded, so memory stays bounded
by one batch of rows whatever the dataset's size. Parquet needs pyarrow and a saved dataset
needs `datasets` (the ``harvest`` extra); both are imported only when such a source is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge_core.errors import InputError

Wanted = Callable[[int], bool]
DataArg = str | os.PathLike[str] | Iterable[Mapping[str, Any]]

EXTRA = "pip install 'transformer-bridge[harvest]'"
_COLUMNS = ("id", "text", "images")
_CHUNK = 256  # rows read at a time from Parquet and saved datasets
SKIP: Any = object()  # stands for a row that was passed over without being read


@dataclass(frozen=True)
class Example:
    """One row of a dataset: its ordinal, id, text and images (paths or loaded images)."""

    index: int
    id: str | int
    text: str
    images: tuple[Any, ...] = ()


class Source:
    """A dataset to stream; `examples(wanted)` yields the wanted rows in dataset order."""

    def __init__(
        self,
        rows: Callable[[Wanted], Iterator[tuple[int, Any]]],
        name: str,
        base: Path | None,
        count: int | None,
        identity: dict[str, Any],
    ) -> None:
        self._rows = rows
        self.name = name
        self.base = base  # image paths are relative to it
        self.count = count  # rows in the dataset, when known before reading it
        self.identity = identity  # what a resumed run must find unchanged
        self.seen = 0  # rows passed over so far (all of them once `examples` is exhausted)

    def examples(self, wanted: Wanted) -> Iterator[Example]:
        """The wanted rows, parsed and checked, in dataset order."""
        self.seen = 0
        for index, row in self._rows(wanted):
            self.seen = max(self.seen, index + 1)
            if row is not SKIP:
                yield self._example(index, row)

    def _example(self, index: int, row: Any) -> Example:
        where = f"{self.name}, row {index}"
        if not isinstance(row, Mapping):
            raise InputError(f"{where}: a row is an object with 'text' (got {type(row).__name__})")
        text = row.get("text")
        if not isinstance(text, str):
            raise InputError(
                f"{where}: 'text' must be a string (got {type(text).__name__}); rows look "
                'like {"id": ..., "text": ..., "images": [paths]}'
            )
        example_id = row.get("id", index)
        if not isinstance(example_id, str | int) or isinstance(example_id, bool):
            raise InputError(f"{where}: 'id' must be a string or an integer (got {example_id!r})")
        images = row.get("images") or ()
        if isinstance(images, str | bytes) or not isinstance(images, Iterable):
            raise InputError(f"{where}: 'images' must be a list of image paths (got {images!r})")
        return Example(index, example_id, text, tuple(images))

    def load_image(self, image: Any, example: Example) -> Any:
        """A PIL image (RGB) from a path (relative to the data file), bytes or an image."""
        try:
            from PIL import Image
        except ImportError as exc:
            raise InputError(f"examples with images need Pillow: {EXTRA}") from exc
        if isinstance(image, Mapping):  # a `datasets` Image feature left undecoded
            image = image.get("bytes") or image.get("path")
        if isinstance(image, bytes):
            import io

            return Image.open(io.BytesIO(image)).convert("RGB")
        if isinstance(image, str | os.PathLike):
            path = Path(image)
            path = path if path.is_absolute() or self.base is None else self.base / path
            if not path.is_file():
                raise InputError(
                    f"{self.name}, example {example.id!r}: image {os.fspath(image)!r} not found "
                    f"(looked for {path}; relative paths start at the data file's folder)"
                )
            return Image.open(path).convert("RGB")
        if hasattr(image, "convert"):
            return image.convert("RGB")
        raise InputError(
            f"{self.name}, example {example.id!r}: an image is a path, bytes or a PIL image "
            f"(got {type(image).__name__})"
        )


def open_source(data: DataArg) -> Source:
    """The source `data` names: a .jsonl / .parquet file, a saved dataset folder, or rows.

    Raises:
        InputError: a path that does not exist or is none of the accepted kinds.
    """
    if not isinstance(data, str | os.PathLike):
        return _python_rows(data)
    path = Path(data).expanduser()
    if path.is_dir():
        return _saved_dataset(path)
    if not path.is_file():
        raise InputError(f"data {os.fspath(data)!r} does not exist")
    if path.suffix in (".jsonl", ".json", ".ndjson"):
        return _jsonl(path)
    if path.suffix in (".parquet", ".pq"):
        return _parquet(path)
    raise InputError(
        f"data {os.fspath(data)!r}: accepted are JSON Lines (.jsonl), Parquet (.parquet) and "
        "folders written by datasets' save_to_disk"
    )


def _file_identity(path: Path) -> dict[str, Any]:
    return {"path": str(path.resolve()), "bytes": path.stat().st_size}


def _jsonl(path: Path) -> Source:
    def rows(wanted: Wanted) -> Iterator[tuple[int, Any]]:
        index = 0
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                if wanted(index):
                    try:
                        yield index, json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise InputError(f"{path}:{number}: not valid JSON ({exc})") from exc
                else:
                    yield index, SKIP
                index += 1

    with path.open("rb") as raw:
        count = sum(1 for line in raw if line.strip())
    return Source(rows, str(path), path.parent, count, _file_identity(path))


def _parquet(path: Path) -> Source:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise InputError(f"reading Parquet needs pyarrow: {EXTRA}") from exc
    file = pq.ParquetFile(path)
    columns = [c for c in _COLUMNS if c in file.schema_arrow.names]
    if "text" not in columns:
        raise InputError(
            f"{path}: no 'text' column (columns: {file.schema_arrow.names}); accepted columns "
            f"are {list(_COLUMNS)}"
        )

    def rows(wanted: Wanted) -> Iterator[tuple[int, Any]]:
        start = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_CHUNK, columns=columns):
            yield from _chunk(start, batch.num_rows, batch.to_pylist, wanted)
            start += batch.num_rows

    return Source(rows, str(path), path.parent, file.metadata.num_rows, _file_identity(path))


def _chunk(
    start: int, size: int, load: Callable[[], list[Any]], wanted: Wanted
) -> Iterator[tuple[int, Any]]:
    """The rows start..start+size: decoded only when one of them is wanted."""
    if not any(wanted(i) for i in range(start, start + size)):
        yield from ((i, SKIP) for i in range(start, start + size))
        return
    for offset, row in enumerate(load()):
        index = start + offset
        yield index, row if wanted(index) else SKIP


def _saved_dataset(path: Path) -> Source:
    try:
        import datasets
    except ImportError as exc:
        raise InputError(f"reading a saved datasets folder needs datasets: {EXTRA}") from exc
    if not (path / "state.json").is_file() and not (path / "dataset_dict.json").is_file():
        raise InputError(
            f"data {str(path)!r} is a folder but not one written by datasets' save_to_disk "
            "(no state.json); accepted are .jsonl and .parquet files and such folders"
        )
    try:
        dataset = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the saved dataset {str(path)!r}: {exc}") from exc
    if isinstance(dataset, datasets.DatasetDict):
        raise InputError(
            f"{path} holds the splits {sorted(dataset)}; pass one split's folder, e.g. "
            f"{path / sorted(dataset)[0]}"
        )
    columns = [c for c in _COLUMNS if c in dataset.column_names]
    if "text" not in columns:
        raise InputError(f"{path}: no 'text' column (columns: {dataset.column_names})")
    dataset = dataset.select_columns(columns)
    identity = {"path": str(path.resolve()), "fingerprint": getattr(dataset, "_fingerprint", "")}
    return Source(_indexed_rows(dataset), str(path), path, len(dataset), identity)


def _indexed_rows(dataset: Any) -> Callable[[Wanted], Iterator[tuple[int, Any]]]:
    def rows(wanted: Wanted) -> Iterator[tuple[int, Any]]:
        total = len(dataset)
        for start in range(0, total, _CHUNK):
            stop = min(start + _CHUNK, total)

            def load(start: int = start, stop: int = stop) -> list[Any]:
                columns = dataset[start:stop]  # memory-mapped Arrow, decoded per chunk
                return [
                    dict(zip(columns, values, strict=True))
                    for values in zip(*columns.values(), strict=True)
                ]

            yield from _chunk(start, stop - start, load, wanted)

    return rows


def _python_rows(data: Iterable[Mapping[str, Any]]) -> Source:
    if isinstance(data, Mapping):
        raise InputError("data is one mapping; pass a list (or iterable) of rows")
    try:
        iter(data)
    except TypeError as exc:
        raise InputError(
            f"data must be a path or an iterable of rows (got {type(data).__name__})"
        ) from exc

    def rows(wanted: Wanted) -> Iterator[tuple[int, Any]]:
        for index, row in enumerate(data):
            yield index, row if wanted(index) else SKIP

    count = len(data) if isinstance(data, Sized) else None
    return Source(rows, "data", None, count, {"python": type(data).__name__, "rows": count})


__all__ = ["DataArg", "Example", "Source", "open_source"]
