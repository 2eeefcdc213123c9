"""verify on Qwen2-VL and Qwen2.5-VL: per-image (per-window) calls declared and checked."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

from bridge_adapters.tiny import save_pretrained
from bridge_core import TransformerBridge
from bridge_core.cli import main
from bridge_core.verify import Result
from bridge_qwen2vl.tiny import IMAGE_PROMPT


def by_check(results: list[Result]) -> dict[tuple[str, str], Result]:
    return {(r.check, r.hook): r for r in results}


def test_verify_is_green_with_and_without_the_processor(
    bridge: TransformerBridge, model: Any
) -> None:
    report = bridge.verify()
    assert report.ok, report.summary()
    bare = TransformerBridge.wrap(model).verify()  # pixel values and image tokens made up
    assert bare.ok, bare.summary()


def test_the_vision_tower_is_checked_call_by_call(bridge: TransformerBridge, family: str) -> None:
    results = by_check(bridge.verify().results)
    # verify's inputs: two rows, one image each (2x3 and 3x2 merged blocks, 24 patches)
    first, last = "vision_encoder.layers.0.attn", "vision_encoder.layers.1.attn"
    windowed = family == "qwen2_5_vl"  # layer 0 attends in windows of 2x2 blocks, layer 1 not
    declared = "4 times per forward (declared n_vision_windows)"
    if not windowed:
        declared = "2 times per forward (declared n_vision_sequences)"
    assert results["fires", f"{first}.hook_pattern"].detail == declared
    assert results["fires", f"{last}.hook_pattern"].detail == (
        "2 times per forward (declared n_vision_sequences)"
    )
    assert (
        results["fires", f"{first}.hook_q"].detail == "1 times per forward (declared n_vision_runs)"
    )
    calls = 4 if windowed else 2
    assert results["pattern", f"{first}.hook_pattern"].detail.endswith(
        f"(each of its {calls} calls)"
    )
    assert results["shape", f"{first}.hook_pattern"].detail.endswith("['n_heads', 'seq', 'seq']")
    assert results["shape", f"{first}.hook_z"].detail == (
        "[48, 4, 8] = ['patches', 'n_heads', 'd_head']"
    )
    for proj in "qkv":
        assert results["heads", f"{first}.hook_{proj}"].ok
    assert results["residual", "vision_encoder.layers.0.hook_resid_post"].ok
    assert results["causal", "vision_encoder.hook_out"].detail.startswith("declared unreachable")
    assert results["causal", "vision_projector.mlp.hook_in"].ok


def test_two_images_in_a_prompt_verify(bridge: TransformerBridge, images: list[Any]) -> None:
    inputs = bridge.prepare_inputs(
        [f"{IMAGE_PROMPT} and {IMAGE_PROMPT}", f"one {IMAGE_PROMPT}"],
        images=[*images, images[0]],
    )
    report = bridge.verify(inputs)
    assert report.ok, report.summary()
    fired = by_check(report.results)["fires", "vision_encoder.layers.1.attn.hook_pattern"]
    assert fired.detail == "3 times per forward (declared n_vision_sequences)"


def test_a_wrong_call_count_fails_fires(model: Any, processor: Any) -> None:
    bridge = TransformerBridge.wrap(model, processor=processor)
    point = bridge.hook_dict["vision_encoder.layers.1.attn.hook_pattern"]
    point.calls = 1  # as if the kernel ran once per forward
    failed = {(r.check, r.hook) for r in bridge.verify().failures()}
    assert failed == {("fires", "vision_encoder.layers.1.attn.hook_pattern")}


def test_the_cli_verifies_a_saved_checkpoint(
    qwen_models: dict[str, tuple[Any, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, processor = qwen_models["qwen2_5_vl"]
    directory = save_pretrained(model, processor, tmp_path / "qwen2.5-vl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no torchvision: booted without its processor
        assert main(["verify", str(directory), "--plain"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("verify qwen2_5_vl (Qwen2_5_VLForConditionalGeneration): ")
    assert last.endswith(" checks passed")
