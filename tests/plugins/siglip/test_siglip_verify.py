"""verify on every SigLIP family: images made through the processor in the family's format,
dead ends declared (LLaVA-OneVision's post-layernorm), repeated calls none."""

from __future__ import annotations

from typing import Any

import pytest

from bridge_core import InputError, TransformerBridge


def test_verify_is_green(bridge: TransformerBridge, name: str) -> None:
    report = bridge.verify()
    assert report.failures() == [], report.summary()
    by = {(r.check, r.hook): r for r in report.results}
    for hook in ("vision_encoder.layers.0.attn.hook_pattern", "vision_encoder.hook_in"):
        assert by["fires", hook].ok  # once per forward: every view in one batch
    assert by["causal", "vision_encoder.layers.0.hook_out"].detail == (
        "an edit changes the outputs"
    )
    dead = by["causal", "vision_encoder.post_layernorm.hook_out"].detail
    assert dead.startswith("declared unreachable") == (name == "llava_onevision")


def test_verify_needs_the_processor(model_and_processor: tuple[Any, Any]) -> None:
    model, _ = model_and_processor
    with pytest.raises(InputError, match="need the model's processor"):
        TransformerBridge.wrap(model).verify()
