"""verify on LLaVA and LLaVA-NeXT: images made through the processor, dead ends declared."""

from __future__ import annotations

from typing import Any

from bridge_core import TransformerBridge


def failures(bridge: TransformerBridge) -> set[tuple[str, str]]:
    return {(r.check, r.hook) for r in bridge.verify().failures()}


def test_llava_verifies(bridge: TransformerBridge) -> None:
    assert failures(bridge) == set()


def test_llava_next_verifies(llava_next: tuple[Any, Any]) -> None:
    model, processor = llava_next
    assert failures(TransformerBridge.wrap(model, processor=processor)) == set()


def test_the_checks_see_the_vision_tower(bridge: TransformerBridge) -> None:
    report = bridge.verify()
    assert not report.failures()
    by = {(r.check, r.hook): r for r in report.results}
    # the layer after the selected one (-2 of 2 layers) cannot reach the language model
    assert by["causal", "vision_encoder.layers.1.hook_out"].detail.startswith(
        "declared unreachable"
    )
    assert by["causal", "vision_encoder.layers.0.hook_out"].detail == "an edit changes the outputs"
    assert by["heads", "vision_encoder.layers.0.attn.hook_q"].ok
    assert by["fires", "vision_encoder.layers.0.attn.hook_pattern"].ok


def test_inputs_without_a_processor_are_pixel_values_of_the_tower_size(llava: Any) -> None:
    model, _ = llava
    report = TransformerBridge.wrap(model).verify()
    assert not report.failures()
