"""Text (and image) inputs: tokenization through the attached tokenizer or processor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from bridge_core.errors import InputError

TextInput = str | list[str]


def tokenize(
    tokenizer: Any,
    text: TextInput,
    prepend_bos: bool | None = None,
    padding_side: str | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenize `text` as the model's tokenizer does (special tokens included).

    Args:
        prepend_bos: None keeps the tokenizer's habit; True adds BOS where it does not,
            False strips a BOS it adds.
        padding_side: "left" or "right" for batches of different lengths.
    """
    if tokenizer is None:
        raise InputError("this bridge has no tokenizer; pass input_ids=... or wrap(tokenizer=...)")
    kwargs: dict[str, Any] = {"return_tensors": "pt"}
    if isinstance(text, list) and tokenizer.pad_token is not None:
        kwargs["padding"] = True
        if padding_side is not None:
            kwargs["padding_side"] = _check_side(padding_side)
    elif isinstance(text, list):  # no pad token: fine as long as nothing needs padding
        _check_same_lengths(tokenizer, text)
    encoded = tokenizer(text, **kwargs)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    bos = tokenizer.bos_token_id
    if prepend_bos is not None and bos is not None:
        has_bos = bool((ids[:, 0] == bos).all()) and not bool((mask[:, 0] == 0).any())
        if prepend_bos and not has_bos:
            ids = torch.cat([torch.full_like(ids[:, :1], bos), ids], dim=1)
            mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        elif not prepend_bos and has_bos:
            ids, mask = ids[:, 1:], mask[:, 1:]
    return {"input_ids": ids, "attention_mask": mask}


def _check_same_lengths(tokenizer: Any, texts: list[str]) -> None:
    """Refuse a batch of texts that tokenize to different lengths (there is no pad token)."""
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    if len(set(lengths)) > 1:
        shown = ", ".join(map(str, lengths[:8])) + (", ..." if len(lengths) > 8 else "")
        raise InputError(
            f"the {len(texts)} texts tokenize to different lengths ({shown} tokens) and the "
            f"tokenizer ({type(tokenizer).__name__}) has no pad token to pad them with. "
            "Accepted: texts of one token length, input_ids you padded yourself (with "
            "attention_mask=), or a tokenizer with a pad token (e.g. "
            "bridge.tokenizer.pad_token = bridge.tokenizer.eos_token)"
        )


def process(
    processor: Any, text: TextInput, images: Any, padding_side: str | None = None
) -> dict[str, torch.Tensor]:
    """Run the attached multimodal processor on text and images.

    Args:
        padding_side: "left" or "right" for batches of different lengths (default: the
            tokenizer's).
    """
    if processor is None:
        raise InputError(
            "images were given, but this bridge has no processor; pass pixel_values=... "
            "or wrap(processor=...)"
        )
    kwargs: dict[str, Any] = {"return_tensors": "pt"}
    if isinstance(text, list) and len(text) > 1:
        kwargs["padding"] = True
        if padding_side is not None:
            kwargs["padding_side"] = _check_side(padding_side)
    return dict(processor(text=text, images=images, **kwargs))


def _check_side(padding_side: str) -> str:
    if padding_side not in ("left", "right"):
        raise InputError(f"padding_side must be 'left' or 'right' (got {padding_side!r})")
    return padding_side


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a model's inputs go: its first parameter's device or, for a model dispatched by
    accelerate (``device_map``), the device it executes on (offloaded weights are on "meta")."""
    device_map: dict[str, Any] | None = getattr(model, "hf_device_map", None)
    if device_map:
        placed = [d for d in device_map.values() if d not in ("cpu", "disk")]
        return torch.device(placed[0]) if placed else torch.device("cpu")
    return next(model.parameters()).device


def to_device(inputs: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Move tensors to `device`; floating-point ones (pixels) also to the model's dtype."""
    moved: dict[str, Any] = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, dtype) if value.is_floating_point() else value.to(device)
        moved[key] = value
    return moved


def decode(tokenizer: Any, tokens: torch.Tensor | Sequence[int]) -> str | list[str]:
    """Tokens to text: a string for one sequence, a list for a batch."""
    if tokenizer is None:
        raise InputError("this bridge has no tokenizer to decode with")
    if isinstance(tokens, torch.Tensor) and tokens.dim() == 2:
        return [str(tokenizer.decode(row)) for row in tokens]
    return str(tokenizer.decode(tokens))
