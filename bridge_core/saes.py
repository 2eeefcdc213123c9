"""SAELens interop: sparse autoencoders spliced into the forward pass at a hook point.

`SAEMixin` gives the bridge ``HookedSAETransformer``'s API (`add_sae`, `reset_saes`, `saes`,
`run_with_saes`, `run_with_cache_with_saes`, `run_with_hooks_with_saes`, `acts_to_saes`).
An SAE is anything with SAELens's interface: ``cfg.metadata.hook_name`` (or ``cfg.hook_name``),
``encode(x)``, ``decode(acts)``, ``use_error_term`` and its own hook modules
(``hook_sae_input``, ``hook_sae_acts_pre``, ``hook_sae_acts_post``, ``hook_sae_recons``) that
it calls while encoding and decoding; SAELens itself is not imported.

Splicing adds one permanent, first hook to the hook point that replaces the activation with
``decode(encode(x))``, plus, when ``use_error_term``, the error ``x - decode(encode(x))``
computed without hooks: then the model runs exactly as without the SAE (the activation itself
goes on, with the SAE on its gradient path) unless a hook edits the SAE's activations or
error. The SAE's hook modules become hook points of the bridge named
``<the SAE's hook_name>.hook_sae_*``, as SAELens names them (the canonical hook name works too
while the SAE is in), so they can be cached, hooked and filtered like any other;
``hook_sae_error`` and ``hook_sae_output`` are the bridge's own, as in SAELens. Hooks added to
the hook point itself run after the SAE: they see what the rest of the model receives.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bridge_core.attention import exact_with_grad
from bridge_core.errors import InputError
from bridge_core.hooks import (
    Handle,
    HookHandle,
    HookPoint,
    Owner,
    Run,
    first_tensor,
    mark_tap,
    replace_first,
)
from bridge_core.naming import HookNames, NamesFilter
from bridge_core.normalization import through

OWN_POINTS = ("hook_sae_error", "hook_sae_output")


@dataclass
class _State:
    """Whether the SAE is being run without hooks (for the error term)."""

    clean: bool = False


@dataclass(frozen=True)
class _SAEModuleTap:
    """The output of one of the SAE's own hook modules (skipped while computing the error)."""

    module: nn.Module
    state: _State

    def attach(self, run: Run) -> Handle:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if self.state.clean:
                return None
            tensor = first_tensor(output)
            new = run(tensor)
            return None if new is tensor else replace_first(output, new)

        return self.module.register_forward_hook(mark_tap(hook))


class _Called:
    """A tap for a hook point the splice calls itself (``hook_sae_error``, ``hook_sae_output``)."""

    def attach(self, run: Run) -> Handle:
        return _Nothing()


class _Nothing:
    def remove(self) -> None:
        """Nothing was registered."""


