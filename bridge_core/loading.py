"""Loading HF models (hub id or local directory) and choosing their adapter."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeAlias, TypeVar, cast

import torch

from bridge_core.errors import AdapterNotFoundError, BootError, SpecError, did_you_mean
from bridge_core.registry import Registry, get_registry
from bridge_core.spec import AdapterSpec

AdapterArg: TypeAlias = "str | Path | AdapterSpec | None"
"""What ``adapter=`` takes: a registered adapter's name, a spec file, a spec, or None."""


class Bootable(Protocol):
    """What `boot` needs of the class it builds (`TransformerBridge`): constructed as
    ``cls(model, spec, cfg, registry=...)``, it takes a loader for its tokenizer."""

    def set_text_loader(self, loader: Callable[[], tuple[Any, Any]]) -> None:
        """Load (tokenizer, processor) with `loader` when first needed."""


B = TypeVar("B", bound=Bootable)


def boot(
    cls: Callable[..., B],
    model_name_or_path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    adapter: AdapterArg = None,
    **from_pretrained_kwargs: Any,
) -> B:
    """Load a model by hub id or local path with HF's own loaders, and bridge it with `cls`.

    HF's cache and offline rules apply (``HF_HOME``, ``HF_HUB_OFFLINE=1``). The model
    class is the adapter's ``model_class`` or the config's first architecture; one that is
    no transformers class (renamed, remote code) loads through the Auto class of the
    adapter's task (`task_for`), with ``trust_remote_code`` only if passed. The tokenizer
    and processor are loaded on first use.

    Args:
        device: move the model there after loading.
        dtype: HF's ``dtype`` argument (HF's default when None).
        adapter: an adapter name, an AdapterSpec, or a path to a TOML/JSON spec;
            by default the registry picks it from ``config.architectures[0]``.
        **from_pretrained_kwargs: passed to ``from_pretrained`` (e.g. ``revision``,
            ``attn_implementation``). ``device_map`` ("auto", a dict of module path ->
            device, "cpu" or "disk") and ``offload_folder`` place the model with accelerate
            (the ``accelerate`` extra); hooks then see each layer's activations on the
            device it runs on, and inputs go to ``bridge.device``, the execution device.

    Raises:
        BootError: the path does not exist, or the hub id is not available (offline);
            ``device`` together with ``device_map``; ``device_map`` without accelerate; the
            architecture is no transformers class and no task can be told, or the task's
            Auto class cannot load the config.
        AdapterNotFoundError: no adapter claims the architecture.
    """
    source = _source(model_name_or_path)
    _check_placement(device, from_pretrained_kwargs)
    config = _load_config(source, from_pretrained_kwargs)
    registry = get_registry()
    spec = choose_adapter(config, adapter, registry)
    model_class = _model_class(spec, config)
    if dtype is not None:
        from_pretrained_kwargs["dtype"] = dtype
    try:
        model = model_class.from_pretrained(source, config=config, **from_pretrained_kwargs)
    except OSError as exc:
        raise BootError(f"cannot load the weights of {source!r}: {exc}") from exc
    except ValueError as exc:  # an Auto class that cannot load this config
        if model_class.__name__ not in TASKS.values():
            raise
        architecture = _architecture(config)
        raise BootError(
            f"adapter {spec.name!r} loads {source!r} (architecture {architecture!r}, no "
            f"transformers class) as {task_for(spec, architecture)!r} through "
            f"{model_class.__name__}, which cannot: {exc} Set the spec's task (one of "
            f"{list(TASKS)}) or model_class"
        ) from exc
    if device is not None:
        model = model.to(device)
    cfg = spec.bridge_config(
        config, model_name=source, architecture=type(model).__name__, adapter=spec.name
    )
    bridge = cls(model, spec, cfg, registry=registry)
    shared = {k: from_pretrained_kwargs[k] for k in HUB_KEYWORDS if k in from_pretrained_kwargs}
    # a partial of a module-level function, so that a booted bridge pickles
    bridge.set_text_loader(functools.partial(load_tokenizer_and_processor, source, **shared))
    return bridge


