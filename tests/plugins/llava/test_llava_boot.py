"""Booting by hub id, offline, from a Hugging Face cache: the registry picks the plugin."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from bridge_adapters.tiny import save_as_hub_cache, save_pretrained

REPO = "llava-hf/tiny-random-llava"

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from bridge_llava.tiny import tiny_image
    from bridge_core import TransformerBridge

    bridge = TransformerBridge.boot(sys.argv[1], dtype=torch.float32)
    model = LlavaForConditionalGeneration.from_pretrained(sys.argv[1])
    processor = AutoProcessor.from_pretrained(sys.argv[1])
    assert bridge.adapter.name == "llava", bridge.adapter.name
    inputs = processor(text="USER: <image>\\nWhat? ASSISTANT:", images=[tiny_image()],
                       return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits
        logits, cache = bridge.run_with_cache("USER: <image>\\nWhat? ASSISTANT:",
                                              images=[tiny_image()])
    assert torch.equal(logits, expected)
    assert cache["vision_encoder.layers.1.hook_resid_post"].shape == (1, 17, 32)
    tokens = bridge.generate(**inputs, max_new_tokens=4)
    assert torch.equal(tokens, model.generate(**inputs, max_new_tokens=4, do_sample=False))
    print("booted", type(bridge.processor).__name__)
    """
)


def test_boot_by_hub_id_offline(tmp_path: Path, llava: tuple[Any, Any]) -> None:
    model, processor = llava
    saved = save_pretrained(model, processor, tmp_path / "saved")
    save_as_hub_cache(saved, REPO, tmp_path / "hf")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "TRANSFORMERS_", "TRANSFORMER_BRIDGE_"))
    }
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, REPO],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "booted LlavaProcessor" in result.stdout