@dataclass
class _Spliced:
    """One SAE spliced in at a hook point."""

    sae: Any
    name: str
    canonical: str
    use_error_term: bool
    state: _State = field(default_factory=_State)
    points: dict[str, HookPoint] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)
    handle: HookHandle | None = None

    def splice(self, x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        """The SAE's reconstruction of `x` (plus the error term, if used)."""
        weight = next(iter(self.sae.parameters()), None)
        dtype = weight.dtype if isinstance(weight, torch.Tensor) else x.dtype
        sae_in = x.to(dtype)
        out = self.sae.decode(self.sae.encode(sae_in))
        if self.use_error_term:
            with torch.no_grad():
                self.state.clean = True
                try:
                    clean = self.sae.decode(self.sae.encode(sae_in))
                finally:
                    self.state.clean = False
                error, edited, _ = through(self.points["hook_sae_error"], sae_in - clean)
            if edited or not torch.equal(out, clean):
                out = out + error
            elif out.requires_grad and torch.is_grad_enabled():  # exact, SAE on the grad path
                out = exact_with_grad(sae_in, out + error)
            else:  # nothing edited: exactly the activation (``out + error`` is only close)
                out = sae_in
        result: torch.Tensor = self.points["hook_sae_output"](out)
        return result.to(x.dtype)


def hook_name_of(sae: Any) -> str:
    """The hook name an SAE is trained on: ``cfg.metadata.hook_name`` (SAELens 6) or
    ``cfg.hook_name``.

    Raises:
        InputError: the object has neither, or is a transcoder (input and output differ).
    """
    cfg = getattr(sae, "cfg", None)
    metadata = getattr(cfg, "metadata", None)
    name = getattr(metadata, "hook_name", None) or getattr(cfg, "hook_name", None)
    if not isinstance(name, str):
        raise InputError(
            f"{type(sae).__name__} has no cfg.metadata.hook_name (or cfg.hook_name): "
            "an SAE says which hook point it reads, as SAELens's SAEs do"
        )
    out = getattr(metadata, "hook_name_out", None)
    if out not in (None, name):
        raise InputError(
            f"{type(sae).__name__} reads {name!r} and writes {out!r} (a transcoder); "
            "only SAEs that read and write one hook point are spliced"
        )
    for method in ("encode", "decode"):
        if not callable(getattr(sae, method, None)):
            raise InputError(f"{type(sae).__name__} has no {method}(); an SAE encodes and decodes")
    return name


class SAEMixin(nn.Module):
    """SAELens's ``HookedSAETransformer`` API on the bridge."""

    _names: HookNames
    _owner: Owner

    @property
    def _spliced(self) -> dict[str, _Spliced]:
        found: dict[str, _Spliced] | None = self.__dict__.get("_spliced_saes")
        if found is None:
            found = self.__dict__["_spliced_saes"] = {}
        return found

    @property
    def acts_to_saes(self) -> dict[str, Any]:
        """The SAEs spliced in, by the hook name each was added at."""
        return {s.name: s.sae for s in self._spliced.values()}

    def add_sae(self, sae: Any, use_error_term: bool | None = None) -> None:
        """Splice `sae` in at its hook point until `reset_saes` (replacing one already there).

        Args:
            use_error_term: add the SAE's error, so the model runs as without it unless a
                hook edits the SAE's activations; None keeps ``sae.use_error_term``.

        Raises:
            InputError: not an SAE; HookNameError: its hook name is unknown.
        """
        name = hook_name_of(sae)
        canonical = self._names.canonical(name)
        point = self._names.points[canonical]
        if not point.enabled:
            raise InputError(f"{canonical!r} is off (opt-in): switch it on before splicing an SAE")
        if canonical in self._spliced:
            self._remove_sae(canonical)
        error_term = bool(sae.use_error_term if use_error_term is None else use_error_term)
        spliced = _Spliced(sae, name, canonical, error_term)
        for attr, module in sae.named_modules():
            if attr.startswith("hook_") and "." not in attr and attr not in OWN_POINTS:
                self._register(spliced, attr, _SAEModuleTap(module, spliced.state))
        for attr in OWN_POINTS:
            self._register(spliced, attr, _Called())
        self._spliced[canonical] = spliced
        spliced.handle = point.add_hook(spliced.splice, is_permanent=True, prepend=True)

    def _register(self, spliced: _Spliced, attr: str, tap: Any) -> None:
        point = HookPoint()
        point.name = f"{spliced.name}.{attr}"  # SAELens's cache keys: the SAE's hook name
        point.owner = self._owner  # silent in other bridges' forwards, as the bridge's points
        point.bind(tap)
        spliced.points[attr] = point
        self._names.points[point.name] = point
        if spliced.name != spliced.canonical:
            alias = f"{spliced.canonical}.{attr}"
            self._names.aliases[alias] = point.name
            spliced.aliases.append(alias)

    def reset_saes(self, act_names: str | Sequence[str] | None = None) -> None:
        """Take out the SAEs at these hook names (all by default)."""
        if isinstance(act_names, str):
            act_names = [act_names]
        names = list(self._spliced) if act_names is None else act_names
        for name in names:
            canonical = self._names.canonical(name)
            if canonical not in self._spliced:
                raise InputError(f"no SAE is spliced in at {name!r} (at: {list(self._spliced)})")
            self._remove_sae(canonical)

    def _remove_sae(self, canonical: str) -> None:
        spliced = self._spliced.pop(canonical)
        if spliced.handle is not None:
            spliced.handle.remove()
        for point in spliced.points.values():
            point.remove_hooks("both", including_permanent=True)
            self._names.points.pop(point.name, None)
        for alias in spliced.aliases:
            self._names.aliases.pop(alias, None)

    @contextmanager
    def saes(
        self,
        saes: Any | Sequence[Any] = (),
        reset_saes_end: bool = True,
        use_error_term: bool | None = None,
    ) -> Iterator[Any]:
        """Splice `saes` in for a ``with`` block; afterwards the SAEs that were spliced in
        before are back as they were."""
        saes = [saes] if not isinstance(saes, list | tuple) else list(saes)
        previous: list[tuple[str, _Spliced | None]] = []
        try:
            for sae in saes:
                canonical = self._names.canonical(hook_name_of(sae))
                previous.append((canonical, self._spliced.get(canonical)))
                self.add_sae(sae, use_error_term)
            yield self
        finally:
            if reset_saes_end:
                for canonical, before in reversed(previous):
                    if canonical in self._spliced:
                        self._remove_sae(canonical)
                    if before is not None:
                        self.add_sae(before.sae, before.use_error_term)

    def run_with_saes(
        self,
        *args: Any,
        saes: Any | Sequence[Any] = (),
        reset_saes_end: bool = True,
        use_error_term: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run forward with `saes` spliced in."""
        with self.saes(saes, reset_saes_end, use_error_term):
            return self(*args, **kwargs)

    def run_with_cache_with_saes(
        self,
        *args: Any,
        saes: Any | Sequence[Any] = (),
        reset_saes_end: bool = True,
        use_error_term: bool | None = None,
        names_filter: NamesFilter = None,
        **kwargs: Any,
    ) -> tuple[Any, Any]:
        """`run_with_cache` with `saes` spliced in; their ``hook_sae_*`` points are cached too."""
        with self.saes(saes, reset_saes_end, use_error_term):
            cached: tuple[Any, Any] = self.run_with_cache(
                *args, names_filter=names_filter, **kwargs
            )
            return cached

    def run_with_hooks_with_saes(
        self,
        *args: Any,
        saes: Any | Sequence[Any] = (),
        reset_saes_end: bool = True,
        use_error_term: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """`run_with_hooks` with `saes` spliced in (hooks may name their ``hook_sae_*`` points)."""
        with self.saes(saes, reset_saes_end, use_error_term):
            return self.run_with_hooks(*args, **kwargs)

    def run_with_cache(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]:  # the bridge's
        raise NotImplementedError

    def run_with_hooks(self, *args: Any, **kwargs: Any) -> Any:  # HookedRoot's
        raise NotImplementedError
