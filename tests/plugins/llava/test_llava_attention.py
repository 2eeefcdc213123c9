"""Attention to an image on its patch grid, and the heatmap picture."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from bridge_core import InputError, TransformerBridge
from bridge_core.errors import MissingExtraError
from bridge_core.multimodal import attention_to_image, save_heatmap
from bridge_llava.tiny import tiny_image


@pytest.fixture(scope="module")
def run(bridge: TransformerBridge, image: Any) -> tuple[Any, Any]:
    texts = ["USER: <image>\nWhat is this? ASSISTANT:", "<image> and <image> Hi"]
    with torch.no_grad():
        return bridge.run_with_cache(texts, images=[image] * 3, padding_side="left")


def test_attention_to_image_is_the_pattern_on_the_grid(run: tuple) -> None:
    _, cache = run
    layout = cache.image_layout
    for batch, image, head, query in [(0, 0, None, -1), (1, 1, 2, -1), (1, 0, 0, 30)]:
        pattern = cache["blocks.1.attn.hook_pattern"][batch]
        weights = pattern.mean(0) if head is None else pattern[head]
        im = layout[batch][image]
        expected = weights[query, im.positions].view(4, 4)
        grid = attention_to_image(cache, 1, head=head, query=query, image=image, batch=batch)
        assert torch.equal(grid, expected)
    assert torch.equal(attention_to_image(cache, -1), attention_to_image(cache, 1))


def test_attention_to_image_bad_indices(run: tuple, bridge: TransformerBridge) -> None:
    _, cache = run
    with pytest.raises(InputError, match="has 4 heads; got head=4"):
        attention_to_image(cache, 0, head=4)
    with pytest.raises(InputError, match="batch row 0 has 1 image"):
        attention_to_image(cache, 0, image=1)
    with pytest.raises(InputError, match="positions; got query=99"):
        attention_to_image(cache, 0, query=99)
    _, text_cache = bridge.run_with_cache("no image", names_filter="blocks.0.attn.hook_pattern")
    with pytest.raises(InputError, match="no image layout"):
        attention_to_image(text_cache, 0)


def test_llava_next_gives_one_grid_per_tile(llava_next: tuple[Any, Any]) -> None:
    model, processor = llava_next
    bridge = TransformerBridge.wrap(model, processor=processor)
    _, cache = bridge.run_with_cache("<image> What?", images=[tiny_image(48)])
    base, high = attention_to_image(cache, 0)
    assert base.shape == (4, 4) and high.shape == (8, 8)


def test_save_heatmap_paints_the_grid_over_the_image(run: tuple, tmp_path: Path) -> None:
    _, cache = run
    grid = attention_to_image(cache, 1)
    picture = Image.fromarray(np.full((40, 64, 3), 200, dtype=np.uint8))  # centre-cropped
    path = save_heatmap(picture, grid, tmp_path / "map.png", size=128)
    with Image.open(path) as written:
        assert written.size == (128, 80) and written.format == "PNG"
    # with boxes, only the cells' boxes are painted: here the centre 40x40 of a 64x40 image
    boxes = torch.tensor(
        [
            [[10.0 * c + 12, 10.0 * r, 10.0 * c + 22, 10.0 * r + 10] for c in range(4)]
            for r in range(4)
        ]
    )
    save_heatmap(picture, grid, tmp_path / "boxed.png", alpha=1.0, boxes=boxes)
    painted = np.asarray(Image.open(tmp_path / "boxed.png"))
    assert (painted[:, :12] == 200).all() and (painted[:, 52:] == 200).all()
    assert (painted[:, 12:52] != 200).any(-1).all()
    same = np.asarray(Image.open(save_heatmap(picture, grid, tmp_path / "a0.png", alpha=0.0)))
    assert (same == 200).all()


def test_save_heatmap_errors(run: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = tiny_image(32)
    with pytest.raises(InputError, match=r"\[rows, cols\] grid; got \(16,\)"):
        save_heatmap(image, torch.zeros(16), tmp_path / "x.png")
    with pytest.raises(InputError, match="one per tile"):
        save_heatmap(image, [torch.zeros(4, 4), torch.zeros(8, 8)], tmp_path / "x.png")
    with pytest.raises(InputError, match=r"boxes must be \[rows, cols, 4\]"):
        save_heatmap(image, torch.zeros(4, 4), tmp_path / "x.png", boxes=torch.zeros(2, 2, 4))
    with pytest.raises(InputError, match="alpha must be between 0 and 1"):
        save_heatmap(image, torch.zeros(4, 4), tmp_path / "x.png", alpha=2)
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(MissingExtraError, match=r"transformer-bridge\[multimodal\]"):
        save_heatmap(image, torch.zeros(4, 4), tmp_path / "x.png")
