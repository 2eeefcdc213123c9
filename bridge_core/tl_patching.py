"""TransformerLens's ``patching`` module on the bridge: the same functions, names and arguments.

Activation patching runs the corrupted input once per index (a layer, and a position, head or
query/key position), with the clean run's activation copied in there, and records
``patching_metric(logits)``. `generic_activation_patch` does the sweep for any activation
and *patch setter* (which part of the activation an index names); the ``get_act_patch_*``
functions are it with TransformerLens's setters and axes filled in. They are thin wrappers of
`bridge_core.patching`: each index becomes a `Patch` and `patch_sweep` runs them. Index tables
(``index_df``) are pandas DataFrames as in TransformerLens, or any sequence of index rows;
pandas is only needed to have one returned.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from bridge_core.cache import act_name
from bridge_core.errors import InputError
from bridge_core.patching import Patch, patch_sweep

if TYPE_CHECKING:
    from bridge_core.bridge import TransformerBridge
    from bridge_core.cache import ActivationCache

Metric = Callable[[torch.Tensor], torch.Tensor | float]
Setter = Callable[[torch.Tensor, Sequence[int], torch.Tensor], torch.Tensor]
AXES = ("layer", "pos", "head_index", "head", "src_pos", "dest_pos")


def make_df_from_ranges(column_max_ranges: Sequence[int], column_names: Sequence[str]) -> Any:
    """A DataFrame with a row for every combination of ``range(max)`` of each column."""
    pandas: Any = importlib.import_module("pandas")  # TransformerLens's index tables
    rows = list(itertools.product(*(range(n) for n in column_max_ranges)))
    return pandas.DataFrame(rows, columns=list(column_names))


def _rows(index_df: Any) -> list[list[int]]:
    values = getattr(index_df, "values", index_df)
    return [
        [int(v) for v in row] for row in (values.tolist() if hasattr(values, "tolist") else values)
    ]


def generic_activation_patch(
    model: TransformerBridge,
    corrupted_tokens: torch.Tensor,
    clean_cache: ActivationCache,
    patching_metric: Metric,
    patch_setter: Setter,
    activation_name: str,
    index_axis_names: Sequence[str] | None = None,
    index_df: Any = None,
    return_index_df: bool = False,
    progress: bool = True,
) -> Any:
    """Patch each index of `activation_name` from the clean run into the corrupted one.

    TransformerLens's setters become `bridge_core.patching.Patch` indices and the sweep is
    `bridge_core.patching.patch_sweep`'s; any other setter function is called by a hook.

    Args:
        index_axis_names: axes to sweep in full (the first is the layer): "layer", "pos",
            "head_index" / "head", "src_pos", "dest_pos"; the result has one dimension each.
        index_df: instead, the index rows to patch (first column the layer); the result is
            then flat, one value per row.
        return_index_df: also return the index table.
        progress: show a progress bar.

    Returns:
        The metric per index (and the index table, if asked).

    Raises:
        InputError: neither or both of `index_axis_names` and `index_df`, or an unknown axis.
    """
    if (index_df is None) == (index_axis_names is None):
        raise InputError("pass index_axis_names (axes to sweep) or index_df (rows), not both")
    if index_axis_names is not None:
        unknown = [a for a in index_axis_names if a not in AXES]
        if unknown:
            raise InputError(f"unknown axis name(s) {unknown}; accepted: {list(AXES)}")
        sizes = [_axis_size(model, corrupted_tokens, activation_name, a) for a in index_axis_names]
        rows = [list(r) for r in itertools.product(*(range(n) for n in sizes))]
        axes = {
            f"{i}:{a}": range(n)
            for i, (a, n) in enumerate(zip(index_axis_names, sizes, strict=True))
        }
    else:
        rows = _rows(index_df)
        axes = {"row": range(len(rows))}
    indexer = _INDEXERS.get(patch_setter)
    if indexer is not None:
        targets = [[Patch(act_name(activation_name, row[0]), indexer(row))] for row in rows]
        swept = patch_sweep(
            model, corrupted_tokens, clean_cache, patching_metric, targets, axes, progress=progress
        )
        result = swept.values
    else:
        result = _custom_sweep(
            model,
            corrupted_tokens,
            clean_cache,
            patching_metric,
            patch_setter,
            activation_name,
            rows,
        ).view(tuple(len(c) for c in axes.values()))
    if not return_index_df:
        return result
    if index_df is None:
        assert index_axis_names is not None
        index_df = make_df_from_ranges(tuple(result.shape), index_axis_names)
    return result, index_df


def _custom_sweep(
    model: TransformerBridge,
    corrupted_tokens: torch.Tensor,
    clean_cache: ActivationCache,
    patching_metric: Metric,
    patch_setter: Setter,
    activation_name: str,
    rows: list[list[int]],
) -> torch.Tensor:
    """The sweep for a setter function of the caller's: it edits the activation in a hook."""
    values = torch.zeros(len(rows))
    for i, index in enumerate(rows):
        name = act_name(activation_name, index[0])
        patch = _patcher(patch_setter, index, clean_cache[name])
        with torch.no_grad():
            logits = model.run_with_hooks(corrupted_tokens, fwd_hooks=[(name, patch)])
        values[i] = float(patching_metric(logits))
    return values


