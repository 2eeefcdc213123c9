"""Quick checks of the tiny random-weight builders in bridge_adapters.tiny and bridge_llava.tiny."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    LlavaForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from bridge_adapters.tiny import (
    CORPUS,
    build_tokenizer,
    save_as_hub_cache,
    save_pretrained,
    tiny_gpt2,
    tiny_llama,
    tiny_mistral,
    tiny_qwen2,
)
from bridge_llava.tiny import (
    VisionFeatureSelectStrategy,
    num_image_tokens,
    tiny_image,
    tiny_llava,
    tiny_llava_next,
)

TextBuilder = Callable[[], tuple[PreTrainedModel, PreTrainedTokenizerFast]]
TEXT_BUILDERS: dict[str, TextBuilder] = {
    "gpt2": tiny_gpt2,
    "llama": tiny_llama,
    "mistral": tiny_mistral,
    "qwen2": tiny_qwen2,
}
TEXTS = [
    *filter(None, CORPUS.splitlines()),
    "In 2024, 12345 numbers!!  two  spaces\n\nand héllo 日本",
]
PROMPT = "<image> What is this?"
REPO_ROOT = Path(__file__).resolve().parents[1]


def _logits(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run a no-grad forward and return the logits."""
    with torch.no_grad():
        logits: torch.Tensor = model(**inputs).logits
    return logits


def _generate(model: Any, inputs: Mapping[str, torch.Tensor], new_tokens: int) -> torch.Tensor:
    """Greedy-generate; `Any` because HF types `generate`'s self as a protocol some models miss."""
    out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    assert isinstance(out, torch.Tensor)
    return out


def test_tokenizer_is_deterministic_and_sized() -> None:
    """Two builds serialise identically; specials come first; vocab fills `vocab_size`."""
    first, second = build_tokenizer(), build_tokenizer()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert len(first) == 512
    assert [first.unk_token_id, first.bos_token_id, first.eos_token_id, first.pad_token_id] == [
        0,
        1,
        2,
        3,
    ]


@pytest.mark.parametrize("add_bos", [False, True])
def test_tokenizer_round_trip(tmp_path: Path, add_bos: bool) -> None:
    """save_pretrained/AutoTokenizer reproduce ids and decode back to the text."""
    tokenizer = build_tokenizer(add_bos=add_bos, extra_special_tokens=("<image>",))
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert tokenizer("a <image> b").input_ids.count(image_id) == 1
    for text in TEXTS:
        ids = tokenizer(text).input_ids
        assert reloaded(text).input_ids == ids
        assert (ids[0] == tokenizer.bos_token_id) == add_bos
        assert reloaded.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("name", sorted(TEXT_BUILDERS))
def test_text_builder_forward_and_round_trip(tmp_path: Path, name: str) -> None:
    """Each text model runs, is float32/eval, and reloads with identical logits."""
    model, tokenizer = TEXT_BUILDERS[name]()
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    inputs = tokenizer(["Hello world! The quick brown fox."], return_tensors="pt")
    logits = _logits(model, dict(inputs))
    assert logits.shape == (1, inputs.input_ids.shape[1], model.config.vocab_size)
    save_pretrained(model, tokenizer, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    reloaded_inputs = AutoTokenizer.from_pretrained(tmp_path)(TEXTS[:1], return_tensors="pt")
    assert torch.equal(
        reloaded_inputs.input_ids, tokenizer(TEXTS[:1], return_tensors="pt").input_ids
    )
    assert torch.equal(_logits(reloaded, dict(inputs)), logits)


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
def test_llama_family_uses_gqa(name: str) -> None:
    """Llama-family builders default to grouped-query attention; Qwen2 has q/k/v biases."""
    model, tokenizer = TEXT_BUILDERS[name]()
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    assert tokenizer("hi").input_ids[0] == tokenizer.bos_token_id
    attn = model.get_submodule("model.layers.0.self_attn")
    assert (attn.get_submodule("q_proj").bias is not None) == (name == "qwen2")


def test_seed_controls_weights() -> None:
    """The same seed gives identical weights, another seed different ones."""
    a, b, c = tiny_llama()[0], tiny_llama()[0], tiny_llama(seed=1)[0]
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.state_dict()[weight], c.state_dict()[weight])


def test_tiny_image_is_deterministic() -> None:
    """Images depend only on their arguments."""
    assert tiny_image().tobytes() == tiny_image().tobytes()
    assert tiny_image(seed=1).tobytes() != tiny_image().tobytes()
    board = tiny_image(48, "checkerboard")
    assert board.size == (48, 48) and board.mode == "RGB"
    assert board.tobytes() != tiny_image(48).tobytes()


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_llava_processor_expands_image_tokens(strategy: VisionFeatureSelectStrategy) -> None:
    """The processor inserts one token per image feature, so forward and generate work."""
    model, processor = tiny_llava(vision_feature_select_strategy=strategy)
    inputs = processor(text=PROMPT, images=[tiny_image()], return_tensors="pt")
    n_image = int((inputs.input_ids == model.config.image_token_id).sum())
    assert n_image == num_image_tokens(32, 8, strategy) == model.config.image_seq_length
    logits = _logits(model, dict(inputs))
    assert logits.shape[:2] == inputs.input_ids.shape
    assert _generate(model, inputs, 3).shape[1] == inputs.input_ids.shape[1] + 3