def _check_placement(device: str | torch.device | None, kwargs: dict[str, Any]) -> None:
    """`device` and `device_map` exclude each other; `device_map` needs accelerate."""
    import importlib.util

    placed = [k for k in ("device_map", "offload_folder") if kwargs.get(k) is not None]
    if not placed:
        return
    if device is not None and kwargs.get("device_map") is not None:
        raise BootError(
            f"boot got device={device!r} and device_map={kwargs['device_map']!r}; pass one: "
            "device moves the whole model, device_map places its modules with accelerate"
        )
    if importlib.util.find_spec("accelerate") is None:
        raise BootError(
            f"{' and '.join(placed)} place the model with accelerate, which is not installed: "
            "pip install 'transformer-bridge[accelerate]'"
        )


def choose_adapter(
    hf_config: Any, adapter: AdapterArg, registry: Registry, architecture: str | None = None
) -> AdapterSpec:
    """The adapter to use: the one given (name, spec or spec file) or the registry's pick."""
    if isinstance(adapter, AdapterSpec):
        return adapter
    if isinstance(adapter, Path) or (
        isinstance(adapter, str) and adapter.endswith((".toml", ".json"))
    ):
        return AdapterSpec.from_file(adapter)
    if isinstance(adapter, str):
        return registry.adapter(adapter)
    if hf_config is None:
        raise AdapterNotFoundError(
            "the model has no HF config to choose an adapter by; pass adapter="
        )
    return registry.resolve(hf_config, architecture)


HUB_KEYWORDS = ("revision", "cache_dir", "token", "trust_remote_code", "local_files_only")
"""`from_pretrained` keywords that say where and which files to load: `boot` passes them to
the config, the model, the tokenizer and the processor alike."""


def load_tokenizer_and_processor(source: str, **hub: Any) -> tuple[Any, Any]:
    """The tokenizer and (for multimodal models) processor saved with a model, or None.

    Args:
        **hub: `HUB_KEYWORDS` given to `boot` (revision, cache_dir, token, ...).
    """
    from transformers import AutoProcessor, AutoTokenizer, PreTrainedTokenizerBase

    processor: Any = None
    try:
        processor = cast(Any, AutoProcessor).from_pretrained(source, **hub)  # untyped
    except ImportError as exc:  # a part of it needs a library that is not installed
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(
            f"the processor of {source!r} could not be loaded ({reason}); the bridge has its "
            "tokenizer but no processor, so images= does not work: install what it needs, "
            "or set bridge.processor",
            stacklevel=2,
        )
    except (OSError, ValueError, KeyError, TypeError):
        processor = None
    if isinstance(processor, PreTrainedTokenizerBase):
        return _real(processor), None
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **hub)
        except (OSError, ValueError, KeyError, TypeError):
            tokenizer = None
    return _real(tokenizer), processor


def _real(tokenizer: Any) -> Any:
    """The tokenizer, or None for the empty one transformers makes when no files exist."""
    if tokenizer is None or getattr(tokenizer, "vocab_size", None) == 0:
        return None
    return tokenizer


def _source(model_name_or_path: str | Path) -> str:
    text = os.fspath(model_name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path)
    looks_like_path = (
        isinstance(model_name_or_path, Path)
        or text.startswith((".", "/", "~"))
        or text.count("/") > 1
        or (os.sep != "/" and os.sep in text)
    )
    if looks_like_path:
        reason = "is a file, not a model directory" if path.exists() else "does not exist"
        raise BootError(f"cannot boot {text!r}: the path {reason}")
    return text


