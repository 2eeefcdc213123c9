"""The benchmarked models, built locally with random weights, saved, and reloadable.

Each `Case` is saved into its own directory (HF's `save_pretrained`, plus the inputs and
a small ``case.json``) so that `boot` can be timed against `from_pretrained` and so that
fresh processes (`benchmarks.process`) can load the very same model and inputs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import transformers
from torch import nn

MODELS = ("tiny", "small", "llava")
_CASE_FILE = "case.json"
_INPUTS_FILE = "inputs.pt"
_LLAVA_PROMPT = "USER: <image>\nWhat is in this picture? ASSISTANT:"


@dataclass
class Case:
    """A model to benchmark, its inputs, and where its hooked block lives in the HF model.

    Attributes:
        name: "tiny", "small" or "llava".
        description: one line for the report.
        model: the HF model (float32, eval mode, its default attention kernel).
        inputs: keyword arguments of the HF forward.
        directory: where the model (and tokenizer or processor) is saved.
        layer: the block that the one-hook and ablation workloads use.
        head: the head that the ablation zeroes.
        d_head: head size.
        block_path: HF module path of that block (its output is ``hook_resid_post``).
        o_proj_path: HF module path of that block's attention output projection.
    """

    name: str
    description: str
    model: Any
    inputs: dict[str, Any]  # tensors
    directory: Path
    layer: int
    head: int
    d_head: int
    block_path: str
    o_proj_path: str
    tokenizer: Any = None
    processor: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_class(self) -> Any:
        """The HF class (what `from_pretrained` is called on)."""
        return type(self.model)

    @property
    def n_params(self) -> int:
        """Parameter count of the HF model."""
        module: nn.Module = self.model
        return sum(p.numel() for p in module.parameters())

    def hf_module(self, path: str) -> nn.Module:
        """The HF submodule at a dotted path."""
        module: nn.Module = self.model
        return module.get_submodule(path)

    def save(self) -> None:
        """Write the model, its tokenizer or processor, the inputs and ``case.json``."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(self.directory)
        for text in (self.tokenizer, self.processor):
            if text is not None:
                text.save_pretrained(self.directory)
        torch.save(self.inputs, self.directory / _INPUTS_FILE)
        meta = {
            "name": self.name,
            "description": self.description,
            "layer": self.layer,
            "head": self.head,
            "d_head": self.d_head,
            "block_path": self.block_path,
            "o_proj_path": self.o_proj_path,
        }
        (self.directory / _CASE_FILE).write_text(json.dumps(meta, indent=2))


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars or warnings from transformers while in the block (stdout is the report)."""
    logging: Any = transformers.utils.logging  # its functions are unannotated
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def build(name: str, root: Path) -> Case:
    """Build the model called `name`, save it under `root / name`, and return its Case."""
    builders: dict[str, Callable[[Path], Case]] = {
        "tiny": _tiny,
        "small": _small,
        "llava": _llava,
    }
    if name not in builders:
        raise ValueError(f"unknown benchmark model {name!r}; choose from {', '.join(MODELS)}")
    case = builders[name](root / name)
    case.save()
    return case


def load(directory: Path, attn_implementation: str | None = None) -> Case:
    """Load a saved Case: the model (`from_pretrained` of its own class), its inputs, and the
    processor or tokenizer that was saved with it."""
    meta = json.loads((directory / _CASE_FILE).read_text())
    config = transformers.AutoConfig.from_pretrained(directory)
    model_class = getattr(transformers, config.architectures[0])
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = model_class.from_pretrained(directory, **kwargs).eval()
    inputs = torch.load(directory / _INPUTS_FILE)
    text: dict[str, Any] = {}
    if (directory / "processor_config.json").exists():
        text["processor"] = cast(Any, transformers.AutoProcessor).from_pretrained(directory)
    elif (directory / "tokenizer_config.json").exists():
        text["tokenizer"] = transformers.AutoTokenizer.from_pretrained(directory)
    return Case(model=model, inputs=inputs, directory=directory, **meta, **text)


def hf_class(directory: Path) -> Any:
    """The HF model class saved in `directory` (its config's first architecture)."""
    config = transformers.AutoConfig.from_pretrained(directory)
    return getattr(transformers, config.architectures[0])


def _ids(vocab_size: int, batch: int, length: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (batch, length), generator=generator)


def _tiny(directory: Path) -> Case:
    from bridge_adapters.tiny import tiny_gpt2

    model, tokenizer = tiny_gpt2(n_layer=12, n_embd=64, n_head=4)
    return Case(
        name="tiny",
        description="GPT-2, 12 layers, d_model 64, 4 heads, vocab 512; batch 1 x 16 tokens",
        model=model,
        inputs={"input_ids": _ids(model.config.vocab_size, 1, 16)},
        directory=directory,
        layer=6,
        head=1,
        d_head=16,
        block_path="transformer.h.6",
        o_proj_path="transformer.h.6.attn.c_proj",
        tokenizer=tokenizer,
    )


def _small(directory: Path) -> Case:
    from bridge_adapters.tiny import init_model

    config = transformers.GPT2Config()  # the defaults are GPT-2 small's (124M parameters)
    model = init_model(transformers.GPT2LMHeadModel, config, seed=0)
    return Case(
        name="small",
        description=(
            "GPT-2 small config: 12 layers, d_model 768, 12 heads, vocab 50257 (124M params); "
            "batch 2 x 64 tokens"
        ),
        model=model,
        inputs={"input_ids": _ids(config.vocab_size, 2, 64)},
        directory=directory,
        layer=6,
        head=3,
        d_head=64,
        block_path="transformer.h.6",
        o_proj_path="transformer.h.6.attn.c_proj",
    )


def _llava(directory: Path) -> Case:
    tiny = _llava_tiny_module()
    model, processor = tiny.tiny_llava(
        vision_layers=4,
        text_layers=4,
        image_size=224,
        patch_size=14,
        vision_hidden=64,
        text_hidden=128,
    )
    encoded = processor(text=_LLAVA_PROMPT, images=[tiny.tiny_image(224)], return_tensors="pt")
    inputs = {key: value for key, value in encoded.items() if isinstance(value, torch.Tensor)}
    length = inputs["input_ids"].shape[1]
    return Case(
        name="llava",
        description=(
            "LLaVA: CLIP 4 layers (d 64, 224 px, patch 14) + Llama 4 layers (d 128, GQA); "
            f"batch 1 x {length} tokens (256 image tokens)"
        ),
        model=model,
        inputs=inputs,
        directory=directory,
        layer=2,
        head=1,
        d_head=32,
        block_path="model.language_model.layers.2",
        o_proj_path="model.language_model.layers.2.self_attn.o_proj",
        processor=processor,
    )


def _llava_tiny_module() -> Any:
    """`bridge_llava.tiny`, also from a checkout where the plugin is not installed yet."""
    try:
        import bridge_llava.tiny as tiny
    except ModuleNotFoundError:
        plugin_root = Path(__file__).resolve().parents[1] / "plugins" / "llava"
        sys.path.insert(0, str(plugin_root))
        import bridge_llava.tiny as tiny
    return tiny
