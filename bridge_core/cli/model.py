"""What the CLI's model commands share: booting with clear errors, inputs, names, summaries."""

from __future__ import annotations

import argparse
import fnmatch
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bridge_core.cli.app import PROG, UsageError
from bridge_core.errors import AdapterNotFoundError, BootError, InputError, did_you_mean
from bridge_core.spec import AdapterSpec

if TYPE_CHECKING:
    from PIL.Image import Image

    from bridge_core.bridge import TransformerBridge
    from bridge_core.cache import ActivationCache

TEXT_PROMPT = "The quick brown fox jumps over the lazy dog"
IMAGE_PROMPT = "What is in this picture?"
MODEL_ACCEPTED = "a local directory written by save_pretrained (with config.json), or a hub id"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def model_options(
    parser: argparse.ArgumentParser,
    model_required: bool = True,
    image_default: bool = True,
    image_required: bool = False,
) -> None:
    """Add what the model commands share: MODEL, ``--adapter``, ``--device``, ``--dtype``,
    ``--image``."""
    parser.add_argument(
        "model",
        nargs=None if model_required else "?",
        metavar="MODEL",
        help="local model directory or hub id (HF cache and offline rules apply)",
    )
    parser.add_argument(
        "--adapter",
        metavar="NAME|FILE",
        help="adapter name or TOML/JSON spec file (default: chosen by the registry)",
    )
    parser.add_argument(
        "--device", default="cpu", type=device_arg, help="device to run on (default: cpu)"
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16", "auto"),
        help="weights dtype (default: HF's default)",
    )
    default = "a generated one" if image_default else "none, a text-only run"
    parser.add_argument(
        "--image",
        metavar="PATH",
        type=Path,
        required=image_required,
        help="image file for a multimodal model"
        + ("" if image_required else f" (default: {default})"),
    )


DEVICES_ACCEPTED = "cpu, cuda, cuda:N, mps (one this machine has)"


def device_arg(text: str) -> str:
    """``--device``: a torch device this machine has (an argparse type: else exit 2).

    Raises:
        argparse.ArgumentTypeError: no such device, or none of that type here.
    """
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is no torch device. Accepted: {DEVICES_ACCEPTED}"
        ) from None
    if device.type == "cpu":
        return text
    if device.type == "meta":
        raise argparse.ArgumentTypeError(
            f"{text!r} holds no weights, so a model there cannot run. Accepted: {DEVICES_ACCEPTED}"
        )
    backend = getattr(torch, device.type, None)
    available = bool(getattr(backend, "is_available", lambda: False)())
    if device.type == "mps":
        available = torch.backends.mps.is_available()
    count = int(getattr(backend, "device_count", lambda: 1)()) if available else 0
    if (device.index or 0) >= count:
        has = f"{count} {device.type} device(s)" if count else f"no {device.type} device"
        raise argparse.ArgumentTypeError(
            f"{text!r}: this machine has {has}. Accepted: {DEVICES_ACCEPTED}"
        )
    return text


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0 (else exit 2)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is no integer >= 0")
    return value


def boot(args: argparse.Namespace, model: str | None = None) -> TransformerBridge:
    """Boot ``args.model`` (or `model`) with the CLI's ``--adapter/--device/--dtype``.

    Raises:
        UsageError: the model or the adapter does not exist.
        BridgeError: the model exists but cannot be bridged (a failure, exit 1).
    """
    from bridge_core.bridge import TransformerBridge

    name = model or args.model
    check_model(name)
    adapter = adapter_arg(args.adapter)
    dtype = DTYPES.get(args.dtype, args.dtype)
    try:
        return TransformerBridge.boot(name, device=args.device, dtype=dtype, adapter=adapter)
    except BootError as exc:
        if not isinstance(exc.__cause__, OSError):  # found, but cannot be loaded: a failure
            raise
        raise UsageError(f"{exc} Accepted: {MODEL_ACCEPTED}{_cached_list(name)}") from exc


