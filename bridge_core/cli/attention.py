"""``transformer-bridge attention-map MODEL --image PATH --prompt TEXT --layer L --out map.png``.

How much one query token attends to each patch of the image, in one language-model layer
(`bridge_core.multimodal.attention_to_image`), painted over the image (`save_heatmap`).
`demo` draws the same picture for its run.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bridge_core.cli.app import UsageError
from bridge_core.cli.model import boot, load_image, model_inputs, model_options, takes_images
from bridge_core.cli.render import Output

if TYPE_CHECKING:
    from bridge_core.bridge import TransformerBridge
    from bridge_core.cache import ActivationCache


@dataclass(frozen=True)
class AttentionMap:
    """What was drawn, for the summary line."""

    path: Path
    layer: int
    head: int | None
    query: int
    token: str
    grid: tuple[int, int]
    tile: int
    tiles: int
    peak: tuple[int, int]
    box: tuple[float, float, float, float] | None


def setup(parser: argparse.ArgumentParser) -> None:
    """The model options (``--image`` required), ``--prompt``, ``--layer``, ``--head``,
    ``--query`` and ``--out``."""
    model_options(parser, image_default=False, image_required=True)
    parser.add_argument("--prompt", required=True, help="prompt text")
    parser.add_argument("--layer", type=int, required=True, help="language-model block (e.g. -1)")
    parser.add_argument("--head", type=int, help="attention head (default: mean over heads)")
    parser.add_argument(
        "--query", type=int, default=-1, help="query position (default: -1, the last token)"
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="FILE.png", help="where to write the PNG"
    )
    parser.set_defaults(handler=cmd_attention_map)


def cmd_attention_map(args: argparse.Namespace, out: Output) -> int:
    """Boot MODEL, run the prompt and image, and write the attention map of ``--layer``."""
    if not args.out.parent.is_dir():
        raise UsageError(f"--out: directory {str(args.out.parent)!r} does not exist")
    image = load_image(args.image)
    bridge = boot(args)
    if not takes_images(bridge):
        raise UsageError(
            f"{args.model} takes no images (no image processor was saved with it); "
            "attention-map needs a vision-language model"
        )
    _, inputs = model_inputs(bridge, args.prompt, image)
    drawn = write_attention_map(
        bridge, inputs, image, args.out, layer=args.layer, head=args.head, query=args.query
    )
    out.line(describe(drawn))
    return 0


def write_attention_map(
    bridge: TransformerBridge,
    inputs: dict[str, Any],
    image: Any,
    path: Path,
    layer: int = -1,
    head: int | None = None,
    query: int = -1,
) -> AttentionMap:
    """Run `inputs` caching one layer's pattern, and paint the attention to the first image.

    For an any-resolution image the last tile (the high-resolution view) is drawn.

    Raises:
        UsageError: a layer, head or query position out of range; inputs without images.
    """
    n_layers = bridge.cfg.n_layers
    if not -n_layers <= layer < n_layers:
        raise UsageError(f"--layer {layer} is out of range: the model has {n_layers} blocks")
    if head is not None and not 0 <= head < bridge.cfg.n_heads:
        raise UsageError(f"--head {head} is out of range: the model has {bridge.cfg.n_heads} heads")
    seq = inputs["input_ids"].shape[-1]
    if not -seq <= query < seq:
        raise UsageError(f"--query {query} is out of range: the input has {seq} tokens")
    name = f"blocks.{layer % n_layers}.attn.hook_pattern"
    with torch.no_grad():
        _, cache = bridge.run_with_cache(**inputs, names_filter=name)
    return draw_attention_map(bridge, cache, inputs, image, path, layer, head, query)


def draw_attention_map(
    bridge: TransformerBridge,
    cache: ActivationCache,
    inputs: dict[str, Any],
    image: Any,
    path: Path,
    layer: int = -1,
    head: int | None = None,
    query: int = -1,
) -> AttentionMap:
    """Paint the attention to the first image from a cache that holds the layer's pattern.

    Args:
        inputs: the run's forward keywords; image: the (first) image of the run, as given.
    """
    from bridge_core.multimodal import attention_to_image, save_heatmap

    if "pixel_values" not in inputs:
        raise UsageError("the input holds no image, so there is no image to attend to")
    sizes = inputs.get("image_sizes", [(image.height, image.width)])  # for the pixel boxes
    layout = bridge.image_layout(**{**inputs, "image_sizes": sizes})
    cache.set_image_layout(layout)
    if not layout[0]:
        raise UsageError("the input holds no image tokens, so there is no image to attend to")
    grids = attention_to_image(cache, layer, head=head, query=query)
    tiles = grids if isinstance(grids, list) else [grids]
    placement = layout[0][0]
    tile, grid = placement.tiles[-1], tiles[-1]
    save_heatmap(image, grid, path, boxes=tile.boxes, size=max(256, *image.size))
    row, col = divmod(int(grid.argmax()), grid.shape[1])
    box = None if tile.boxes is None else placement.pixel_box(int(tile.positions[row, col]))
    input_ids = inputs["input_ids"]
    seq = input_ids.shape[-1]
    token = str(bridge.to_str_tokens(input_ids[0, query % seq :][:1])[0])
    return AttentionMap(
        path,
        layer % bridge.cfg.n_layers,
        head,
        query % seq,
        token,
        tile.grid,
        len(tiles) - 1,
        len(tiles),
        (row, col),
        box,
    )


def describe(drawn: AttentionMap) -> str:
    """One line saying what the picture shows and where it is."""
    heads = "mean over heads" if drawn.head is None else f"head {drawn.head}"
    rows, cols = drawn.grid
    tile = f" (tile {drawn.tile} of {drawn.tiles})" if drawn.tiles > 1 else ""
    where = f" of {rows}x{cols} patches{tile}"
    peak = f"; most at patch {drawn.peak}"
    if drawn.box is not None:
        peak += " = pixels ({:.0f}, {:.0f})-({:.0f}, {:.0f})".format(*drawn.box)
    return (
        f"Wrote {drawn.path}: attention of position {drawn.query} ({drawn.token!r}) to the "
        f"image{where}, layer {drawn.layer}, {heads}{peak}"
    )
