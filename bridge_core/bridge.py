"""TransformerBridge: an unchanged HF model with TransformerLens-style named hook points."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from bridge_core import compiling, forward_options, tokens
from bridge_core.cache import ActivationCache
from bridge_core.components.base import GeneralizedComponent, input_checks
from bridge_core.errors import HookNameError, InputError, did_you_mean
from bridge_core.hooked_root import HookedRoot, slice_store
from bridge_core.hooked_root import HookSpec as HookSpec  # re-exported for callers
from bridge_core.hooks import Owner, running
from bridge_core.model_weights import ModelWeights
from bridge_core.naming import HookDict, HookNames, NamesFilter
from bridge_core.recording import Recorder, check_backward, run_backward
from bridge_core.saes import SAEMixin
from bridge_core.slices import SliceInput
from bridge_core.text import TextMixin

if TYPE_CHECKING:  # pydantic-backed: imported by the first wrap/boot, not with the package
    from bridge_core.config import TransformerBridgeConfig
    from bridge_core.layout import ImageLayout
    from bridge_core.loading import AdapterArg
    from bridge_core.registry import Registry
    from bridge_core.spec import AdapterSpec
    from bridge_core.verify import VerifyReport

ReturnType = Literal["logits", "loss", "both", "raw"] | None


class TransformerBridge(HookedRoot, TextMixin, ModelWeights, SAEMixin, nn.Module):
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
        super().__init__()
        self.adapter = adapter
        self.cfg = cfg
        self._processor = processor
        self._tokenizer = tokenizer if tokenizer is not None else _tokenizer_of(processor)
        self._text_loader: Callable[[], tuple[Any, Any]] | None = None
        self.compatibility_mode = False
        self.assemble(model, registry)

    def assemble(self, model: nn.Module, registry: Registry | None = None) -> None:
        """Bridge `model`: build the adapter's component tree over it (replacing any before).

        `enable_compatibility_mode` uses it to move the bridge onto a processed copy.
        """
        from bridge_core.assembly import Assembler, collect_names
        from bridge_core.registry import get_registry

        registry = registry or get_registry()
        reserved = RESERVED_NAMES | {n for n in vars(self) if not n.startswith("_")}
        built = Assembler(self.adapter, model, self.cfg, registry, reserved).build()
        self.original_model = model
        self._owner = Owner()  # what the points belong to: silent in other bridges' forwards
        self._names: HookNames = collect_names(built, self.adapter, self._owner)
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

    def enable_compatibility_mode(
        self,
        disable_warnings: bool = False,
        no_processing: bool = False,
        fold_ln: bool = True,
        center_writing_weights: bool = True,
        center_unembed: bool = True,
        fold_value_biases: bool = True,
        refactor_factored_attn_matrices: bool = False,
    ) -> TransformerBridge:
        """Process the weights as ``HookedTransformer.from_pretrained`` does, on a copy of the
        HF model that the bridge then runs (the model you wrapped is left as it was); see
        `bridge_core.compat`. `disable_warnings` is accepted for TransformerLens code.

        Returns:
            The bridge itself.
        """
        from bridge_core.compat import enable_compatibility_mode

        enable_compatibility_mode(
            self,
            no_processing,
            fold_ln,
            center_writing_weights,
            center_unembed,
            fold_value_biases,
            refactor_factored_attn_matrices,
        )
        return self

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
    def hook_dict(self) -> HookDict:
        """Every hook point by canonical name, in forward order; aliases find them too
        (``hook_dict["blocks.0.hook_resid_pre"]``), while iteration gives each point once."""
        return HookDict(self._names.points, self._names.aliases)

    def __getattr__(self, name: str) -> Any:
        """Components and hook points (nn.Module's lookup), then hook aliases of the whole
        model (``bridge.hook_embed``), as attributes of a HookedTransformer."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            names = self.__dict__.get("_names")
            if names is not None and name in names.aliases:
                return names.points[names.aliases[name]]
            raise

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
    def attached_points(self) -> int:
        """How many hook points have a hook (and their tap) attached right now."""
        return self._owner.attached_points

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the model's first floating-point parameter."""
        floats = (p for p in self.original_model.parameters() if p.is_floating_point())
        return next(floats, torch.zeros(())).dtype

    # -- forward -------------------------------------------------------------------------

    def forward(
        self,
        input: tokens.TextInput | torch.Tensor | None = None,
        return_type: ReturnType = "logits",
        loss_per_token: bool = False,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        start_at_layer: int | None = None,
        tokens: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        stop_at_layer: int | None = None,
        *,
        images: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Run the HF model; HookedTransformer's keywords and the HF model's keywords work.

        Args:
            input: text (tokenized for you, with `images` through the processor) or
                input ids (``[batch, pos]`` or ``[pos]``); or None and `input_ids=` /
                `inputs_embeds=` / ... as keywords; the residual stream with `start_at_layer`.
            return_type: "logits", "loss" (next-token loss on the input when no labels
                are given; masked tokens left out), "both" (logits, loss), "raw" (the HF
                ModelOutput) or None.
            loss_per_token: the loss per position, ``[batch, pos - 1]``.
            prepend_bos: for text: None is the config's ``default_prepend_bos``.
            start_at_layer: `input` is the residual stream before this block; `tokens`
                (for the loss, and positions) are the token ids, zeros if not given.
            attention_mask: HF's mask; positions are counted over it (left padding).
            stop_at_layer: return the residual stream before this block (``n_layers``: after
                the last), without running the rest.

        Returns:
            What `return_type` asks for (the residual stream with `stop_at_layer`).

        Raises:
            InputError: a keyword neither the bridge nor the HF model takes, and bad inputs.
        """
        if return_type not in ("logits", "loss", "both", "raw", None):
            raise InputError(
                f"return_type must be 'logits', 'loss', 'both', 'raw' or None (got {return_type!r})"
            )
        accepted = self._hf_keywords()
        forward_options.check_keywords(kwargs, accepted, type(self.original_model).__name__)
        window = forward_options.LayerWindow.of(start_at_layer, stop_at_layer, self.cfg.n_layers)
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        residual = None
        if window.start is not None:
            residual, input = forward_options.start_inputs(input, tokens, self.device)
        elif tokens is not None:
            raise InputError("tokens= goes with start_at_layer (the ids of the residual given)")
        inputs = self.prepare_inputs(input, images, prepend_bos, padding_side, **kwargs)
        forward_options.add_position_ids(inputs, accepted, self.original_model)
        ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
        if return_type in ("loss", "both") and "labels" not in inputs and not loss_per_token:
            if not isinstance(ids, torch.Tensor):
                raise InputError(
                    f"return_type={return_type!r} without labels= is the next-token loss on "
                    "input_ids; pass input_ids or labels"
                )
            inputs["labels"] = forward_options.lm_labels(ids, mask)
        if window.start is None and window.stop is None:
            output = self._run_model(**inputs)
        else:
            try:
                with window.hooks(self._names, residual):
                    output = self._run_model(**inputs)
            except forward_options.StopAtLayer as stop:
                return stop.residual
        return forward_options.select_output(output, return_type, loss_per_token, ids, mask)

    def _hf_keywords(self) -> frozenset[str]:
        accepted = self.__dict__.get("_accepted_keywords")
        if accepted is None:
            accepted = frozenset(forward_options.hf_keywords(self.original_model))
            self.__dict__["_accepted_keywords"] = accepted
        return accepted

    def _run_model(self, *args: Any, **kwargs: Any) -> Any:
        """The HF model's forward, as this bridge's (other bridges' hooks stay silent).

        With hooks attached it runs eagerly even where the model was compiled in place
        (`compile`): Python hooks that store, edit and route tensors are not something a
        compiled graph keeps. Without hooks, a compiled model runs compiled. Traced as part of
        ``torch.compile(bridge)``, the model runs outside the compiled graph, always: a graph
        compiled without hooks would silently skip hooks attached later.
        """
        if torch.compiler.is_compiling():
            return compiling.run_outside_compile(self._run_model, args, kwargs)
        model = self.original_model
        with running(self._owner):
            if not self._owner.attached_points:
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
        tokens.check_positions(inputs, self.cfg.n_ctx, self.cfg.positional_embedding_type)
        if "_checks" not in self.__dict__:  # found once: asked before every forward
            self.__dict__["_checks"] = input_checks(self.children())
        for check in self.__dict__["_checks"]:
            check(inputs)
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
            if input.dim() == 1:  # one sequence, as TransformerLens accepts it
                input = input.unsqueeze(0)
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
            bos = self.prepend_bos_for(prepend_bos)
            encoded = tokens.tokenize(self.tokenizer, input, bos, padding_side)
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

    # -- caching -----------------------------------------------------------------------

    def run_with_cache(
        self,
        *args: Any,
        names_filter: NamesFilter = None,
        device: str | torch.device | None = None,
        remove_batch_dim: bool = False,
        incl_bwd: bool = False,
        metric: Callable[[Any], torch.Tensor] | None = None,
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        pos_slice: SliceInput = None,
        return_cache_object: bool = True,
        **kwargs: Any,
    ) -> tuple[Any, Any]:
        """Run forward and cache the activations `names_filter` selects (all by default).

        Args:
            device: where to put cached tensors (the model stays where it is).
            remove_batch_dim: drop the batch dimension (batch of one).
            incl_bwd: also run backward and cache ``<name>_grad``: from ``metric(output)``
                if given, else from the loss (``return_type="loss"`` or ``"both"``).
            metric: ``fn(output) -> scalar tensor`` to differentiate (needs incl_bwd);
                gradients also reach inputs that require them (``pixel_values``).
            reset_hooks_end: False leaves the caching hooks attached (until `reset_hooks`):
                later forwards then overwrite the returned cache's tensors, as in
                TransformerLens.
            clear_contexts: empty every hook point's `ctx` afterwards.
            pos_slice: keep these positions of each cached activation (TransformerLens's
                slice input: an int drops the position dimension).
            return_cache_object: False returns the plain dict of tensors.

        Returns:
            (what forward returns, ActivationCache or dict); ``cache.image_layout`` is the
            `ImageLayout` of a run with images (computed when first read), else None.
        """
        selected = self._names.select(names_filter)
        check_backward(incl_bwd, metric, kwargs.get("return_type", "logits"))
        if not reset_hooks_end:
            output, ordered, calls = self._lasting_cache(
                args, kwargs, selected, device, remove_batch_dim, incl_bwd, pos_slice
            )
        else:
            output, ordered, calls = self._recorded_run(
                args, kwargs, selected, device, remove_batch_dim, incl_bwd, metric, clear_contexts
            )
            ordered, calls = slice_store(ordered, calls, pos_slice)
        cache = ActivationCache(ordered, self, has_batch_dim=not remove_batch_dim, calls=calls)
        if any(k in kwargs for k in ("images", "pixel_values", "pixel_values_videos")):
            cache.set_image_layout(lambda: self.image_layout(*args, **kwargs))
        return output, (cache if return_cache_object else cache.cache_dict)

    def _recorded_run(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        selected: list[str],
        device: str | torch.device | None,
        remove_batch_dim: bool,
        incl_bwd: bool,
        metric: Callable[[Any], torch.Tensor] | None,
        clear_contexts: bool,
    ) -> tuple[Any, dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
        """Run with recording hooks: (output, one tensor per key, repeated calls)."""
        recorder = Recorder(device, remove_batch_dim)
        points = [self._names.points[n] for n in selected]
        save = recorder.saver(points)
        fwd = [(p, save) for p in points]
        if not incl_bwd:
            with self._attached(fwd, clear_contexts=clear_contexts):
                output = self._eager_call(*args, **kwargs)
            store, calls = recorder.finish()  # in `selected` order: the savers' order
            return output, store, calls
        save_grad = recorder.saver(points, grad=True)
        bwd = [(p, save_grad) for p in points]
        with torch.enable_grad(), self._attached(fwd, bwd, clear_contexts=clear_contexts):
            output = self._eager_call(*args, **kwargs)  # gradients also under no_grad()
            run_backward(output, metric)
        store, calls = recorder.finish()
        order = {n: i for i, n in enumerate(selected)}
        ordered = dict(
            sorted(store.items(), key=lambda kv: order.get(kv[0].removesuffix("_grad"), 0))
        )
        return output, ordered, calls

    # -- text ----------------------------------------------------------------------------

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
        from bridge_core.hooks import strip_taps
        from bridge_core.switches import restore_kernel_names

        model = copy.deepcopy(self.original_model, memo)
        strip_taps(model)
        restore_kernel_names(model)
        text = (copy.deepcopy(self._tokenizer, memo), copy.deepcopy(self._processor, memo))
        clone = type(self)(model, self.adapter, self.cfg.model_copy(), *text)
        clone._text_loader = self._text_loader
        self._copy_hooks_to(clone)
        return clone

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


RESERVED_NAMES = (
    frozenset(dir(TransformerBridge))
    | frozenset(vars(nn.Module()))
    | {
        "original_model",
        "adapter",
        "cfg",
        "attached_points",
        "compatibility_mode",
    }
)
"""Names a top-level component cannot take: the bridge's own attributes."""


def _tokenizer_of(processor: Any) -> Any:
    return getattr(processor, "tokenizer", None)