def check_model(model: str) -> None:
    """Refuse a model argument that names no model directory, or a hub id missing offline."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(
                f"model directory {model!r} has no config.json, so it holds no saved model. "
                f"Accepted: {MODEL_ACCEPTED}"
            )
        return
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        reason = "is a file, not a directory" if path.exists() else "does not exist"
        raise UsageError(f"model path {model!r} {reason}. Accepted: {MODEL_ACCEPTED}")
    from huggingface_hub import constants

    if constants.is_offline_mode() and model not in cached_hub_ids():
        raise UsageError(
            f"model {model!r} is neither a local directory nor in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE is set. "
            f"Accepted: {MODEL_ACCEPTED}{_cached_list(model)}"
        )


def cached_hub_ids() -> list[str]:
    """Hub ids of the models in the local Hugging Face cache."""
    from huggingface_hub import constants

    root = Path(constants.HF_HUB_CACHE)
    if not root.is_dir():
        return []
    repos = (d for d in root.glob("models--*") if (d / "snapshots").is_dir())
    return sorted(d.name.removeprefix("models--").replace("--", "/") for d in repos)


def _cached_list(model: str) -> str:
    ids = cached_hub_ids()
    if not ids:
        return "; the Hugging Face cache holds no models."
    shown = ", ".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
    return f"; cached hub ids: {shown}.{did_you_mean(model, ids)}"


def adapter_arg(adapter: str | None) -> str | AdapterSpec | None:
    """The ``--adapter`` value: None, a registered adapter's name, or a loaded spec file.

    Raises:
        UsageError: no adapter has that name, or the spec file does not exist.
        SpecError: the spec file is invalid (a failure, exit 1).
    """
    if adapter is None:
        return None
    if adapter.endswith((".toml", ".json")) or os.sep in adapter:
        if not Path(adapter).is_file():
            raise UsageError(f"adapter spec file {adapter!r} does not exist")
        return AdapterSpec.from_file(adapter)
    from bridge_core.registry import get_registry

    try:
        get_registry().adapter(adapter)
    except AdapterNotFoundError as exc:
        raise UsageError(f"--adapter: {exc} (or a .toml/.json spec file)") from exc
    return adapter


# -- inputs ----------------------------------------------------------------------------------


def takes_images(bridge: TransformerBridge) -> bool:
    """Whether the model came with an image processor."""
    return getattr(bridge.processor, "image_processor", None) is not None


def load_image(path: Path | None) -> Image | None:
    """Open the ``--image`` file (if any) as RGB.

    Raises:
        UsageError: the file is missing or is no image Pillow can read.
    """
    if path is None:
        return None
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise UsageError(f"image {str(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        formats = "PNG, JPEG, GIF, BMP, TIFF, WebP, ..."
        raise UsageError(
            f"cannot read image {str(path)!r}: {type(exc).__name__}: {exc}. "
            f"Accepted: an image file Pillow can open ({formats})"
        ) from exc


def generated_image(size: int = 64) -> Image:
    """A deterministic RGB test image: red ramps left to right, green top to bottom."""
    from PIL import Image

    ramp = Image.linear_gradient("L").resize((size, size))
    blue = Image.new("L", (size, size), 96)
    return Image.merge("RGB", (ramp.rotate(90), ramp, blue))


def with_image_token(processor: Any, prompt: str) -> str:
    """`prompt` with the processor's image token: as given if it has one, else prepended
    (through the chat template when the processor has one)."""
    token = getattr(processor, "image_token", None)
    if not isinstance(token, str) or token in prompt:
        return prompt
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}, {"type": "text", "text": prompt}]
        text = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        if isinstance(text, str) and token in text:
            return text
    return f"{token}\n{prompt}"


def model_inputs(
    bridge: TransformerBridge, prompt: str, image: Image | None
) -> tuple[str, dict[str, Any]]:
    """(the text fed to the model, HF forward keywords) for `prompt` and an optional image.

    Raises:
        UsageError: an image was given but the model takes none.
    """
    if image is None:
        try:
            return prompt, decoder_start(bridge, bridge.prepare_inputs(prompt))
        except InputError as exc:  # an empty or too long --prompt: a usage error
            raise UsageError(f"--prompt {prompt!r:.60}: {exc}") from exc
    if not takes_images(bridge):
        raise UsageError(
            f"--image: {bridge.cfg.model_name or 'this model'} takes no images (no image "
            "processor was saved with it); drop --image for a text-only model"
        )
    text = with_image_token(bridge.processor, prompt)
    return text, bridge.prepare_inputs(text, images=[image])


def decoder_start(bridge: TransformerBridge, inputs: dict[str, Any]) -> dict[str, Any]:
    """An encoder-decoder's inputs with the decoder's first token, as `generate` starts it."""
    model = bridge.original_model
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False) or "decoder_input_ids" in inputs:
        return inputs
    generation = getattr(model, "generation_config", None)
    start = getattr(generation, "decoder_start_token_id", None)
    start = start if start is not None else getattr(config, "decoder_start_token_id", None)
    ids = inputs.get("input_ids")
    if start is None or not isinstance(ids, torch.Tensor):
        return inputs
    return {**inputs, "decoder_input_ids": torch.full_like(ids[:, :1], int(start))}


def inputs_for(
    bridge: TransformerBridge, args: argparse.Namespace, image: Image | None, default_image: bool
) -> tuple[str, dict[str, Any], str | None]:
    """(text, HF forward keywords, image description) from ``--prompt`` and `image`.

    Args:
        image: the ``--image``, loaded (before booting, so that a bad file fails fast).
        default_image: give a model that takes images a generated one if there is no
            ``--image``.
    """
    described = None
    if image is not None:
        described = str(args.image)
    elif default_image and takes_images(bridge):
        image, described = generated_image(), "a generated 64x64 gradient"
    prompt = args.prompt  # an empty --prompt is run (or refused), never replaced
    if prompt is None:
        prompt = IMAGE_PROMPT if image is not None else TEXT_PROMPT
    text, inputs = model_inputs(bridge, prompt, image)
    return text, inputs, described


# -- names and summaries ---------------------------------------------------------------------


def select_names(bridge: TransformerBridge, patterns: Sequence[str] | None) -> list[str] | None:
    """Canonical hook names for ``--names`` (exact names, aliases or globs), in forward order.

    Raises:
        UsageError: a name or pattern matches no hook point.
    """
    if patterns is None:
        return None
    canonical, aliases = list(bridge.hook_dict), bridge.hook_aliases()
    given = [p.strip() for item in patterns for p in item.split(",") if p.strip()]
    if not given:
        raise UsageError(
            f"--names {' '.join(patterns)!r} names no hook point. Accepted: hook names or "
            f"aliases such as {canonical[0]!r}, or glob patterns such as '*hook_out', "
            "separated by spaces or commas (leave --names out to cache every hook point)"
        )
    chosen: set[str] = set()
    for pattern in given:
        if pattern in bridge.hook_dict or pattern in aliases:
            chosen.add(aliases.get(pattern, pattern))
            continue
        found = set(fnmatch.filter(canonical, pattern))
        found |= {aliases[a] for a in fnmatch.filter(aliases, pattern)}
        if not found:
            hint = did_you_mean(pattern, [*canonical, *aliases])
            raise UsageError(
                f"--names {pattern!r} matches no hook point of this model.{hint} Accepted: "
                f"hook names or aliases such as {canonical[0]!r} or {canonical[-1]!r}, or glob "
                f"patterns such as '*hook_out' (`{PROG} hooks MODEL` lists them all)"
            )
        chosen |= found
    return [name for name in canonical if name in chosen]


def shape(tensor: torch.Tensor) -> str:
    """A shape as ``[1, 5, 64]``."""
    return "[" + ", ".join(str(d) for d in tensor.shape) + "]"


def norm(tensor: torch.Tensor) -> str:
    """The Frobenius norm (4 significant digits), or '-' for integer tensors (token ids)."""
    if not tensor.is_floating_point():
        return "-"
    return f"{tensor.float().norm().item():.4g}"


def alias_index(bridge: TransformerBridge) -> dict[str, list[str]]:
    """Canonical name -> its aliases."""
    index: dict[str, list[str]] = {}
    for alias, target in bridge.hook_aliases().items():
        index.setdefault(target, []).append(alias)
    return index


def activation_rows(
    bridge: TransformerBridge, cache: ActivationCache, names: Sequence[str]
) -> list[tuple[str, str, str, str, str]]:
    """(name, aliases, shape, dtype, norm) rows for the cached `names`."""
    aliases = alias_index(bridge)
    rows = []
    for name in names:
        if name in cache:
            t = cache[name]
            dtype = str(t.dtype).removeprefix("torch.")
            rows.append((name, ", ".join(aliases.get(name, [])), shape(t), dtype, norm(t)))
    return rows