def _load_config(source: str, kwargs: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    config_kwargs = {k: kwargs[k] for k in HUB_KEYWORDS if k in kwargs}
    try:
        return AutoConfig.from_pretrained(source, **config_kwargs)
    except (OSError, ValueError) as exc:
        if Path(source).is_dir():
            raise BootError(
                f"cannot boot {source!r}: the directory holds no readable HF model config "
                f"(config.json). ({exc})"
            ) from exc
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        where = "in the Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "on the hub"
        raise BootError(
            f"cannot boot {source!r}: it is not a local directory, and no model of that id "
            f"was found {where}. ({exc})"
        ) from exc


MODEL_CLASS_ACCEPTED = (
    "the name of a transformers model class (a PreTrainedModel subclass, e.g. 'LlamaForCausalLM')"
)

TASKS: dict[str, str] = {
    "causal-lm": "AutoModelForCausalLM",
    "image-text-to-text": "AutoModelForImageTextToText",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "masked-lm": "AutoModelForMaskedLM",
    "base": "AutoModel",
}
"""Each task of `AdapterSpec.task` and the ``transformers`` Auto class that loads it."""

# transformers' own lists of the classes each Auto class loads, by task
_AUTO_MAPPINGS = {
    "causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "image-text-to-text": "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    "seq2seq-lm": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "masked-lm": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "base": "MODEL_MAPPING_NAMES",
}
_SUFFIXES = (
    ("ForCausalLM", "causal-lm"),
    ("LMHeadModel", "causal-lm"),
    ("ForMaskedLM", "masked-lm"),
    ("Model", "base"),
)


def task_for(spec: AdapterSpec, architecture: str | None = None) -> str | None:
    """The task a checkpoint of `architecture` (no transformers class) is loaded as.

    The spec's ``task``; else what the architecture's name says (``...ForCausalLM`` and
    ``...LMHeadModel``: causal-lm, ``...ForMaskedLM``: masked-lm, ``...Model``: base); else
    the task of the first of the spec's architectures that transformers' Auto classes load
    (``LlavaForConditionalGeneration``: image-text-to-text, ``T5ForConditionalGeneration``:
    seq2seq-lm). None when nothing tells.
    """
    if spec.task is not None:
        return spec.task
    by_name = _task_by_suffix(architecture)
    if by_name is not None:
        return by_name
    from transformers.models.auto import modeling_auto

    for known in spec.architectures:
        for task, mapping in _AUTO_MAPPINGS.items():
            names = getattr(modeling_auto, mapping, {}).values()
            if any(known == n or (isinstance(n, tuple) and known in n) for n in names):
                return task
    return next(filter(None, map(_task_by_suffix, spec.architectures)), None)


def _task_by_suffix(architecture: str | None) -> str | None:
    for suffix, task in _SUFFIXES:
        if architecture and architecture.endswith(suffix):
            return task
    return None


def _architecture(config: Any) -> str | None:
    architectures = getattr(config, "architectures", None) or []
    return str(architectures[0]) if architectures else None


def _model_class(spec: AdapterSpec, config: Any) -> Any:
    """The class to load: the spec's ``model_class``, else the config's first architecture,
    else (a renamed or remote-code architecture) the Auto class of the spec's task.

    ``trust_remote_code`` is whatever the caller passed: off unless asked for.

    Raises:
        SpecError: the spec's ``model_class`` is no transformers model class.
        BootError: the architecture is no transformers class and no task can be told.
    """
    import transformers

    name = spec.model_class or _architecture(config)
    found = getattr(transformers, name, None) if name else None
    if isinstance(found, type) and issubclass(found, transformers.PreTrainedModel):
        return found
    if spec.model_class is not None:
        if found is None:
            problem = f"transformers has no {name!r}"
        elif isinstance(found, type):
            problem = f"transformers.{name} is a class, but no PreTrainedModel subclass"
        else:
            problem = f"transformers.{name} is a {type(found).__name__}, not a model class"
        candidates = [n for n in dir(transformers) if "Model" in n or "For" in n]
        problem += "." + did_you_mean(spec.model_class, candidates)
        raise SpecError(
            f"adapter spec {spec.name!r}, model_class: {problem} Accepted: {MODEL_CLASS_ACCEPTED}"
        )
    task = task_for(spec, name)
    if task is None:
        what = (
            f"the config's architecture {name!r} is no transformers class"
            if name
            else ("the config names no architecture")
        )
        raise BootError(
            f"adapter {spec.name!r} cannot tell which HF class to load: {what}, and neither it "
            f"nor the spec's architectures {spec.architectures} tell the task. Set the spec's "
            f"task (one of {list(TASKS)}) or its model_class to {MODEL_CLASS_ACCEPTED}"
        )
    return getattr(transformers, TASKS[task])
