"""Activation patching sweeps: clean activations patched into a corrupted run, place by place.

In the spirit of TransformerLens's ``patching.generic_activation_patch``: for each *target*
of a sweep, the corrupted input runs once with the clean run's activation copied in at that
target, and ``metric(output)`` is recorded. A target is a list of `Patch`es (a hook name and
an index into its activation, batch dimension first) applied together; the targets are laid
out on named axes, so the result is a tensor whose axes have names and coordinates
(`PatchResult`). `patch_sweep` runs any targets; `activation_patch` builds them for hook
names x positions x heads (TransformerLens's ``get_act_patch_*`` are thin wrappers of it);
the image presets build them from the clean run's `ImageLayout`: the image's positions in
the language model, each vision layer, and each patch of the selected vision layer.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from bridge_core.cache import ActivationCache, act_name
from bridge_core.errors import InputError
from bridge_core.multimodal import ImagePlacement, layout_of

if TYPE_CHECKING:
    from bridge_core.bridgelike import BridgeLike

Metric = Callable[[Any], torch.Tensor | float]
Index = tuple[Any, ...]
Choice = Sequence[int] | torch.Tensor | Literal["all"] | None


@dataclass(frozen=True)
class Patch:
    """Copy the clean activation of `hook` at `index` (batch dimension first) into the run."""

    hook: str
    index: Index


@dataclass(frozen=True)
class PatchResult:
    """Metric values of a sweep, with named axes.

    Attributes:
        values: one metric value per target, shaped by the axes.
        axes: the axis names (``("hook", "pos")``, ``("layer", "patch")`` ...).
        coords: for each axis, what its entries are (hook names, positions, layers ...).
        image: the image whose tokens or patches an axis runs over, if any.
    """

    values: torch.Tensor
    axes: tuple[str, ...]
    coords: dict[str, list[Any]]
    image: ImagePlacement | None = field(default=None, repr=False)

    def grid(self, tile: int | None = None) -> torch.Tensor | list[torch.Tensor]:
        """The values with the image axis ("pos" or "patch") laid out as ``[..., rows, cols]``.

        Returns:
            One tensor, or one per tile of an any-resolution image (unless `tile` is given).

        Raises:
            InputError: the sweep has no image axis.
        """
        axis = next((a for a in ("pos", "patch") if a in self.axes), None)
        if self.image is None or axis is None:
            raise InputError(f"this sweep has no image axis to lay out (axes {self.axes})")
        dim = self.axes.index(axis)
        values = self.values.movedim(dim, 0)
        if axis == "pos":
            grids = self.image.to_grid(values, tile)
        else:
            sizes = [t.grid for t in self.image.tiles]
            parts = torch.split(values, [r * c for r, c in sizes])
            grids = [p.reshape(r, c, *p.shape[1:]) for p, (r, c) in zip(parts, sizes, strict=True)]
            grids = grids[tile] if tile is not None else grids[0] if len(grids) == 1 else grids
        if isinstance(grids, list):
            return [g.movedim((0, 1), (-2, -1)) for g in grids]
        return grids.movedim((0, 1), (-2, -1))


def patch_sweep(
    bridge: BridgeLike,
    corrupted: Any,
    clean_cache: ActivationCache,
    metric: Metric,
    targets: Sequence[Sequence[Patch]],
    axes: Mapping[str, Sequence[Any]],
    *,
    image: ImagePlacement | None = None,
    progress: bool = True,
) -> PatchResult:
    """Run the corrupted input once per target with that target's clean activations patched in.

    Args:
        corrupted: the corrupted input: text or ids, or a dict of forward keywords (a
            processor's output, or ``{"input": text, "images": [...]}``).
        clean_cache: the clean run's cache; it must hold every hook the targets patch.
        metric: ``fn(output) -> scalar``, output being what the bridge returns (logits).
        targets: the patches of each run, in the row-major order of `axes`.
        axes: axis name -> its coordinates; the product of their lengths is len(targets).
        progress: show a progress bar (tqdm).

    Returns:
        A `PatchResult` shaped by `axes`.

    Raises:
        InputError: targets that do not fill the axes; clean and corrupted activations of
            different shapes.
    """
    shape = tuple(len(coords) for coords in axes.values())
    if len(targets) != _prod(shape):
        raise InputError(f"{len(targets)} targets do not fill axes of shape {shape}")
    inputs = _prepared(bridge, corrupted)
    values = torch.empty(len(targets))
    bar = _bar(len(targets), progress)
    try:
        for i, patches in enumerate(targets):
            hooks = _patch_hooks(bridge, clean_cache, patches)
            with torch.no_grad():
                output = bridge.run_with_hooks(**inputs, fwd_hooks=hooks)
            values[i] = float(metric(output))
            bar.update(1)
    finally:
        bar.close()
    coords = {name: list(c) for name, c in axes.items()}
    return PatchResult(values.view(shape), tuple(axes), coords, image)


def activation_patch(
    bridge: BridgeLike,
    corrupted: Any,
    clean_cache: ActivationCache,
    metric: Metric,
    hook_names: str | Sequence[str],
    positions: Choice = None,
    heads: Choice = None,
    *,
    batch: int | None = None,
    progress: bool = True,
) -> PatchResult:
    """Patch each hook, at each position and/or head, and record the metric.

    Positions are dimension 1 of the activation and heads dimension 2 (``hook_q/k/v/z``,
    ``[batch, pos, head, d_head]``); for ``hook_pattern`` / ``hook_attn_scores``
    (``[batch, head, q_pos, k_pos]``) heads are dimension 1 and positions the query positions.

    Args:
        hook_names: hook names (aliases and TransformerLens shorthand such as
            ``"blocks.0.hook_resid_pre"``).
        positions: positions to patch one at a time, "all", or None to patch every position
            at once (no "pos" axis).
        heads: heads to patch one at a time, "all", or None (no "head" axis).
        batch: patch only this batch row (default: every row).

    Returns:
        Values of shape ``[hooks, (positions), (heads)]``, axes ``("hook", "pos", "head")``
        for those given.
    """
    names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
    if not names:
        raise InputError("activation_patch needs at least one hook name")
    canonical = [bridge._names.canonical(name) for name in names]
    first = clean_cache[canonical[0]]
    pos_dim, head_dim = _dims(canonical[0])
    axes: dict[str, list[Any]] = {"hook": names}
    if positions is not None:
        axes["pos"] = _choose(positions, first.shape[pos_dim], "positions")
    if heads is not None:
        axes["head"] = _choose(heads, first.shape[head_dim], "heads")
    targets = []
    for hook, *rest in itertools.product(canonical, *list(axes.values())[1:]):
        pos_dim, head_dim = _dims(hook)
        index: list[Any] = [slice(None)] * (max(pos_dim, head_dim) + 1)
        index[0] = slice(None) if batch is None else batch
        chosen = dict(zip(list(axes)[1:], rest, strict=True))
        if "pos" in chosen:
            index[pos_dim] = chosen["pos"]
        if "head" in chosen:
            index[head_dim] = chosen["head"]
        targets.append([Patch(hook, tuple(index))])
    return patch_sweep(bridge, corrupted, clean_cache, metric, targets, axes, progress=progress)


def patch_image_positions(
    bridge: BridgeLike,
    corrupted: Any,
    clean_cache: ActivationCache,
    metric: Metric,
    *,
    image: int = 0,
    batch: int = 0,
    activation: str = "resid_pre",
    layers: Sequence[int] | None = None,
    progress: bool = True,
) -> PatchResult:
    """Patch the language model's `activation` at each token of an image, layer by layer.

    Returns:
        Axes ``("layer", "pos")`` over the image's token positions; `PatchResult.grid` lays
        them on the patch grid ``[layer, rows, cols]``.
    """
    placement = layout_of(clean_cache).image(image, batch)
    chosen = list(range(bridge.cfg.n_layers)) if layers is None else list(layers)
    positions = placement.positions.tolist()
    targets = [
        [Patch(act_name(activation, layer), (batch, pos))] for layer in chosen for pos in positions
    ]
    axes = {"layer": chosen, "pos": positions}
    return patch_sweep(
        bridge, corrupted, clean_cache, metric, targets, axes, image=placement, progress=progress
    )


def patch_vision_layers(
    bridge: BridgeLike,
    corrupted: Any,
    clean_cache: ActivationCache,
    metric: Metric,
    *,
    image: int = 0,
    batch: int = 0,
    activation: str = "resid_post",
    progress: bool = True,
) -> PatchResult:
    """Patch a whole vision layer's `activation` for one image (all its crops), layer by layer.

    Returns:
        Axis ``("layer",)`` over the vision tower's layers.
    """
    layout = layout_of(clean_cache)
    placement = layout.image(image, batch)
    stack = _route(layout).stack
    layers = bridge.get_submodule(stack)
    if not isinstance(layers, torch.nn.ModuleList):
        raise InputError(f"{stack!r} is not a list of layers of this bridge")
    n_layers = len(layers)
    rows = placement.vision_rows
    targets = [[Patch(f"{stack}.{i}.hook_{activation}", (rows,))] for i in range(n_layers)]
    axes = {"layer": list(range(n_layers))}
    return patch_sweep(
        bridge, corrupted, clean_cache, metric, targets, axes, image=placement, progress=progress
    )


def patch_image_patches(
    bridge: BridgeLike,
    corrupted: Any,
    clean_cache: ActivationCache,
    metric: Metric,
    *,
    image: int = 0,
    batch: int = 0,
    hooks: Sequence[str] | None = None,
    progress: bool = True,
) -> PatchResult:
    """Patch each patch of an image at the selected vision layer(s) (what the projector gets).

    Args:
        hooks: vision hook names to patch (default: the selected features' hooks).

    Returns:
        Axis ``("patch",)`` over each tile's patches, coordinates (tile, row, col);
        `PatchResult.grid` gives ``[rows, cols]`` (one per tile for any-resolution). A patch
        whose feature is merged from several tower tokens (Qwen2-VL's 2 x 2) patches them all.
    """
    layout = layout_of(clean_cache)
    placement = layout.image(image, batch)
    names = list(_route(layout).feature_hooks if hooks is None else hooks)
    targets, coords = [], []
    for t, tile in enumerate(placement.tiles):
        rows, cols = tile.grid
        for row, col in itertools.product(range(rows), range(cols)):
            index = _vision_index(tile.vision_index[row, col])
            targets.append([Patch(name, index) for name in names])
            coords.append((t, row, col))
    return patch_sweep(
        bridge,
        corrupted,
        clean_cache,
        metric,
        targets,
        {"patch": coords},
        image=placement,
        progress=progress,
    )


# -- helpers ------------------------------------------------------------------------------


def _prepared(bridge: BridgeLike, corrupted: Any) -> dict[str, Any]:
    """The corrupted input as forward keywords, processed once for every run of the sweep."""
    if isinstance(corrupted, Mapping):
        kwargs = dict(corrupted)
        text, images = kwargs.pop("input", None), kwargs.pop("images", None)
        return bridge.prepare_inputs(text, images, **kwargs)
    return bridge.prepare_inputs(corrupted)


def _patch_hooks(
    bridge: BridgeLike, clean_cache: ActivationCache, patches: Sequence[Patch]
) -> list[tuple[str, Callable[..., torch.Tensor]]]:
    by_hook: dict[str, list[Index]] = {}
    for patch in patches:
        by_hook.setdefault(bridge._names.canonical(patch.hook), []).append(patch.index)
    return [(hook, _setter(clean_cache[hook], indices)) for hook, indices in by_hook.items()]


def _setter(clean: torch.Tensor, indices: list[Index]) -> Callable[..., torch.Tensor]:
    def patch(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        if activation.shape != clean.shape:
            raise InputError(
                f"{hook.name}: the clean activation has shape {tuple(clean.shape)}, the "
                f"corrupted one {tuple(activation.shape)}; patching needs inputs of the same "
                "shape (the same number of tokens, images and crops)"
            )
        patched = activation.clone()
        for index in indices:
            at = tuple(i.to(patched.device) if isinstance(i, torch.Tensor) else i for i in index)
            patched[at] = clean[index].to(patched.device, patched.dtype)
        return patched

    return patch


def _vision_index(cell: torch.Tensor) -> Index:
    """A patch's `Tile.vision_index` entry as an index: ``(crop, token)``, or one tensor per
    dimension for a feature merged from several tower tokens."""
    if cell.dim() == 1:
        return tuple(int(i) for i in cell)
    return tuple(cell.reshape(-1, cell.shape[-1]).unbind(-1))


def _dims(hook: str) -> tuple[int, int]:
    """(pos dimension, head dimension) of a hook's activation."""
    if hook.endswith(("hook_pattern", "hook_attn_scores")):
        return 2, 1
    return 1, 2


def _choose(choice: Choice, size: int, what: str) -> list[int]:
    if choice is None:
        return []
    if isinstance(choice, str):
        if choice != "all":
            raise InputError(f"{what} must be 'all', a list of indices or None (got {choice!r})")
        return list(range(size))
    chosen = [int(i) for i in (choice.tolist() if isinstance(choice, torch.Tensor) else choice)]
    bad = [i for i in chosen if not -size <= i < size]
    if bad:
        raise InputError(f"{what} {bad} are out of range: the activation has {size}")
    return chosen


def _route(layout: Any) -> Any:
    if layout.vision is None:
        raise InputError("this model's plugin does not say which vision layers feed the LM")
    return layout.vision


def _prod(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def _bar(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="patching", leave=False)


__all__ = [
    "Patch",
    "PatchResult",
    "activation_patch",
    "patch_image_patches",
    "patch_image_positions",
    "patch_sweep",
]