def test_llava_round_trip(tmp_path: Path) -> None:
    """A saved LLaVA model and processor reload to identical inputs and logits."""
    model, processor = tiny_llava()
    inputs = processor(text=PROMPT, images=[tiny_image()], return_tensors="pt")
    logits = _logits(model, dict(inputs))
    save_pretrained(model, processor, tmp_path)
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    # AutoProcessor.from_pretrained is unannotated in transformers.
    reloaded_processor = AutoProcessor.from_pretrained(tmp_path)  # type: ignore[no-untyped-call]
    reloaded_inputs = reloaded_processor(text=PROMPT, images=[tiny_image()], return_tensors="pt")
    assert all(torch.equal(reloaded_inputs[k], v) for k, v in inputs.items())
    assert torch.equal(_logits(reloaded, dict(reloaded_inputs)), logits)


def test_llava_next_forward() -> None:
    """LLaVA-NeXT tiles a non-square image and runs forward and generate."""
    model, processor = tiny_llava_next()
    inputs = processor(text=PROMPT, images=[tiny_image(64).resize((64, 32))], return_tensors="pt")
    assert inputs.pixel_values.shape[1] > 1  # base image + tiles
    assert _logits(model, dict(inputs)).shape[:2] == inputs.input_ids.shape
    assert _generate(model, inputs, 2).shape[1] == inputs.input_ids.shape[1] + 2


def test_hub_cache_layout(tmp_path: Path) -> None:
    """refs/main names the snapshot, whose files resolve to blobs."""
    model, tokenizer = tiny_gpt2()
    snapshot = save_as_hub_cache(
        save_pretrained(model, tokenizer, tmp_path / "local"), "org/name", tmp_path / "hf"
    )
    repo = tmp_path / "hf" / "hub" / "models--org--name"
    assert snapshot.parent == repo / "snapshots"
    assert (repo / "refs" / "main").read_text() == snapshot.name
    assert len(snapshot.name) == 40
    for file in snapshot.iterdir():
        assert file.resolve().parent == (repo / "blobs").resolve()


def test_hub_cache_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Patching huggingface_hub.constants (not os.environ) serves a cached repo id offline."""
    model, tokenizer = tiny_qwen2()
    save_as_hub_cache(save_pretrained(model, tokenizer, tmp_path / "m"), "org/q", tmp_path / "hf")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    inputs = dict(AutoTokenizer.from_pretrained("org/q")("Hello", return_tensors="pt"))
    reloaded = AutoModelForCausalLM.from_pretrained("org/q")
    assert torch.equal(_logits(reloaded, inputs), _logits(model, inputs))


OFFLINE_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoProcessor, AutoTokenizer,
                              LlavaForConditionalGeneration)
    from PIL import Image
    text_id, llava_id, image_path, out_path, threads = sys.argv[1:]
    torch.set_num_threads(int(threads))  # bitwise equality needs the parent's reduction order
    assert AutoConfig.from_pretrained(text_id).model_type == "llama"
    tok = AutoTokenizer.from_pretrained(text_id)
    with torch.no_grad():
        text = AutoModelForCausalLM.from_pretrained(text_id)(**tok("Hello", return_tensors="pt"))
        proc = AutoProcessor.from_pretrained(llava_id)
        inputs = proc(text="<image> What is this?", images=[Image.open(image_path)],
                      return_tensors="pt")
        llava = LlavaForConditionalGeneration.from_pretrained(llava_id)(**inputs)
    torch.save({"text": text.logits, "llava": llava.logits}, out_path)
    """
)


def test_hub_cache_offline_subprocess(tmp_path: Path) -> None:
    """A fresh process with HF_HOME + HF_HUB_OFFLINE=1 loads both repo ids by name."""
    hf_home, image_path, out_path = tmp_path / "hf", tmp_path / "img.png", tmp_path / "out.pt"
    llama, tokenizer = tiny_llama()
    llava, processor = tiny_llava()
    save_as_hub_cache(save_pretrained(llama, tokenizer, tmp_path / "a"), "tiny/llama", hf_home)
    save_as_hub_cache(
        save_pretrained(llava, processor, tmp_path / "b"), "llava-hf/tiny-random-llava", hf_home
    )
    tiny_image().save(image_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    args = ["tiny/llama", "llava-hf/tiny-random-llava", str(image_path), str(out_path)]
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT, *args, str(torch.get_num_threads())],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(out_path)
    text_inputs = dict(tokenizer("Hello", return_tensors="pt"))
    llava_inputs = dict(processor(text=PROMPT, images=[tiny_image()], return_tensors="pt"))
    assert torch.equal(got["text"], _logits(llama, text_inputs))
    assert torch.equal(got["llava"], _logits(llava, llava_inputs))
