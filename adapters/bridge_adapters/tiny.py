"""Tiny random-weight HuggingFace models with real tokenizers, for tests, benchmarks and demos.

Everything here is built locally (no hub access) and is deterministic: the tokenizer is a
byte-level BPE trained on a fixed built-in corpus, and weights come from a seeded torch RNG.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, Protocol, TypedDict, TypeVar, Unpack

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Tokenizer,
)

__all__ = [
    "CORPUS",
    "build_tokenizer",
    "init_model",
    "save_as_hub_cache",
    "save_pretrained",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_mistral",
    "tiny_qwen2",
]

CORPUS: Final[str] = """\
The quick brown fox jumps over the lazy dog. The dog was not amused, and the fox ran \
back into the forest before the farmer could see what had happened.

Hello world! This is a small English corpus used to train a tiny byte-level tokenizer. \
It is not meant to be a good language model; it only needs enough text for the merges \
to look like real words, so that tests can print readable tokens.

Once upon a time there was a little cat who lived in a house by the river. Every morning \
the cat sat at the window and watched the boats go by. When it rained, the cat slept on \
the warm chair near the kitchen, and when the sun came out it chased the birds in the garden.

The Eiffel Tower is in Paris, the Colosseum is in Rome, and the Statue of Liberty is in \
New York. Paris is the capital of France, Rome is the capital of Italy, and Berlin is the \
capital of Germany. Many people travel to these cities every year to see the famous places.

What is this? This is a picture of a red apple on a wooden table. What color is the sky? \
The sky is blue during the day and dark at night. How many legs does a spider have? \
A spider has eight legs, an insect has six legs, and a dog has four legs.

Researchers study neural networks by looking at their activations. They read the residual \
stream, the attention patterns, and the outputs of each layer, and then they patch or ablate \
those activations to find out which parts of the model matter for a given behaviour.

One, two, three, four, five, six, seven, eight, nine, ten. Monday, Tuesday, Wednesday, \
Thursday, Friday, Saturday and Sunday are the days of the week. In 2024 the numbers 1, 2, \
3, 10, 42 and 100 appeared in many examples.

She said: "I will be there at 5 o'clock." He answered that he would wait for her at the \
station, near the old clock, and that they could walk home together after the train arrived.
"""

_ModelT = TypeVar("_ModelT", bound=PreTrainedModel)
_ConfigT = TypeVar("_ConfigT", bound=PreTrainedConfig)


class _Saveable(Protocol):
    """Anything with HuggingFace's `save_pretrained(directory)` (tokenizer or processor)."""

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> object:
        """Save to a directory."""


def _special_tokens(
    bos: str, eos: str, pad: str | None, unk: str, extra: Sequence[str]
) -> list[str]:
    """Return the special tokens in id order (unk, bos, eos, pad, extras), without duplicates."""
    ordered = [unk, bos, eos, *([pad] if pad is not None else []), *extra]
    return list(dict.fromkeys(ordered))


def _train_bpe(
    vocab_size: int, special_tokens: list[str], backend: Tokenizer | None = None
) -> Tokenizer:
    """Train a byte-level BPE on the built-in corpus (GPT-2 pre-tokenizer unless `backend`)."""
    if backend is None:
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    return backend


def build_tokenizer(
    vocab_size: int = 512,
    *,
    bos: str = "<s>",
    eos: str = "</s>",
    pad: str | None = "<pad>",
    unk: str = "<unk>",
    add_bos: bool = False,
    extra_special_tokens: Sequence[str] = (),
) -> PreTrainedTokenizerFast:
    """Build a deterministic byte-level BPE tokenizer trained on the built-in corpus.

    Special tokens get the lowest ids, in the order unk, bos, eos, pad, extras (duplicates,
    e.g. GPT-2's single `<|endoftext|>`, are kept once). The total size is at most `vocab_size`
    (exactly `vocab_size` up to about 830, where the built-in corpus runs out of merges).

    Args:
        vocab_size: Maximum vocabulary size, special tokens included (at least 256 + specials).
        bos: Beginning-of-sequence token.
        eos: End-of-sequence token.
        pad: Padding token, or None for no padding token (GPT-2 style).
        unk: Unknown token (never produced by byte-level BPE, but set like real checkpoints).
        add_bos: Prepend BOS to every encoded sequence (Llama style) through a
            TemplateProcessing post-processor; otherwise add no special tokens (GPT-2 style).
        extra_special_tokens: Further special tokens, e.g. `("<image>",)`; never split.

    Returns:
        A `PreTrainedTokenizerFast` that round-trips through save/from_pretrained.
    """
    specials = _special_tokens(bos, eos, pad, unk, extra_special_tokens)
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size={vocab_size} is below 256 bytes + {len(specials)} specials")
    # add_bos_token makes transformers install the TemplateProcessing post-processor itself
    # (and record the flag in tokenizer_config.json), so the behaviour survives a reload.
    # TokenizersBackend.__init__ takes untyped *args/**kwargs, hence the ignore.
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=_train_bpe(vocab_size, specials),
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        extra_special_tokens=list(extra_special_tokens),
        add_bos_token=add_bos,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
    )


