"""Booting each SigLIP family by hub id, offline, from a Hugging Face cache: the registry picks
the plugin's adapter, the processor is loaded with the model, and the bridge equals HF."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from bridge_adapters.tiny import save_as_hub_cache, save_pretrained
from bridge_siglip import tiny

REPOS = {
    "paligemma": ("google/tiny-random-paligemma", "tiny_paligemma", "<image>caption en"),
    "paligemma2": ("google/tiny-random-paligemma2", "tiny_paligemma2", "<image>caption en"),
    "gemma3": ("google/tiny-random-gemma3", "tiny_gemma3", "<start_of_image> What?"),
    "idefics3": ("HuggingFaceTB/tiny-random-smolvlm", "tiny_idefics3", "<image> What?"),
    "llava_onevision": ("llava-hf/tiny-random-onevision", "tiny_llava_onevision", "<image> What?"),
}

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from transformers import AutoModelForImageTextToText
    from bridge_core import TransformerBridge
    from bridge_llava.tiny import tiny_image
    from bridge_siglip import tiny

    for adapter, repo, builder, text in (line.split("|") for line in sys.argv[1:]):
        bridge = TransformerBridge.boot(repo, dtype=torch.float32)
        assert bridge.adapter.name == adapter, (repo, bridge.adapter.name)
        model = AutoModelForImageTextToText.from_pretrained(repo)
        processor = bridge.processor
        if processor is None:  # LLaVA-OneVision's needs torchvision to load: made here
            assert adapter == "llava_onevision"
            processor = tiny.tiny_llava_onevision()[1]
        images = [[tiny_image(64)]]
        inputs = dict(processor(text=[text], images=images, return_tensors="pt"))
        inputs.pop("labels", None)
        seen = {}  # the keywords the bridge calls the HF model with (position ids added)
        handle = bridge.original_model.register_forward_pre_hook(
            lambda m, a, kw: seen.update(kw), with_kwargs=True
        )
        with torch.no_grad():
            logits, cache = bridge.run_with_cache(**inputs)
            expected = model(**seen).logits
            assert torch.equal(logits, expected), adapter
            if bridge.processor is not None:  # the processor convenience, as loaded
                assert torch.equal(bridge([text], images=images), expected), adapter
        handle.remove()
        assert cache.image_layout is not None and cache.image_layout.images, adapter
        print("booted", adapter, type(bridge.processor).__name__)
    """
)


def test_boot_by_hub_id_offline(tmp_path: Path) -> None:
    hf_home = tmp_path / "hf"
    lines = []
    for adapter, (repo, builder, text) in REPOS.items():
        if builder == "tiny_paligemma2":
            model, processor = tiny.tiny_paligemma(text="gemma2")
        else:
            model, processor = getattr(tiny, builder)()
        saved = save_pretrained(model, processor, tmp_path / adapter)
        save_as_hub_cache(saved, repo, hf_home)
        lines.append("|".join((adapter, repo, builder, text)))
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "TRANSFORMERS_", "TRANSFORMER_BRIDGE_"))
    }
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, *lines],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for adapter in REPOS:
        assert f"booted {adapter}" in result.stdout
