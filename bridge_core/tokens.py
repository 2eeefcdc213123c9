"""Text (and image) inputs: tokenization through the attached tokenizer or processor."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from bridge_core.errors import InputError

TextInput = str | list[str]


def tokenize(
    tokenizer: Any,
    text: TextInput,
    prepend_bos: bool | None = None,
    padding_side: str | None = None,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenize `text` as the model's tokenizer does (special tokens included).

    Args:
        prepend_bos: None keeps the tokenizer's habit; True adds BOS to each text where the
            tokenizer does not, False strips a BOS it adds (before any padding).
        padding_side: "left" or "right" for batches of different lengths.
        max_length: cut each text to this many tokens (BOS included).
    """
    if tokenizer is None:
        raise InputError("this bridge has no tokenizer; pass input_ids=... or wrap(tokenizer=...)")
    if isinstance(text, list) and not text:
        raise InputError("the input is an empty list of texts. Accepted: one text or more")
    texts = [text] if isinstance(text, str) else text
    rows = [list(map(int, row)) for row in tokenizer(texts)["input_ids"]]
    bos = tokenizer.bos_token_id
    if prepend_bos is not None and bos is not None:
        rows = [with_bos(row, bos, prepend_bos) for row in rows]
    if max_length is not None:
        rows = [row[:max_length] for row in rows]
    if not any(rows):
        can_add = bos is not None and not prepend_bos
        hint = " or prepend_bos=True (the tokenizer has a BOS token)" if can_add else ""
        raise InputError(
            f"the text input {text!r:.80} tokenizes to no tokens, so there is nothing to run. "
            f"Accepted: text that gives at least one token{hint}"
        )
    if len({len(row) for row in rows}) <= 1:
        ids = torch.tensor(rows, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if tokenizer.pad_token is None:
        _refuse_unpadded(tokenizer, [len(row) for row in rows])
    kwargs: dict[str, Any] = {"padding": True, "return_tensors": "pt"}
    if padding_side is not None:
        kwargs["padding_side"] = _check_side(padding_side)
    padded = tokenizer.pad({"input_ids": rows}, **kwargs)
    return {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}


def with_bos(row: list[int], bos: int | None, prepend_bos: bool) -> list[int]:
    """`row` with a BOS token first (`prepend_bos`) or without one."""
    if bos is None:
        return row
    has_bos = bool(row) and row[0] == bos
    if prepend_bos and not has_bos:
        return [bos, *row]
    if not prepend_bos and has_bos:
        return row[1:]
    return row


def check_positions(
    inputs: Mapping[str, Any],
    n_ctx: int | None,
    positional_embedding_type: str,
    new_tokens: int = 0,
) -> None:
    """Refuse inputs with no positions, or with more than learned position embeddings cover.

    Rotary, ALiBi and relative positions run past ``n_ctx`` in HF (outside the lengths the
    model was trained on), so only ``"standard"`` (learned) positions limit the length.

    Args:
        new_tokens: positions `generate` adds (its ``max_new_tokens``).

    Raises:
        InputError: naming the input, its length and what is accepted.
    """
    key = next((k for k in ("input_ids", "inputs_embeds") if k in inputs), None)
    value = inputs.get(key) if key else None
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return
    length = value.shape[-1] if key == "input_ids" else value.shape[-2] if value.dim() > 1 else 0
    if length == 0:
        raise InputError(
            f"{key} has no positions (shape {tuple(value.shape)}), so there is nothing to run. "
            "Accepted: at least one token"
        )
    mask = inputs.get("attention_mask")
    total = mask.shape[-1] if isinstance(mask, torch.Tensor) and mask.dim() > 0 else length
    if positional_embedding_type != "standard" or n_ctx is None or total + new_tokens <= n_ctx:
        return
    what = f"{key} has {total} positions"
    if new_tokens:
        what += f", and max_new_tokens={new_tokens} would make {total + new_tokens}"
    raise InputError(
        f"{what}, but the model's learned position embeddings cover {n_ctx} (cfg.n_ctx). "
        f"Accepted: at most {n_ctx} positions in all; keep the last tokens "
        f"(ids[:, -{max(n_ctx - new_tokens, 1)}:]), split the text, or generate fewer tokens"
    )


def _refuse_unpadded(tokenizer: Any, lengths: list[int]) -> None:
    """Refuse a batch of texts that tokenize to different lengths (there is no pad token)."""
    shown = ", ".join(map(str, lengths[:8])) + (", ..." if len(lengths) > 8 else "")
    raise InputError(
        f"the {len(lengths)} texts tokenize to different lengths ({shown} tokens) and the "
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