def _qwen2_tokenizer(vocab_size: int) -> Qwen2Tokenizer:
    """Build a BOS-prepending `Qwen2Tokenizer` (Qwen's NFC + digit-splitting regex) on the corpus.

    AutoTokenizer always loads qwen2 checkpoints with `Qwen2Tokenizer`, which rebuilds the
    pipeline from vocab and merges; training with the same pipeline keeps save/load lossless.
    """
    specials = _special_tokens("<s>", "</s>", "<pad>", "<unk>", ())
    template = Qwen2Tokenizer(vocab={tok: i for i, tok in enumerate(specials)}, merges=[])
    trained = json.loads(_train_bpe(vocab_size, specials, template.backend_tokenizer).to_str())
    return Qwen2Tokenizer(
        vocab=trained["model"]["vocab"],
        # tokenizers' BPE needs (left, right) tuples; transformers annotates merges as list[str].
        merges=[tuple(pair) for pair in trained["model"]["merges"]],  # type: ignore[misc]
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        add_bos_token=True,
        add_eos_token=False,
    )


def init_model(model_cls: Callable[[_ConfigT], _ModelT], config: _ConfigT, seed: int) -> _ModelT:
    """Instantiate a model with seeded random weights, float32, in eval mode.

    Args:
        model_cls: The HF model class (or any factory taking the config).
        config: The model config.
        seed: Seed for `torch.manual_seed` before the weights are initialised.

    Returns:
        The model, deterministic for a given (class, config, seed).
    """
    torch.manual_seed(seed)
    model = model_cls(config)
    # Through nn.Module.to: PreTrainedModel.to is `@wraps`-decorated, which mypy mis-types; its
    # extra checks only concern quantized models.
    torch.nn.Module.to(model, torch.float32)
    model.train(False)  # == eval(); PreTrainedModel.eval is unannotated, train(mode: bool) is not
    return model


def tiny_gpt2(
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    vocab_size: int = 512,
    n_positions: int = 128,
    seed: int = 0,
) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """Build a tiny random GPT-2 (tied embeddings) and a GPT-2-style tokenizer (no BOS added).

    Args:
        n_layer: Number of transformer blocks.
        n_embd: Residual width.
        n_head: Attention heads.
        vocab_size: Vocabulary size of tokenizer and model.
        n_positions: Maximum sequence length.
        seed: Weight-initialisation seed.

    Returns:
        (model, tokenizer), the model float32 in eval mode.
    """
    tokenizer = build_tokenizer(vocab_size)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return init_model(GPT2LMHeadModel, config, seed), tokenizer


class DecoderSizes(TypedDict, total=False):
    """Sizes of a tiny Llama-family model; every key is optional (defaults in `DECODER_SIZES`)."""

    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int


DECODER_SIZES: Final[DecoderSizes] = DecoderSizes(
    num_hidden_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention
    intermediate_size=128,
    vocab_size=512,
    max_position_embeddings=128,
)

_Tok = TypeVar("_Tok", bound=PreTrainedTokenizerFast)


