"""Harvesting a multimodal dataset (JSONL with image paths) on the tiny LLaVA."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from bridge_core import TransformerBridge
from bridge_core.harvest import harvest
from bridge_llava.tiny import tiny_image

HOOK = "blocks.1.hook_resid_post"


def dataset(folder: Path, prompt: str) -> tuple[Path, list[dict[str, Any]]]:
    for i in range(2):
        tiny_image(48, kind="checkerboard", seed=i).save(folder / f"img{i}.png")
    rows: list[dict[str, Any]] = [
        {"id": "a", "text": prompt, "images": ["img0.png"]},
        {"id": "b", "text": "A question without a picture?"},
        {"id": "c", "text": "USER: <image>\nDescribe it. ASSISTANT:", "images": ["img1.png"]},
    ]
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path, rows


def single(bridge: TransformerBridge, row: dict[str, Any], folder: Path) -> dict[str, Any]:
    images = [Image.open(folder / p).convert("RGB") for p in row.get("images", [])]
    with torch.no_grad():
        if images:
            _, cache = bridge.run_with_cache(row["text"], images=images, names_filter=HOOK)
            ids = bridge.processor(text=row["text"], images=images, return_tensors="pt")
        else:
            _, cache = bridge.run_with_cache(row["text"], names_filter=HOOK)
            ids = bridge.tokenizer(row["text"], return_tensors="pt")
    return {"acts": cache[HOOK][0], "ids": ids["input_ids"][0]}


def test_image_and_text_positions_equal_single_runs(
    bridge: TransformerBridge, prompt: str, tmp_path: Path
) -> None:
    path, rows = dataset(tmp_path, prompt)
    image_token = bridge.cfg.image_token_id
    for positions in ("image", "text"):
        reader = harvest(
            bridge,
            path,
            HOOK,
            tmp_path / positions,
            batch_size=2,
            positions=positions,
            progress=False,
        )
        for row in rows:
            expected = single(bridge, row, tmp_path)
            keep = expected["ids"] == image_token
            keep = keep if positions == "image" else ~keep
            got = reader[HOOK][reader.index.rows(row["id"])]
            torch.testing.assert_close(got, expected["acts"][keep], rtol=1e-5, atol=1e-5)
            assert reader.index.positions(row["id"]).tolist() == keep.nonzero().flatten().tolist()
    image_rows = harvest(
        bridge, path, HOOK, tmp_path / "image", batch_size=2, positions="image", progress=False
    ).index.rows("b")
    assert image_rows.stop == image_rows.start  # the text-only example has no image rows
