"""The moving parts of a harvest: ranks, batch encoding, prefetching and the hooked forward.

`join_world` joins the process group that torchrun or ``accelerate launch`` describe in the
environment (gloo on CPU, nccl on GPU) or returns a world of one. `encode` left-pads a batch
(the tokenizer, or the processor when examples carry images); `prefetch` runs it in one
background thread so that reading and tokenizing overlap the forward. `forward_rows` runs
the bridge with one saving hook per hook point and stops the forward once all have fired.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from bridge_core import tokens
from bridge_core.data import Example, Source
from bridge_core.errors import BridgeError, InputError

if TYPE_CHECKING:
    from bridge_core.bridgelike import BridgeLike
    from bridge_core.hooks import HookFn, HookPoint

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's rank among `size` processes (a world of one without torchrun)."""

    rank: int = 0
    size: int = 1
    owns_group: bool = False  # whether `join_world` created the process group
    device_ids: tuple[int, ...] | None = None

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in a world of one)."""
        if self.size > 1:
            import torch.distributed as dist

            if self.device_ids is not None:
                dist.barrier(device_ids=list(self.device_ids))
            else:
                dist.barrier()

    def leave(self) -> None:
        """Destroy the process group if `join_world` created it."""
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def join_world() -> World:
    """The process group in use, else the one torchrun's environment describes, else one.

    Raises:
        BridgeError: ``WORLD_SIZE`` > 1 but this torch has no distributed support.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_available():
        raise BridgeError(f"WORLD_SIZE={size}, but this torch build has no torch.distributed")
    device_ids = None
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device_ids = (local,)
    dist.init_process_group("nccl" if device_ids is not None else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), True, device_ids)


def prefetch(items: Iterator[T], depth: int) -> Iterator[T]:
    """`items`, produced up to `depth` ahead in a background thread (its errors re-raised)."""
    box: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(kind: str, value: Any) -> bool:
        while not stop.is_set():
            try:
                box.put((kind, value), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put("item", item):
                    return
            put("end", None)
        except BaseException as exc:  # handed to the consumer, raised there
            put("error", exc)

    thread = threading.Thread(target=produce, name="harvest-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = box.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()


def encode(
    bridge: BridgeLike, batch: Sequence[Example], source: Source, max_length: int | None
) -> dict[str, torch.Tensor]:
    """Left-padded CPU inputs for `batch`: ``input_ids``, ``attention_mask`` (and pixels)."""
    truncate: dict[str, Any] = {"truncation": True, "max_length": max_length} if max_length else {}
    if any(e.images for e in batch):
        return _process(bridge, batch, source, truncate)
    tokenizer = bridge.tokenizer
    if tokenizer is None:
        raise InputError(
            "harvest needs the bridge's tokenizer: boot from a folder that has one, or "
            "wrap(model, tokenizer=...)"
        )
    rows: list[list[int]] = tokenizer([e.text for e in batch], **truncate)["input_ids"]
    bos = bridge.prepend_bos_for(None)  # as the bridge tokenizes text (TransformerLens's default)
    rows = [tokens.with_bos(row, tokenizer.bos_token_id, bos)[:max_length] for row in rows]
    for example, row in zip(batch, rows, strict=True):
        if not row:
            raise InputError(f"{source.name}: example {example.id!r} has no tokens (empty text)")
    width = max(len(row) for row in rows)
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _process(
    bridge: BridgeLike,
    batch: Sequence[Example],
    source: Source,
    truncate: dict[str, Any],
) -> dict[str, torch.Tensor]:
    processor = bridge.processor
    ids = [e.id for e in batch]
    if processor is None:
        raise InputError(
            f"examples {ids} have images, but this bridge has no processor; boot a multimodal "
            "model from a folder with its processor, or wrap(model, processor=...)"
        )
    images = [source.load_image(image, e) for e in batch for image in e.images]
    texts = [e.text for e in batch]
    try:
        encoded = processor(
            text=texts,
            images=images,
            return_tensors="pt",
            padding=True,
            padding_side="left",
            **truncate,
        )
    except (ValueError, TypeError) as exc:
        raise InputError(f"the processor refused examples {ids}: {exc}") from exc
    return {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)}


class _Stop(Exception):
    """Every harvested hook has fired: the rest of the forward is not needed."""


def forward_rows(
    bridge: BridgeLike,
    inputs: dict[str, Any],
    names: list[str],
    selected: torch.Tensor,
    dtype: torch.dtype | None,
) -> dict[str, torch.Tensor]:
    """Run `bridge` on `inputs`; return each hook's rows at the `selected` positions, on CPU.

    Raises:
        InputError: a hook's activation is not ``[batch, pos, ...]`` over the input tokens.
        BridgeError: a hook fired twice in one forward, or not at all.
    """
    got: dict[str, torch.Tensor] = {}
    shape = tuple(selected.shape)

    def saver(name: str) -> HookFn:
        def save(tensor: torch.Tensor, hook: HookPoint) -> None:
            if name in got:
                raise BridgeError(
                    f"{name!r} fired twice in one forward; harvest stores one activation per "
                    "hook and forward (hooks that fire per image or per step are not supported)"
                )
            if tensor.dim() < 2 or tuple(tensor.shape[:2]) != shape:
                raise InputError(
                    f"{name!r} has shape {tuple(tensor.shape)}; harvest stores hooks shaped "
                    f"[batch, pos, ...] over the input tokens ({list(shape)} here)"
                )
            rows = tensor.detach()[selected.to(tensor.device)]
            got[name] = rows.to("cpu", dtype or rows.dtype)
            if len(got) == len(names):
                raise _Stop

        return save

    try:
        with torch.inference_mode():
            bridge.run_with_hooks(
                **inputs, fwd_hooks=[(n, saver(n)) for n in names], return_type=None
            )
    except _Stop:
        pass
    missing = [n for n in names if n not in got]
    if missing:
        raise BridgeError(f"hook point(s) {missing} did not fire in the forward pass")
    return got


__all__ = ["World", "encode", "forward_rows", "join_world", "prefetch"]
