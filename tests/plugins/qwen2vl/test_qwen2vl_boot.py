"""Booting by hub id, offline, from a Hugging Face cache laid out like the real checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from bridge_adapters.tiny import save_as_hub_cache, save_pretrained

REPOS = {"qwen2_vl": "Qwen/tiny-random-qwen2-vl", "qwen2_5_vl": "Qwen/tiny-random-qwen2.5-vl"}

SCRIPT = textwrap.dedent(
    """
    import sys
    import warnings
    import torch
    import transformers
    from bridge_core import TransformerBridge
    from bridge_qwen2vl.processing import load_processor
    from bridge_qwen2vl.tiny import IMAGE_PROMPT
    from bridge_qwen2vl.vision import example_image

    for repo, adapter in zip(sys.argv[1::2], sys.argv[2::2]):
        bridge = TransformerBridge.boot(repo, dtype=torch.float32)
        assert bridge.adapter.name == adapter, bridge.adapter.name
        architecture = transformers.AutoConfig.from_pretrained(repo).architectures[0]
        model = getattr(transformers, architecture).from_pretrained(repo)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no torchvision: no processor, a warning says so
            assert bridge.tokenizer is not None
        if bridge.processor is None:  # transformers builds Qwen2-VL's only with torchvision
            bridge.processor = load_processor(repo)
        text, image = f"{IMAGE_PROMPT} What is this?", example_image(24, 40, 0)
        inputs = bridge.processor(text=text, images=[image], return_tensors="pt")
        with torch.no_grad():
            expected = model(**inputs).logits
        logits, cache = bridge.run_with_cache(text, images=[image])
        assert torch.equal(logits, expected)
        assert cache["vision_encoder.layers.1.hook_resid_post"].shape == (60, 32)
        print("booted", adapter, type(bridge.processor).__name__)
    """
)


def as_published(directory: Path) -> None:
    """Name the processor class as Qwen's checkpoints do, with their video processor config."""
    config = directory / "processor_config.json"
    data = json.loads(config.read_text())
    data["processor_class"] = "Qwen2VLProcessor"
    config.write_text(json.dumps(data))
    video = {"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": 4, "merge_size": 2}
    (directory / "video_preprocessor_config.json").write_text(json.dumps(video))


def test_boot_by_hub_id_offline(tmp_path: Path, qwen_models: dict[str, tuple[Any, Any]]) -> None:
    args = []
    for adapter, repo in REPOS.items():
        model, processor = qwen_models[adapter]
        saved = save_pretrained(model, processor, tmp_path / adapter)
        as_published(saved)
        save_as_hub_cache(saved, repo, tmp_path / "hf")
        args += [repo, adapter]
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "TRANSFORMERS_", "TRANSFORMER_BRIDGE_"))
    }
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    booted = [line.split()[:2] for line in result.stdout.splitlines()]
    assert booted == [["booted", "qwen2_vl"], ["booted", "qwen2_5_vl"]], result.stdout
