"""The vision attention runs once per image (per window): every call is kept, none is lost.

Against HF's own tensors: the rotated q and k its kernel received (recomputed from the
attention module's inputs with HF's rotary function), its per-image (per-window) splits, and
the attention weights HF's eager kernel gives for each call.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch

from bridge_core import InputError, TransformerBridge
from bridge_qwen2vl.tiny import IMAGE_PROMPT

TWO = f"{IMAGE_PROMPT} Compare this with {IMAGE_PROMPT} that."


def hf_kernel_inputs(model: Any, layer: int, inputs: Any) -> dict[str, Any]:
    """q, k, v as HF's vision attention hands them to its kernel, and its cu_seqlens."""
    attn = model.model.visual.blocks[layer].attn
    seen: dict[str, Any] = {}

    def grab(module: Any, args: Any, kwargs: Any) -> None:
        seen["hidden"], seen["kwargs"] = args[0], kwargs

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    hf = importlib.import_module(type(attn).__module__)
    hidden, kwargs = seen["hidden"], seen["kwargs"]
    with torch.no_grad():
        qkv = attn.qkv(hidden).reshape(hidden.shape[0], 3, attn.num_heads, -1)
        q, k, v = qkv.permute(1, 0, 2, 3).unbind(0)
        q, k = hf.apply_rotary_pos_emb_vision(q, k, *kwargs["position_embeddings"])
    lengths = kwargs["cu_seqlens"].diff().tolist()
    return {"q": q, "k": k, "v": v, "lengths": lengths, "attn": attn, "module": hf}


@pytest.mark.parametrize("layer", [0, 1])
def test_every_call_is_recorded_as_hf_computes_it(
    bridge: TransformerBridge, model: Any, processor: Any, images: list[Any], layer: int
) -> None:
    inputs = dict(processor(text=TWO, images=images, return_tensors="pt"))
    hf = hf_kernel_inputs(model, layer, inputs)
    _, cache = bridge.run_with_cache(**inputs)
    name = f"vision_encoder.layers.{layer}.attn"
    rot_q = cache.calls(f"{name}.hook_rot_q")
    assert [len(q) for q in rot_q] == hf["lengths"]  # one call per image (or window)
    assert torch.equal(cache[f"{name}.hook_rot_q"], hf["q"])  # the calls, concatenated
    assert torch.equal(cache[f"{name}.hook_rot_k"], hf["k"])
    patterns = cache.calls(f"{name}.hook_pattern")
    assert len(patterns) == len(hf["lengths"]) > 1
    splits = [torch.split(t, hf["lengths"]) for t in (hf["q"], hf["k"], hf["v"])]
    for pattern, (q, k, v) in zip(patterns, zip(*splits, strict=True), strict=True):
        heads = [t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)]  # as HF's kernel gets them
        _, weights = hf["module"].eager_attention_forward(
            hf["attn"], *heads, None, scaling=hf["attn"].scaling
        )
        assert pattern.shape == (4, len(q), len(q))
        torch.testing.assert_close(pattern, weights[0], rtol=0, atol=1e-6)
    with pytest.raises(InputError, match=r"use cache.calls\("):
        cache[f"{name}.hook_pattern"]
    # the points that fire once per forward hold every image's patches at once
    assert cache[f"{name}.hook_q"].shape == (124, 4, 8)


def test_one_image_has_one_call(bridge: TransformerBridge, images: list[Any]) -> None:
    _, cache = bridge.run_with_cache(f"{IMAGE_PROMPT} Hi", images=images[1:])
    pattern = cache["vision_encoder.layers.1.attn.hook_pattern"]  # full attention
    assert pattern.shape == (4, 64, 64)
    assert len(cache.calls("vision_encoder.layers.1.attn.hook_pattern")) == 1


def with_video(model: Any, processor: Any, images: list[Any], image: bool) -> dict[str, Any]:
    """A prompt with (an image and) a 2-frame video of 4x4 patches, its pixels made up."""
    inputs = dict(processor(text=f"{IMAGE_PROMPT} and", images=images[:1], return_tensors="pt"))
    video = torch.full((1, 8), model.config.video_token_id)  # 2 frames x 2x2 blocks
    ids = torch.cat([inputs["input_ids"], video], dim=1)
    kinds = (ids == model.config.image_token_id).long() + 2 * (ids == model.config.video_token_id)
    inputs.update(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=kinds,
        pixel_values_videos=torch.randn(32, 96, generator=torch.Generator().manual_seed(0)),
        video_grid_thw=torch.tensor([[2, 4, 4]]),
    )
    if not image:
        keep = ids[0] != model.config.image_token_id
        inputs = {k: v for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw")}
        for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
            inputs[key] = inputs[key][:, keep]
    return inputs


@pytest.mark.parametrize("image", [True, False])
def test_a_video_runs_the_tower_again(
    bridge: TransformerBridge, model: Any, processor: Any, images: list[Any], image: bool
) -> None:
    inputs = with_video(model, processor, images, image)
    with torch.no_grad():
        expected = model(**inputs).logits
    logits, cache = bridge.run_with_cache(**inputs)
    assert torch.equal(logits, expected)
    patches = 60 * image + 32  # the image's patches, then the video's
    assert cache["vision_encoder.layers.0.hook_resid_post"].shape == (patches, 32)
    assert len(cache.calls("vision_encoder.layers.1.attn.hook_pattern")) == image + 2  # frames
    parts = cache.decompose_resid()  # the video's features are in the image term
    torch.testing.assert_close(parts.sum(0), cache["resid_post", -1], rtol=0, atol=1e-5)
    report = bridge.verify(inputs)
    assert report.ok, report.summary()