def _patcher(
    setter: Setter, index: list[int], clean: torch.Tensor
) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    def patch(corrupted: torch.Tensor, hook: Any) -> torch.Tensor:
        return setter(corrupted.clone(), index, clean)

    return patch


def _axis_size(model: TransformerBridge, tokens: torch.Tensor, activation: str, axis: str) -> int:
    if axis == "layer":
        return model.cfg.n_layers
    if axis in ("pos", "src_pos", "dest_pos"):
        return int(tokens.shape[-1])
    kv = model.cfg.n_key_value_heads
    return kv if activation in ("k", "v") and kv is not None else model.cfg.n_heads


def layer_pos_patch_setter(
    corrupted_activation: torch.Tensor, index: Sequence[int], clean_activation: torch.Tensor
) -> torch.Tensor:
    """index = [layer, pos] of a ``[batch, pos, ...]`` activation."""
    _, pos = index
    corrupted_activation[:, pos, ...] = clean_activation[:, pos, ...]
    return corrupted_activation


def layer_pos_head_vector_patch_setter(
    corrupted_activation: torch.Tensor, index: Sequence[int], clean_activation: torch.Tensor
) -> torch.Tensor:
    """index = [layer, pos, head] of a ``[batch, pos, head, ...]`` activation (q, k, v, z)."""
    _, pos, head = index
    corrupted_activation[:, pos, head] = clean_activation[:, pos, head]
    return corrupted_activation


def layer_head_vector_patch_setter(
    corrupted_activation: torch.Tensor, index: Sequence[int], clean_activation: torch.Tensor
) -> torch.Tensor:
    """index = [layer, head] of a ``[batch, pos, head, ...]`` activation, every position."""
    _, head = index
    corrupted_activation[:, :, head] = clean_activation[:, :, head]
    return corrupted_activation


def layer_head_pattern_patch_setter(
    corrupted_activation: torch.Tensor, index: Sequence[int], clean_activation: torch.Tensor
) -> torch.Tensor:
    """index = [layer, head] of a ``[batch, head, dest_pos, src_pos]`` pattern."""
    _, head = index
    corrupted_activation[:, head] = clean_activation[:, head]
    return corrupted_activation


def layer_head_pos_pattern_patch_setter(
    corrupted_activation: torch.Tensor, index: Sequence[int], clean_activation: torch.Tensor
) -> torch.Tensor:
    """index = [layer, head, dest_pos] of a pattern."""
    _, head, dest = index
    corrupted_activation[:, head, dest] = clean_activation[:, head, dest]
    return corrupted_activation


def layer_head_dest_src_pos_pattern_patch_setter(
    corrupted_activation: torch.Tensor, index: Sequence[int], clean_activation: torch.Tensor
) -> torch.Tensor:
    """index = [layer, head, dest_pos, src_pos] of a pattern."""
    _, head, dest, src = index
    corrupted_activation[:, head, dest, src] = clean_activation[:, head, dest, src]
    return corrupted_activation


_ALL = slice(None)
_INDEXERS: dict[Callable[..., Any], Callable[[list[int]], tuple[Any, ...]]] = {
    layer_pos_patch_setter: lambda i: (_ALL, i[1]),
    layer_pos_head_vector_patch_setter: lambda i: (_ALL, i[1], i[2]),
    layer_head_vector_patch_setter: lambda i: (_ALL, _ALL, i[1]),
    layer_head_pattern_patch_setter: lambda i: (_ALL, i[1]),
    layer_head_pos_pattern_patch_setter: lambda i: (_ALL, i[1], i[2]),
    layer_head_dest_src_pos_pattern_patch_setter: lambda i: (_ALL, i[1], i[2], i[3]),
}
"""TransformerLens's setters as indices of the activation (batch first) for `Patch`."""


