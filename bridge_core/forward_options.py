"""What a forward call asks beyond HF's keywords: TransformerLens's options, checked.

The bridge's forward takes HookedTransformer's keywords (``return_type``, ``loss_per_token``,
``prepend_bos``, ``padding_side``, ``start_at_layer``, ``tokens``, ``attention_mask``,
``stop_at_layer``) and any keyword the HF model's forward accepts. Anything else is an
`InputError` naming it: HF's forward swallows unknown keywords in ``**kwargs``, so a typo or a
TransformerLens option we do not offer would otherwise be silently ignored.

``stop_at_layer`` and ``start_at_layer`` are done with hooks on the blocks' residual hook
points, so the HF model runs unchanged: a stop raises `StopAtLayer` from the hook (the layers
after it never run); a start replaces the residual stream at that block's input (the layers
before it run on ``tokens``, or on zeros, and their result is discarded).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bridge_core.errors import InputError, did_you_mean
from bridge_core.hooks import HookHandle, HookPoint

if TYPE_CHECKING:
    from bridge_core.naming import HookNames

BRIDGE_KEYWORDS = (
    "input",
    "return_type",
    "loss_per_token",
    "prepend_bos",
    "padding_side",
    "start_at_layer",
    "tokens",
    "attention_mask",
    "stop_at_layer",
    "images",
)
# HF-wide keywords that decorators or **kwargs of every model handle, whatever the signature.
HF_GENERIC = (
    "return_dict",
    "output_attentions",
    "output_hidden_states",
    "past_key_values",
    "cache_position",
    "use_cache",
)
NOT_OFFERED = {
    "past_kv_cache": "pass HF's cache instead (past_key_values=... / use_cache=True), or use "
    "bridge.generate, which keeps HF's key/value cache",
    "shortformer_pos_embed": "shortformer models are not HF architectures; there is nothing "
    "to pass it to",
}
# cache-only keywords, refused in forward with a pointer to where they belong
CACHE_ONLY = ("names_filter", "incl_bwd", "remove_batch_dim", "return_cache_object", "pos_slice")


def hf_keywords(model: nn.Module) -> frozenset[str]:
    """The keywords `model.forward` accepts: its parameters and HF's shared keyword set."""
    names: set[str] = set(HF_GENERIC)
    params = inspect.signature(model.forward).parameters.values()
    for param in params:
        if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            names.add(param.name)
        elif param.kind == param.VAR_KEYWORD:
            names |= _typed_dict_keys(param.annotation)
    try:  # TransformersKwargs: what **kwargs of an HF model carry (attention kernels, ...)
        from transformers.utils import generic

        names |= set(generic.TransformersKwargs.__annotations__)
    except ImportError:  # pragma: no cover - older transformers
        pass
    return frozenset(names)


def _typed_dict_keys(annotation: Any) -> set[str]:
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        keys = getattr(candidate, "__annotations__", None)
        if isinstance(keys, dict) and getattr(candidate, "__total__", None) is not None:
            return set(keys)
    return set()


def check_keywords(kwargs: Mapping[str, Any], accepted: frozenset[str], model_name: str) -> None:
    """Refuse keywords that neither the bridge nor the HF model's forward takes.

    Raises:
        InputError: naming each unknown keyword, with a did-you-mean and what is accepted.
    """
    unknown = [k for k in kwargs if k not in accepted]
    if not unknown:
        return
    problems = []
    for key in unknown:
        if key in NOT_OFFERED:
            problems.append(f"{key!r} (TransformerLens's; {NOT_OFFERED[key]})")
        elif key in CACHE_ONLY:
            problems.append(f"{key!r} (a run_with_cache keyword: pass it to run_with_cache)")
        else:
            hint = did_you_mean(key, [*BRIDGE_KEYWORDS, *accepted])
            problems.append(f"{key!r}{' (' + hint.strip() + ')' if hint else ''}")
    raise InputError(
        f"unknown keyword argument(s) {', '.join(problems)}: neither a TransformerBridge "
        f"forward keyword ({', '.join(BRIDGE_KEYWORDS)}) nor one that {model_name}.forward "
        "accepts (see its signature). Unknown keywords are refused because HF's forward would "
        "silently ignore them"
    )


def add_position_ids(inputs: dict[str, Any], accepted: frozenset[str], model: nn.Module) -> None:
    """Give a batch of token ids position ids counted over its attention mask, as HF's
    `generate` does, so that left padding does not shift the positions of the real tokens.

    The ids are ``[batch, pos]`` even for one row (so learned position embeddings are
    ``[batch, pos, d_model]``, as TransformerLens's ``hook_pos_embed``). Nothing is added
    when the caller gave positions, a key/value cache, or embeddings, or when the model takes
    no position ids, or is no model HF's `generate` runs (an encoder such as RoBERTa counts its
    positions its own way), or prepares position ids of its own for `generate` (Qwen2-VL's 3-D
    M-RoPE positions, from the image grids: 1-D ids would replace them). Padding tokens keep
    HF's default positions, so for an all-ones (or absent) mask and for right padding the ids
    equal HF's default.
    """
    ids = inputs.get("input_ids")
    skip = ("position_ids", "past_key_values", "cache", "cache_position", "inputs_embeds")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or "position_ids" not in accepted:
        return
    can_generate = getattr(model, "can_generate", None)
    if not callable(can_generate) or not can_generate() or _own_positions(type(model)):
        return
    for key in skip:
        if inputs.get(key) is not None:
            return
    mask = inputs.get("attention_mask")
    default = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
    if isinstance(mask, torch.Tensor) and mask.shape == ids.shape and not bool(mask.all()):
        counted = mask.long().cumsum(-1) - 1
        # padding keeps HF's default positions: a right-padded batch is then exactly HF's
        inputs["position_ids"] = torch.where(mask.bool(), counted, default)
    else:
        inputs["position_ids"] = default


