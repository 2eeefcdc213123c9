"""TransformerBridge: an unchanged HF model with TransformerLens-style named hook points."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import torch
from torch import nn

from bridge_core import tokens
from bridge_core.cache import ActivationCache
from bridge_core.components.base import GeneralizedComponent
from bridge_core.errors import BridgeError, HookNameError, InputError, SpecError, did_you_mean
from bridge_core.hooks import HookFn, HookHandle, HookPoint, running
from bridge_core.hooks import scope as hook_scope
from bridge_core.naming import HookNames, NamesFilter
from bridge_core.recording import Recorder

if TYPE_CHECKING:  # pydantic-backed: imported by the first wrap/boot, not with the package
    from bridge_core.config import TransformerBridgeConfig
    from bridge_core.multimodal import ImageLayout
    from bridge_core.registry import Registry
    from bridge_core.spec import AdapterSpec
    from bridge_core.verify import VerifyReport

HookSpec = tuple[str | Callable[[str], bool], HookFn]
ReturnType = Literal["logits", "loss", "both", "raw"] | None
AdapterArg: TypeAlias = "str | Path | AdapterSpec | None"


class TransformerBridge(nn.Module):
    """An HF model wrapped with named hook points; its outputs are the HF model's.

    Build one with `boot` (hub id or local path) or `wrap` (a model in memory).
    Components are attributes as in TransformerLens (``bridge.blocks[3].attn``).
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: AdapterSpec,
        cfg: TransformerBridgeConfig,
        tokenizer: Any = None,
        processor: Any = None,
        registry: Registry | None = None,
    ) -> None:
        """Build the component tree of `adapter` over `model` (use `boot`/`wrap` instead)."""
        from bridge_core.assembly import Assembler, collect_names
        from bridge_core.registry import get_registry

        super().__init__()
        self.original_model = model
        self.adapter = adapter
        self.cfg = cfg
        self._processor = processor
        self._tokenizer = tokenizer if tokenizer is not None else _tokenizer_of(processor)
        self._text_loader: Callable[[], tuple[Any, Any]] | None = None
        built = Assembler(adapter, model, cfg, registry or get_registry()).build()
        for name in built:
            if hasattr(TransformerBridge, name) or name in ("original_model", "adapter", "cfg"):
                raise SpecError(
                    f"adapter spec {adapter.name!r} (model {type(model).__name__}): component "
                    f"name {name!r} is taken by a TransformerBridge attribute"
                )
        self.attached_points = 0
        """How many hook points have a hook (and their tap) attached right now."""
        self._names: HookNames = collect_names(built, adapter)
        for point in self._names.points.values():
            point.owner = self  # silent in the forwards of other bridges over the same model
        for name, component in built.items():
            self.add_module(name, component)

    # -- construction --------------------------------------------------------------------

    @classmethod
    def boot(
        cls,
        model_name_or_path: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        adapter: AdapterArg = None,
        **from_pretrained_kwargs: Any,
    ) -> TransformerBridge:
        """Load an HF model by hub id or local path and bridge it (see `loading.boot`)."""
        from bridge_core.loading import boot

        return boot(
            cls,
            model_name_or_path,
            device=device,
            dtype=dtype,
            adapter=adapter,
            **from_pretrained_kwargs,
        )

    @classmethod
    def wrap(
        cls,
        model: nn.Module,
        tokenizer: Any = None,
        processor: Any = None,
        adapter: AdapterArg = None,
    ) -> TransformerBridge:
        """Bridge an HF model already in memory; the adapter comes from its config by default."""
        from bridge_core.loading import choose_adapter
        from bridge_core.registry import get_registry

        if getattr(model, "config", None) is None:
            raise InputError(
                f"wrap needs an HF model with a .config; {type(model).__name__} has none"
            )
        registry = get_registry()
        spec = choose_adapter(
            getattr(model, "config", None), adapter, registry, type(model).__name__
        )
        cfg = spec.bridge_config(
            model.config,
            model_name=getattr(model.config, "_name_or_path", None) or None,
            architecture=type(model).__name__,
            adapter=spec.name,
        )
        return cls(model, spec, cfg, tokenizer, processor, registry)

    def set_text_loader(self, loader: Callable[[], tuple[Any, Any]]) -> None:
        """Load (tokenizer, processor) with `loader` when first needed (used by `boot`)."""
        self._text_loader = loader

    def _load_text(self) -> None:
        loader, self._text_loader = self._text_loader, None
        if loader is not None:
            tokenizer, processor = loader()
            self._tokenizer = self._tokenizer or tokenizer
            self._processor = self._processor or processor

    @property
    def tokenizer(self) -> Any:
        """The HF tokenizer, or None."""
        self._load_text()
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value: Any) -> None:
        self._tokenizer = value

    @property
    def processor(self) -> Any:
        """The HF processor of a multimodal model, or None."""
        self._load_text()
        return self._processor

    @processor.setter
    def processor(self, value: Any) -> None:
        self._processor = value

    # -- names and components ------------------------------------------------------------

    @property
    def hook_dict(self) -> dict[str, HookPoint]:
        """Every hook point by canonical name, in forward order."""
        return dict(self._names.points)

    def hook_names(self) -> list[str]:
        """Canonical hook names, then aliases."""
        return self._names.all_names()

    def hook_aliases(self) -> dict[str, str]:
        """Alias -> canonical name."""
        return dict(self._names.aliases)

    def component(self, name: str) -> GeneralizedComponent:
        """The component at a dotted bridge path (``"blocks.3.attn"``)."""
        try:
            found = self.get_submodule(name)
        except AttributeError:
            found = None
        if not isinstance(found, GeneralizedComponent):
            known = [n for n, m in self.named_modules() if isinstance(m, GeneralizedComponent)]
            raise HookNameError(
                f"{name!r} is not a component of this bridge.{did_you_mean(name, known)}"
            )
        return found

    @property
    def device(self) -> torch.device:
        """Where inputs go: the first parameter's device, or a device_map's execution device."""
        return tokens.input_device(self.original_model)

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the model's first floating-point parameter."""
        floats = (p for p in self.original_model.parameters() if p.is_floating_point())
        return next(floats, torch.zeros(())).dtype

    # -- forward -------------------------------------------------------------------------

    def forward(
        self,
        input: tokens.TextInput | torch.Tensor | None = None,
        *args: Any,
        return_type: ReturnType = "logits",
        images: Any = None,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the HF model; any HF forward keyword passes through unchanged.

        Args:
            input: text (tokenized for you, with `images` through the processor) or
                input ids; or None and `input_ids=` / `inputs_embeds=` / ... as keywords.
            return_type: "logits", "loss" (next-token loss on the input when no labels
                are given), "both" (logits, loss), "raw" (the HF ModelOutput) or None.

        Returns:
            What `return_type` asks for.
        """
        if return_type not in ("logits", "loss", "both", "raw", None):
            raise InputError(
                f"return_type must be 'logits', 'loss', 'both', 'raw' or None (got {return_type!r})"
            )
        kwargs = self.prepare_inputs(input, images, prepend_bos, padding_side, **kwargs)
        if return_type in ("loss", "both") and "labels" not in kwargs:
            if "input_ids" not in kwargs:
                raise InputError(
                    f"return_type={return_type!r} without labels= is the next-token loss on "
                    "input_ids; pass input_ids or labels"
                )
            kwargs["labels"] = kwargs["input_ids"]
        output = self._run_model(*args, **kwargs)
        if return_type == "raw":
            return output
        if return_type is None:
            return None
        logits = output.logits if hasattr(output, "logits") else output[0]
        if return_type == "logits":
            return logits
        return output.loss if return_type == "loss" else (logits, output.loss)

    def _run_model(self, *args: Any, **kwargs: Any) -> Any:
        """The HF model's forward, as this bridge's (other bridges' hooks stay silent).

        With hooks attached it runs eagerly even where the model was compiled in place
        (`compile`): Python hooks that store, edit and route tensors are not something a
        compiled graph keeps. Without hooks, a compiled model runs compiled. Traced as part of
        ``torch.compile(bridge)``, the model runs outside the compiled graph, always: a graph
        compiled without hooks would silently skip hooks attached later.
        """
        if torch.compiler.is_compiling():
            return _outside_compile(self, args, kwargs)
        model = self.original_model
        with running(self):
            if not self.attached_points:
                return model(*args, **kwargs)
            eager: Callable[..., Any] = model._call_impl  # never a compiled version; untyped
            return eager(*args, **kwargs)

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """Compile the HF model in place (``torch.compile`` arguments pass through).

        Calls without hooks then run the compiled model; calls with hooks attached (and
        ``run_with_hooks``, ``run_with_cache``, ``generate`` with hooks) run it eagerly, so
        hooks and caches give exactly the eager results. The first compiled call pays the
        compilation; attaching or removing hooks never triggers a recompile.
        """
        self.original_model.compile(*args, **kwargs)

    def _eager_call(self, *args: Any, **kwargs: Any) -> Any:
        """Call this bridge, never through a version compiled in place (``.compile()``)."""
        call: Callable[..., Any] = self._call_impl  # untyped in torch
        return call(*args, **kwargs)

    def prepare_inputs(
        self,
        input: tokens.TextInput | torch.Tensor | None,
        images: Any = None,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """HF forward keywords for `input` (text, ids or None) plus `kwargs`.

        Raises:
            InputError: inputs the model cannot take (a component's `check_inputs` says why).
        """
        inputs = self._inputs(input, images, prepend_bos, padding_side, **kwargs)
        for component in self.children():
            if isinstance(component, GeneralizedComponent):
                component.check_inputs(inputs)
        return inputs

    def _inputs(
        self,
        input: tokens.TextInput | torch.Tensor | None,
        images: Any,
        prepend_bos: bool | None,
        padding_side: str | None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        if input is None:
            if images is not None:
                raise InputError("images= needs text input (with its image tokens)")
            return kwargs
        if isinstance(input, torch.Tensor):
            if images is not None:
                raise InputError("images= goes with text input; with ids, pass pixel_values=")
            if "input_ids" in kwargs:
                raise InputError("input ids given twice: positionally and as input_ids=")
            return {"input_ids": input, **kwargs}
        if not isinstance(input, str | list):
            raise InputError(f"input must be text, a list of texts or ids (got {type(input)})")
        if images is not None:
            encoded = tokens.process(self.processor, input, images, padding_side)
            twice = sorted(set(encoded) & set(kwargs))
            if twice:
                raise InputError(
                    f"{', '.join(twice)} given twice: made by the processor from images= and "
                    "passed as keyword(s); pass one or the other"
                )
        else:
            encoded = tokens.tokenize(self.tokenizer, input, prepend_bos, padding_side)
        return {**tokens.to_device(encoded, self.device, self.dtype), **kwargs}

    def image_layout(
        self,
        input: tokens.TextInput | torch.Tensor | None = None,
        images: Any = None,
        *,
        image_sizes: Sequence[tuple[int, int]] | None = None,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        **kwargs: Any,
    ) -> ImageLayout:
        """Where each image's tokens sit, which patch each shows, and its pixels.

        Takes the inputs a forward takes (text with ``images=``, or ``input_ids`` and
        ``pixel_values`` ...); see `bridge_core.multimodal`.

        Args:
            image_sizes: original (height, width) of each image (as HF's ``image_sizes``),
                for pixel boxes when only pixel values are given (``images=`` knows them).

        Raises:
            InputError: no component of this bridge places images, or inputs that do not fit.
        """
        from bridge_core.multimodal import layout_for

        kwargs.pop("return_type", None)
        if image_sizes is not None:
            kwargs["image_sizes"] = image_sizes
        inputs = self.prepare_inputs(input, images, prepend_bos, padding_side, **kwargs)
        return layout_for(self, inputs, images)

    # -- hooks ---------------------------------------------------------------------------

    def add_hook(
        self,
        name: str | Sequence[str] | Callable[[str], bool],
        hook: HookFn,
        dir: Literal["fwd", "bwd"] = "fwd",
        is_permanent: bool = False,
        prepend: bool = False,
    ) -> list[HookHandle]:
        """Add `hook` to the hook point `name` (or to each of a list, or each a predicate selects).

        Returns:
            One handle per hook point; ``handle.remove()`` takes that hook away.
        """
        if name is None:  # select(None) would mean every hook point
            raise InputError(
                "add_hook needs a hook name, a list of names or a predicate (got None); "
                "for every hook point use lambda name: True"
            )
        selected = self._names.select(name)
        handles: list[HookHandle] = []
        try:  # all or nothing: a point that refuses removes the ones added before it
            for n in selected:
                handles.append(self._names.points[n].add_hook(hook, dir, is_permanent, prepend))
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        return handles

    def add_perma_hook(
        self,
        name: str | Sequence[str] | Callable[[str], bool],
        hook: HookFn,
        dir: Literal["fwd", "bwd"] = "fwd",
    ) -> list[HookHandle]:
        """Add a hook that `reset_hooks()` keeps (unless `including_permanent=True`)."""
        return self.add_hook(name, hook, dir, is_permanent=True)

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Switch the opt-in ``attn.hook_result`` points on or off (TransformerLens's name).

        ``hook_result`` is each head's output ``[batch, pos, head, d_model]`` before the heads
        are summed; computing it costs about one more output projection per hooked layer,
        and caching it a ``head``-times larger tensor, so caches leave it out unless it is on.
        """
        for name, point in self._names.points.items():
            if name.endswith(".hook_result"):
                if not use_attn_result:
                    point.remove_hooks("both", including_permanent=True)
                point.enabled = use_attn_result

    def reset_hooks(self, including_permanent: bool = False) -> None:
        """Remove every hook (permanent ones too if asked)."""
        for point in self._names.points.values():
            point.remove_hooks("both", including_permanent)

    @contextmanager
    def hooks(
        self,
        fwd_hooks: Sequence[HookSpec] = (),
        bwd_hooks: Sequence[HookSpec] = (),
    ) -> Iterator[TransformerBridge]:
        """Attach hooks for the duration of a ``with`` block; they go when it ends or raises."""
        fwd = self._names.select_hooks(fwd_hooks, "fwd_hooks")  # check all pairs first
        bwd = self._names.select_hooks(bwd_hooks, "bwd_hooks")
        points = self._names.points
        handles: list[HookHandle] = []
        with hook_scope() as token:  # these hooks run only in this thread's (context's) calls
            try:
                directions: tuple[tuple[Literal["fwd", "bwd"], Any], ...] = (
                    ("fwd", fwd),
                    ("bwd", bwd),
                )
                for direction, pairs in directions:
                    for names, fn in pairs:
                        for name in names:
                            handles.append(points[name].add_hook(fn, direction, scope=token))
                yield self
            finally:
                for handle in reversed(handles):
                    handle.remove()

    def run_with_hooks(
        self,
        *args: Any,
        fwd_hooks: Sequence[HookSpec] = (),
        bwd_hooks: Sequence[HookSpec] = (),
        **kwargs: Any,
    ) -> Any:
        """Run forward with temporary hooks (removed afterwards, also on error)."""
        with self.hooks(fwd_hooks, bwd_hooks):
            return self._eager_call(*args, **kwargs)

    def run_with_cache(
        self,
        *args: Any,
        names_filter: NamesFilter = None,
        device: str | torch.device | None = None,
        remove_batch_dim: bool = False,
        incl_bwd: bool = False,
        metric: Callable[[Any], torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> tuple[Any, ActivationCache]:
        """Run forward and cache the activations `names_filter` selects (all by default).

        Args:
            device: where to put cached tensors (the model stays where it is).
            remove_batch_dim: drop the batch dimension (batch of one).
            incl_bwd: also run backward and cache ``<name>_grad``: from ``metric(output)``
                if given, else from the loss (``return_type="loss"`` or ``"both"``).
            metric: ``fn(output) -> scalar tensor`` to differentiate (needs incl_bwd);
                gradients also reach inputs that require them (``pixel_values``).

        Returns:
            (what forward returns, ActivationCache); ``cache.image_layout`` is the
            `ImageLayout` of a run with images (computed when first read), else None.
        """
        selected = self._names.select(names_filter)
        _check_backward(incl_bwd, metric, kwargs.get("return_type", "logits"))
        recorder = Recorder(device, remove_batch_dim)
        points = self._names.points
        fwd = [(n, recorder.saver(n, points[n])) for n in selected]
        bwd = [(n, recorder.saver(f"{n}_grad", points[n])) for n in selected] if incl_bwd else []
        with self.hooks(fwd, bwd):
            output = self._eager_call(*args, **kwargs)
            if incl_bwd:
                _backward(output, metric)
        store, calls = recorder.finish()
        order = {n: i for i, n in enumerate(selected)}
        ordered = dict(
            sorted(store.items(), key=lambda kv: order.get(kv[0].removesuffix("_grad"), 0))
        )
        cache = ActivationCache(ordered, self, has_batch_dim=not remove_batch_dim, calls=calls)
        if "images" in kwargs or "pixel_values" in kwargs:
            cache.set_image_layout(lambda: self.image_layout(*args, **kwargs))
        return output, cache

    # -- text ----------------------------------------------------------------------------

    def to_tokens(
        self,
        input: tokens.TextInput,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        move_to_device: bool = True,
    ) -> torch.Tensor:
        """Token ids ``[batch, pos]`` for text, as the model's tokenizer makes them."""
        ids = tokens.tokenize(self.tokenizer, input, prepend_bos, padding_side)["input_ids"]
        return ids.to(self.device) if move_to_device else ids

    def to_str_tokens(
        self, input: tokens.TextInput | torch.Tensor, prepend_bos: bool | None = None
    ) -> list[str] | list[list[str]]:
        """Each token as a string (a list per sequence for a batch)."""
        ids = input if isinstance(input, torch.Tensor) else self.to_tokens(input, prepend_bos)
        rows = [ids.tolist()] if ids.dim() == 1 else ids.tolist()
        strs = [[str(tokens.decode(self.tokenizer, [t])) for t in row] for row in rows]
        return strs[0] if ids.dim() == 1 or (len(strs) == 1 and isinstance(input, str)) else strs

    def to_string(self, tokens_: torch.Tensor | Sequence[int]) -> str | list[str]:
        """Decode tokens to text (a list of strings for a batch)."""
        return tokens.decode(self.tokenizer, tokens_)

    def generate(self, input: tokens.TextInput | torch.Tensor | None = None, **kwargs: Any) -> Any:
        """Generate with HF's `generate`; active hooks apply at every step (see `generation`)."""
        from bridge_core.generation import generate

        return generate(self, input, **kwargs)

    # -- copies -------------------------------------------------------------------------

    def __deepcopy__(self, memo: dict[int, Any]) -> TransformerBridge:
        """An independent bridge over a deep copy of the model, with this one's hooks.

        The copy's modules drop the PyTorch hooks of this bridge's taps, and its hook points
        get this bridge's permanent and plain ``add_hook`` hooks (not the hooks of a call in
        progress); from then on the two are independent.
        """
        from bridge_core.attention import restore_kernel_names
        from bridge_core.hooks import strip_taps

        model = copy.deepcopy(self.original_model, memo)
        strip_taps(model)
        restore_kernel_names(model)
        text = (copy.deepcopy(self._tokenizer, memo), copy.deepcopy(self._processor, memo))
        clone = type(self)(model, self.adapter, self.cfg.model_copy(), *text)
        clone._text_loader = self._text_loader
        for name, point in self._names.points.items():
            target = clone._names.points[name]
            target.enabled, target.copy_on_cache = point.enabled, point.copy_on_cache
            for direction, hooks in (("fwd", point._fwd), ("bwd", point._bwd)):
                for hook in hooks:
                    if hook.scope is None:
                        target.add_hook(hook.fn, direction, hook.permanent)  # type: ignore[arg-type]
        return clone

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the bridge (model, adapter, config, text) while no hook is attached.

        Raises:
            BridgeError: hooks are attached (their functions and the PyTorch hooks of their
                taps are not part of what a pickle can carry).
        """
        hooked = [n for n, p in self._names.points.items() if p.has_hooks]
        if hooked:
            raise BridgeError(
                f"cannot pickle a bridge while hooks are attached (at {hooked[:3]}); remove "
                "them first (reset_hooks(including_permanent=True)), or copy.deepcopy it"
            )
        state: dict[str, Any] = dict(self.__dict__)
        return state

    def verify(self, inputs: dict[str, Any] | None = None) -> VerifyReport:
        """Check every hook point of this bridge (see `bridge_core.verify`).

        Args:
            inputs: HF forward keywords to check with; generated when None (token ids, and
                images for multimodal adapters).

        Returns:
            A VerifyReport: ``report.ok``, ``report.failures()``, ``print(report)``.
        """
        from bridge_core.verify import verify

        return verify(self, inputs)

    def __repr__(self) -> str:
        return f"TransformerBridge({self.adapter.name}: {type(self.original_model).__name__})"


def _outside_compile(bridge: TransformerBridge, args: Any, kwargs: Any) -> Any:
    """`bridge._run_model` run eagerly from inside a compiled call."""
    warnings.warn(
        "torch.compile(bridge) runs the HF model eagerly (hooks cannot live in a compiled "
        "graph); bridge.compile() compiles the model for calls without hooks",
        RuntimeWarning,
        stacklevel=2,
    )
    return bridge._run_model(*args, **kwargs)


_disable: Callable[..., Any] = torch.compiler.disable  # untyped in torch
_outside_compile = _disable(_outside_compile)


def _check_backward(incl_bwd: bool, metric: Any, return_type: Any) -> None:
    if metric is not None and not incl_bwd:
        raise InputError("metric= is what incl_bwd=True differentiates: pass incl_bwd=True too")
    if metric is not None and not callable(metric):
        raise InputError(
            f"metric must be a function output -> scalar (got {type(metric).__name__})"
        )
    if incl_bwd and metric is None and return_type not in ("loss", "both"):
        raise InputError(
            "incl_bwd=True differentiates the loss (pass return_type='loss') or a metric "
            "(pass metric=fn, fn(output) -> scalar)"
        )


def _backward(output: Any, metric: Callable[[Any], torch.Tensor] | None) -> None:
    if metric is None:
        target = output[1] if isinstance(output, tuple) else output
    else:
        target = metric(output)
        if not isinstance(target, torch.Tensor) or target.numel() != 1:
            shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target)
            raise InputError(
                f"metric must return a scalar tensor that depends on the output (got {shape})"
            )
        if not target.requires_grad:
            raise InputError(
                "metric returned a tensor without gradient: compute it from the output "
                "(without .detach(), .item() or torch.no_grad())"
            )
    target.backward()


def _tokenizer_of(processor: Any) -> Any:
    return getattr(processor, "tokenizer", None)