def _preset(setter: Setter, activation: str, axes: tuple[str, ...]) -> Callable[..., Any]:
    def patch(
        model: TransformerBridge,
        corrupted_tokens: torch.Tensor,
        clean_cache: ActivationCache,
        patching_metric: Metric,
        **kwargs: Any,
    ) -> Any:
        if "index_df" not in kwargs:
            kwargs.setdefault("index_axis_names", axes)
        return generic_activation_patch(
            model, corrupted_tokens, clean_cache, patching_metric, setter, activation, **kwargs
        )

    patch.__doc__ = (
        f"Patch {activation!r} over the axes {list(axes)} (see `generic_activation_patch`); "
        f"returns ``[{', '.join(axes)}]``."
    )
    return patch


get_act_patch_resid_pre = _preset(layer_pos_patch_setter, "resid_pre", ("layer", "pos"))
get_act_patch_resid_mid = _preset(layer_pos_patch_setter, "resid_mid", ("layer", "pos"))
get_act_patch_attn_out = _preset(layer_pos_patch_setter, "attn_out", ("layer", "pos"))
get_act_patch_mlp_out = _preset(layer_pos_patch_setter, "mlp_out", ("layer", "pos"))
_BY_POS = ("layer", "pos", "head")
get_act_patch_attn_head_out_by_pos = _preset(layer_pos_head_vector_patch_setter, "z", _BY_POS)
get_act_patch_attn_head_q_by_pos = _preset(layer_pos_head_vector_patch_setter, "q", _BY_POS)
get_act_patch_attn_head_k_by_pos = _preset(layer_pos_head_vector_patch_setter, "k", _BY_POS)
get_act_patch_attn_head_v_by_pos = _preset(layer_pos_head_vector_patch_setter, "v", _BY_POS)
get_act_patch_attn_head_pattern_by_pos = _preset(
    layer_head_pos_pattern_patch_setter, "pattern", ("layer", "head_index", "dest_pos")
)
get_act_patch_attn_head_pattern_dest_src_pos = _preset(
    layer_head_dest_src_pos_pattern_patch_setter,
    "pattern",
    ("layer", "head_index", "dest_pos", "src_pos"),
)
_ALL_POS = ("layer", "head")
get_act_patch_attn_head_out_all_pos = _preset(layer_head_vector_patch_setter, "z", _ALL_POS)
get_act_patch_attn_head_q_all_pos = _preset(layer_head_vector_patch_setter, "q", _ALL_POS)
get_act_patch_attn_head_k_all_pos = _preset(layer_head_vector_patch_setter, "k", _ALL_POS)
get_act_patch_attn_head_v_all_pos = _preset(layer_head_vector_patch_setter, "v", _ALL_POS)
get_act_patch_attn_head_pattern_all_pos = _preset(
    layer_head_pattern_patch_setter, "pattern", ("layer", "head_index")
)


def _padded_heads(results: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-head results; key/value heads (fewer under GQA) are padded with zeros."""
    heads = max(r.shape[-1] for r in results)
    return torch.stack([torch.nn.functional.pad(r, (0, heads - r.shape[-1])) for r in results])


def get_act_patch_attn_head_all_pos_every(
    model: TransformerBridge, corrupted_tokens: torch.Tensor, clean_cache: Any, metric: Metric
) -> torch.Tensor:
    """Head output, q, k, v and pattern patched per head: ``[5, n_layers, n_heads]``."""
    args = (model, corrupted_tokens, clean_cache, metric)
    return _padded_heads(
        [
            get_act_patch_attn_head_out_all_pos(*args),
            get_act_patch_attn_head_q_all_pos(*args),
            get_act_patch_attn_head_k_all_pos(*args),
            get_act_patch_attn_head_v_all_pos(*args),
            get_act_patch_attn_head_pattern_all_pos(*args),
        ]
    )


def get_act_patch_attn_head_by_pos_every(
    model: TransformerBridge, corrupted_tokens: torch.Tensor, clean_cache: Any, metric: Metric
) -> torch.Tensor:
    """The same per position: ``[5, n_layers, pos, n_heads]``."""
    args = (model, corrupted_tokens, clean_cache, metric)
    pattern = get_act_patch_attn_head_pattern_by_pos(*args).transpose(-1, -2)
    return _padded_heads(
        [
            get_act_patch_attn_head_out_by_pos(*args),
            get_act_patch_attn_head_q_by_pos(*args),
            get_act_patch_attn_head_k_by_pos(*args),
            get_act_patch_attn_head_v_by_pos(*args),
            pattern,
        ]
    )


def get_act_patch_block_every(
    model: TransformerBridge, corrupted_tokens: torch.Tensor, clean_cache: Any, metric: Metric
) -> torch.Tensor:
    """The residual stream, attention output and MLP output per position: ``[3, n_layers,
    pos]``."""
    args = (model, corrupted_tokens, clean_cache, metric)
    parts = [get_act_patch_resid_pre(*args), get_act_patch_attn_out(*args)]
    return torch.stack([*parts, get_act_patch_mlp_out(*args)])