_OWN_POSITIONS: dict[type, bool] = {}


def _own_positions(model_class: type) -> bool:
    """Whether the model class prepares its own position ids for `generate` (asked on every
    forward, so answered once per class)."""
    known = _OWN_POSITIONS.get(model_class)
    if known is None:
        from transformers import GenerationMixin

        name = "_prepare_position_ids_for_generation"
        base, own = getattr(GenerationMixin, name, None), getattr(model_class, name, None)
        known = _OWN_POSITIONS[model_class] = base is not None and own not in (None, base)
    return known


def lm_labels(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Next-token labels for HF's loss: ids, with -100 where a token or the one before it
    is masked (TransformerLens's ``lm_cross_entropy_loss`` leaves out those pairs)."""
    if mask is None or bool(mask.all()):
        return ids
    keep = mask[:, :-1].bool() & mask[:, 1:].bool()
    labels = ids.clone()
    labels[:, 1:] = labels[:, 1:].masked_fill(~keep, -100)
    return labels


def per_token_loss(
    logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """TransformerLens's per-token next-token loss ``[batch, pos - 1]`` (0 where masked)."""
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    loss = -log_probs.gather(-1, ids[:, 1:, None].to(logits.device))[..., 0]
    if mask is not None:
        keep = mask[:, :-1].bool() & mask[:, 1:].bool()
        loss = loss * keep.to(loss.device)
    return loss


def select_output(
    output: Any,
    return_type: str | None,
    loss_per_token: bool,
    ids: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> Any:
    """What `return_type` asks for from the HF model's output."""
    if return_type in ("raw", None):
        return output if return_type == "raw" else None
    logits = output.logits if hasattr(output, "logits") else output[0]
    if return_type == "logits":
        return logits
    if loss_per_token:
        if not isinstance(ids, torch.Tensor):
            raise InputError("loss_per_token=True needs input ids to predict")
        loss = per_token_loss(logits, ids, mask)
    else:
        loss = output.loss
    return loss if return_type == "loss" else (logits, loss)


def start_inputs(
    residual: Any, ids: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the residual stream given with `start_at_layer`, the ids the layers before it run on:
    `ids`, or zeros)."""
    if not isinstance(residual, torch.Tensor) or residual.dim() != 3:
        shape = tuple(residual.shape) if isinstance(residual, torch.Tensor) else None
        raise InputError(
            "with start_at_layer, input is the residual stream [batch, pos, d_model] "
            f"(got {type(residual).__name__}{f' of shape {shape}' if shape else ''})"
        )
    if ids is None:
        ids = torch.zeros(residual.shape[:2], dtype=torch.long, device=device)
    return residual, ids


class StopAtLayer(Exception):
    """Raised by the hook that ends a forward at ``stop_at_layer``; carries the residual."""

    def __init__(self, residual: torch.Tensor) -> None:
        super().__init__("stop_at_layer")
        self.residual = residual


@dataclass(frozen=True)
class LayerWindow:
    """Which blocks of a forward run: from `start` (inclusive) to `stop` (exclusive)."""

    start: int | None
    stop: int | None
    n_layers: int

    @classmethod
    def of(cls, start: int | None, stop: int | None, n_layers: int) -> LayerWindow:
        """Normalize TransformerLens's (possibly negative) layer indices.

        Raises:
            InputError: an index outside the model's layers.
        """
        return cls(
            _layer(start, n_layers, "start_at_layer", n_layers - 1),
            _layer(stop, n_layers, "stop_at_layer", n_layers),
            n_layers,
        )

    @contextmanager
    def hooks(self, names: HookNames, residual: torch.Tensor | None) -> Iterator[None]:
        """Attach the hooks that start the forward at `start` with `residual` and stop it at
        `stop` (raising `StopAtLayer`); they go when the block ends."""
        handles: list[HookHandle] = []
        try:
            if self.start is not None and residual is not None:
                point = _point(names, f"blocks.{self.start}.hook_resid_pre")
                handles.append(point.add_hook(_replace_with(residual), prepend=True))
            if self.stop is not None:
                handles.append(self._stop_hook(names))
            yield
        finally:
            for handle in reversed(handles):
                handle.remove()

    def _stop_hook(self, names: HookNames) -> HookHandle:
        def stop(tensor: torch.Tensor, hook: HookPoint) -> None:
            raise StopAtLayer(tensor)

        assert self.stop is not None
        n_layers = self.n_layers
        if self.stop < n_layers:  # before block `stop` runs (its hooks do not fire either)
            return _point(names, f"blocks.{self.stop}.hook_resid_pre").add_hook(stop, prepend=True)
        return _point(names, f"blocks.{n_layers - 1}.hook_resid_post").add_hook(stop)


def _layer(value: int | None, n_layers: int, what: str, top: int) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise InputError(f"{what} must be an int or None (got {type(value).__name__})")
    index = value + n_layers if value < 0 else value
    if not 0 <= index <= top:
        raise InputError(
            f"{what}={value} is outside this model's {n_layers} layers "
            f"(accepted: {-n_layers} .. {top})"
        )
    return index


def _point(names: HookNames, name: str) -> HookPoint:
    return names.points[names.canonical(name)]


def _replace_with(residual: torch.Tensor) -> Callable[..., torch.Tensor]:
    def start(tensor: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        if residual.shape != tensor.shape:
            raise InputError(
                f"start_at_layer: the residual stream given has shape {tuple(residual.shape)}; "
                f"{hook.name!r} has shape {tuple(tensor.shape)} for these tokens"
            )
        return residual.to(tensor.device, tensor.dtype)

    return start