def _decoder(
    config_cls: Callable[..., _ConfigT],
    model_cls: Callable[[_ConfigT], _ModelT],
    tokenizer_for: Callable[[int], _Tok],
    seed: int,
    sizes: DecoderSizes,
) -> tuple[_ModelT, _Tok]:
    """Build a Llama-family model of `DECODER_SIZES` updated by `sizes`, and its tokenizer."""
    values = DecoderSizes(**DECODER_SIZES)
    values.update(sizes)
    tokenizer = tokenizer_for(values["vocab_size"])
    config = config_cls(
        **values,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return init_model(model_cls, config, seed), tokenizer


def _bos_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    return build_tokenizer(vocab_size, add_bos=True)


def tiny_llama(
    *, seed: int = 0, **sizes: Unpack[DecoderSizes]
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Build a tiny random Llama (grouped-query attention) and a BOS-prepending tokenizer.

    Args:
        seed: Weight-initialisation seed.
        **sizes: `DecoderSizes` to change (defaults: 2 layers, width 64, 4 query and 2
            key/value heads, MLP 128, vocabulary 512, 128 positions).

    Returns:
        (model, tokenizer), the model float32 in eval mode.
    """
    return _decoder(LlamaConfig, LlamaForCausalLM, _bos_tokenizer, seed, sizes)


def tiny_mistral(
    *, seed: int = 0, **sizes: Unpack[DecoderSizes]
) -> tuple[MistralForCausalLM, PreTrainedTokenizerFast]:
    """Build a tiny random Mistral (GQA) and a BOS-prepending tokenizer.

    With equal arguments its weights and logits equal `tiny_llama`'s (same module shapes and
    init order); pass another seed when the two must differ. Arguments as `tiny_llama`.
    """
    return _decoder(MistralConfig, MistralForCausalLM, _bos_tokenizer, seed, sizes)


def tiny_qwen2(
    *, seed: int = 0, **sizes: Unpack[DecoderSizes]
) -> tuple[Qwen2ForCausalLM, Qwen2Tokenizer]:
    """Build a tiny random Qwen2 (GQA, q/k/v biases) and a BOS-prepending Qwen2Tokenizer.

    Arguments as `tiny_llama`.
    """
    return _decoder(Qwen2Config, Qwen2ForCausalLM, _qwen2_tokenizer, seed, sizes)


def save_pretrained(
    model: PreTrainedModel, tokenizer_or_processor: _Saveable, directory: str | os.PathLike[str]
) -> Path:
    """Save a model and its tokenizer or processor into one directory.

    Args:
        model: The HF model.
        tokenizer_or_processor: Its tokenizer or processor.
        directory: Target directory (created if missing).

    Returns:
        The directory as a Path.
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer_or_processor.save_pretrained(path)
    return path


def _files_digest(files: Sequence[Path], root: Path) -> str:
    """Return a 40-hex-digit commit-like sha derived from the relative names and file contents."""
    digest = hashlib.sha1()
    for file in files:
        digest.update(file.relative_to(root).as_posix().encode())
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def _link_or_copy(blob: Path, target: Path) -> None:
    """Link `target` to `blob` relatively, as huggingface_hub does; copy if symlinks fail."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() or target.is_symlink():
        target.unlink()
    try:
        target.symlink_to(os.path.relpath(blob, target.parent))
    except OSError:
        shutil.copyfile(blob, target)


def save_as_hub_cache(
    local_dir: Path, repo_id: str, hf_home: Path, revision_sha: str | None = None
) -> Path:
    """Lay out a saved model directory as a HuggingFace hub cache entry for `repo_id`.

    Creates `hf_home/hub/models--{org}--{name}/` with `blobs/<sha256>`, `snapshots/<sha>/...`
    (relative symlinks into blobs, copies where symlinks are unsupported) and `refs/main`,
    exactly what `huggingface_hub` reads when offline.

    The caller must make huggingface_hub look there *and* stay offline. huggingface_hub copies
    `HF_HOME`/`HF_HUB_OFFLINE` into `huggingface_hub.constants` when it is first imported (which
    importing transformers does), so either set `HF_HOME=hf_home HF_HUB_OFFLINE=1` (and unset
    `HF_HUB_CACHE`, which wins over `HF_HOME`) in the environment of a fresh process before
    importing transformers, or, in-process, set
    `huggingface_hub.constants.HF_HUB_CACHE = str(hf_home / "hub")` and
    `huggingface_hub.constants.HF_HUB_OFFLINE = True` (e.g. with pytest's monkeypatch), or pass
    `cache_dir=hf_home / "hub"` to every `from_pretrained` call. Changing `os.environ` after the
    import has no effect.

    Args:
        local_dir: A directory written by `save_pretrained` (subdirectories are kept).
        repo_id: Hub id such as `"llava-hf/tiny-random-llava"` (an org-less name also works).
        hf_home: The would-be `HF_HOME`; the cache goes to `hf_home / "hub"`.
        revision_sha: 40-hex commit sha for `refs/main`; default derived from the file contents.

    Returns:
        The snapshot directory `.../snapshots/<sha>`.
    """
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
    sha = revision_sha or _files_digest(files, Path(local_dir))
    repo_dir = Path(hf_home) / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / sha
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    for file in files:
        blob = repo_dir / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        if not blob.exists():
            shutil.copyfile(file, blob)
        _link_or_copy(blob, snapshot / file.relative_to(local_dir))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(sha)
    return snapshot
