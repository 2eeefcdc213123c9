"""Self-verification: run a bridge on generated inputs and check every hook point.

`verify` runs the model a few dozen times with hooks that count, cache, copy and perturb
activations, and compares outputs bit for bit. It checks per hook point that the point fires
as often as its adapter declares, has its documented shape, and that a random edit changes the
outputs (or, where the adapter says the point cannot reach them, does not); per attention
that an edit of one head's q, k or v moves only that head's z (which catches a fused layout
split the wrong way), and that the pattern recomputed from the q and k the kernel saw equals
``hook_pattern``; and for the whole model that caching everything and identity edits change
nothing and that the residual stream adds up. Failures name the check and the hook point.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from bridge_core import tokens
from bridge_core.components.base import GeneralizedComponent
from bridge_core.errors import BridgeError
from bridge_core.hooks import HookPoint
from bridge_core.verify_checks import Result

if TYPE_CHECKING:
    from bridge_core.bridgelike import BridgeLike
    from bridge_core.cache import ActivationCache

CHECKS = ("fires", "shape", "observe", "identity", "causal", "heads", "pattern", "residual")
"""Every check `verify` runs, in report order."""


@dataclass
class VerifyReport:
    """What `verify` found: one `Result` per check and hook point."""

    adapter: str
    model: str
    results: list[Result] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether no check failed."""
        return not self.failures()

    def failures(self) -> list[Result]:
        """The failed checks."""
        return [r for r in self.results if r.ok is False]

    def by_hook(self) -> dict[str, dict[str, Result]]:
        """Results by hook point (``""`` for model-wide checks), then by check."""
        table: dict[str, dict[str, Result]] = {}
        for result in self.results:
            table.setdefault(result.hook, {})[result.check] = result
        return table

    def summary(self) -> str:
        """One line: how many hook points and checks, and the failures."""
        hooks = len({r.hook for r in self.results if r.check == "fires"})
        failed = self.failures()
        head = f"verify {self.adapter} ({self.model}): {hooks} hook points"
        if not failed:
            return f"{head}, {len(self.results)} checks passed"
        shown = "; ".join(f"{r.check} {r.hook or '(model)'}: {r.detail}" for r in failed[:3])
        more = f" (and {len(failed) - 3} more)" if len(failed) > 3 else ""
        return f"{head}, {len(failed)} of {len(self.results)} checks FAILED: {shown}{more}"

    def to_json(self) -> str:
        """The report as JSON (``ok``, ``summary`` and every result)."""
        results = [r.__dict__ for r in self.results]
        data = {"adapter": self.adapter, "model": self.model, "ok": self.ok}
        return json.dumps({**data, "summary": self.summary(), "results": results}, indent=1)

    def __str__(self) -> str:
        return self.summary()


class _Stop(Exception):
    """Raised by a hook to end a forward early (the rest is not needed)."""


def verify(bridge: BridgeLike, inputs: dict[str, Any] | None = None) -> VerifyReport:
    """Check every hook point of `bridge` on `inputs` (generated when None); see the module doc."""
    run = _Run(bridge, example_inputs(bridge) if inputs is None else dict(inputs))
    report = VerifyReport(bridge.adapter.name, type(bridge.original_model).__name__)
    for check in (
        run.fires_and_shapes,
        run.observe,
        run.identity,
        run.causal,
        run.heads,
        run.patterns,
        run.residual,
    ):
        report.results.extend(check())
    return report


def example_inputs(bridge: BridgeLike, batch: int = 2, pos: int = 8) -> dict[str, Any]:
    """Token ids (and whatever the bridge's components add, e.g. images) to verify with."""
    cfg = bridge.cfg
    vocab = cfg.d_vocab or 100
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(min(3, vocab - 1), vocab, (batch, pos), generator=generator)
    if cfg.image_token_id is not None:  # never a stray image token
        ids[ids == cfg.image_token_id] = (cfg.image_token_id + 1) % vocab
    inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(getattr(bridge.original_model, "config", None), "is_encoder_decoder", False):
        # the decoder's own tokens, as many as the encoder's (the shapes name one `pos`)
        low = min(3, vocab - 1)
        inputs["decoder_input_ids"] = torch.randint(low, vocab, (batch, pos), generator=generator)
    processor = bridge.processor if cfg.is_multimodal else None
    for component in bridge.children():
        if isinstance(component, GeneralizedComponent):
            inputs = component.example_inputs(inputs, processor)
    return tokens.to_device(inputs, bridge.device, bridge.dtype)


class _Run:
    """The verification of one bridge on one set of inputs."""

    def __init__(self, bridge: BridgeLike, inputs: dict[str, Any]) -> None:
        self.bridge = bridge
        self.inputs = inputs
        self.points = {n: p for n, p in bridge.hook_dict.items() if p.enabled}
        self.owner = dict(_owners(bridge))
        self.dims = _dims(bridge, inputs)
        self.generator = torch.Generator().manual_seed(1)
        self.baseline = self.forward()
        self.cache: ActivationCache | None = None
        self.empty: set[str] = set()  # points that fired with empty tensors only
        self.skip = bridge.adapter.verify.skip
        self._ranges = {k: n for c in _walk(bridge) for k, n in c.integer_ranges().items()}

    def forward(self, hooks: list[tuple[str, Callable[..., Any]]] | None = None) -> torch.Tensor:
        with torch.no_grad():
            output = self.bridge.run_with_hooks(**self.inputs, fwd_hooks=hooks or [])
        return output if isinstance(output, torch.Tensor) else output[0]

    # -- per hook point ---------------------------------------------------------------------

    def fires_and_shapes(self) -> Iterator[Result]:
        shapes: dict[str, list[tuple[int, ...]]] = {n: [] for n in self.points}

        def record(x: torch.Tensor, hook: HookPoint) -> None:
            shapes[hook.name].append(tuple(x.shape))

        try:
            self.forward([(n, record) for n in self.points])
        except Exception:  # some point cannot be hooked: find it, report it, go on without it
            yield from self._refusing_points()
            shapes = {n: [] for n in self.points}
            self.forward([(n, record) for n in self.points])
        counts = self._counts()
        self.empty = {n for n, seen in shapes.items() if seen and all(0 in s for s in seen)}
        for name, point in self.points.items():
            seen = shapes[name]
            yield _fires(name, point, len(seen), counts)
            yield self._shape(name, point, seen)

    def _refusing_points(self) -> Iterator[Result]:
        for name in list(self.points):
            try:
                self.forward([(name, lambda x, hook: None)])
            except Exception as exc:
                del self.points[name]
                error = f"{type(exc).__name__}: {exc}"
                yield Result("fires", name, False, f"a hook on it raised {error}")

    def _counts(self) -> dict[str, int]:
        """Values for ``calls`` expressions: the config's sizes, and what components count."""
        cfg = self.bridge.cfg.model_dump()
        counts: dict[str, int] = {k: v for k, v in cfg.items() if isinstance(v, int)}
        for component in self.bridge.children():
            if isinstance(component, GeneralizedComponent):
                counts.update(component.call_counts(self.inputs))
        return counts

    def _shape(self, name: str, point: HookPoint, seen: list[tuple[int, ...]]) -> Result:
        if point.shape is None:
            return Result("shape", name, None, "no documented shape")
        if not seen:
            return Result("shape", name, False, "did not fire")
        dims = self.dims.get(self.owner.get(name, ""), self.dims[""])
        for shape in dict.fromkeys(seen):
            problem = shape_mismatch(shape, point.shape, dims)
            if problem:
                return Result("shape", name, False, problem)
        return Result("shape", name, True, f"{list(seen[0])} = {list(point.shape)}")

    def causal(self) -> Iterator[Result]:
        unreachable = self._unreachable()
        for name in self.points:
            if name in self.empty:  # an expert no token was routed to: no value to edit
                yield Result("causal", name, None, "fired only with empty tensors on these inputs")
                continue
            dead = name in unreachable
            try:
                edited = self.forward([(name, self._perturb)])
            except Exception as exc:  # an edit the model cannot take is a finding, not a crash
                yield Result(
                    "causal", name, False, f"a random edit raised {type(exc).__name__}: {exc}"
                )
                continue
            changed = not torch.equal(edited, self.baseline)
            if dead:
                detail = (
                    "declared unreachable; an edit changes nothing"
                    if not changed
                    else ("declared unreachable by its adapter, but an edit changed the outputs")
                )
                yield Result("causal", name, not changed, detail)
            else:
                detail = (
                    "an edit changes the outputs"
                    if changed
                    else (
                        "a random edit did not change the outputs (if it cannot reach them by "
                        "construction, the adapter should declare it unreachable)"
                    )
                )
                yield Result("causal", name, changed, detail)

    def _perturb(self, x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        if not x.is_floating_point():
            vocab = self._ranges.get(hook.name) or self.bridge.cfg.d_vocab or int(x.max()) + 2
            return (x + 1) % vocab
        noise = torch.randn(x.shape, generator=self.generator).to(x.dtype).to(x.device)
        return x + noise * (x.float().std().nan_to_num(1.0).clamp(min=1e-2) + 1).to(x.dtype)

    def _unreachable(self) -> set[str]:
        names: set[str] = set()
        for component in _walk(self.bridge):
            names.update(component.unreachable_hooks())
        patterns = self.bridge.adapter.verify.unreachable
        aliases = self.bridge.hook_aliases()
        for name in self.points:
            called = [name, *(a for a, t in aliases.items() if t == name)]
            if any(fnmatch.fnmatchcase(n, p) for n in called for p in patterns):
                names.add(name)
        return names

    # -- whole model --------------------------------------------------------------------------

    def observe(self) -> Iterator[Result]:
        with torch.no_grad():
            logits, self.cache = self.bridge.run_with_cache(**self.inputs)
        logits = logits if isinstance(logits, torch.Tensor) else logits[0]
        if torch.equal(logits, self.baseline):
            yield Result("observe", "", True, "caching every hook point leaves outputs equal")
            return
        for name in self.points:  # find the points whose observation changes the outputs
            with torch.no_grad():
                alone, _ = self.bridge.run_with_cache(**self.inputs, names_filter=name)
            if not torch.equal(alone, self.baseline):
                yield Result("observe", name, False, "caching it changes the outputs")
        yield Result("observe", "", False, "caching every hook point changes the outputs")

    def identity(self) -> Iterator[Result]:
        def copy(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
            return x.clone()

        if torch.equal(self.forward([(n, copy) for n in self.points]), self.baseline):
            yield Result("identity", "", True, "identity edits (new tensors) leave outputs equal")
            return
        for name in self.points:
            if not torch.equal(self.forward([(name, copy)]), self.baseline):
                yield Result("identity", name, False, "returning an equal copy changes the outputs")
        yield Result("identity", "", False, "identity edits change the outputs")

    def heads(self) -> Iterator[Result]:
        from bridge_core.verify_checks import head_locality

        if "heads" in self.skip:
            yield Result("heads", "", None, self.skip["heads"])
            return
        yield from head_locality(self, _attentions(self.bridge))

    def patterns(self) -> Iterator[Result]:
        from bridge_core.verify_checks import recomputed_patterns

        if "pattern" in self.skip:
            yield Result("pattern", "", None, self.skip["pattern"])
            return
        assert self.cache is not None
        yield from recomputed_patterns(self, self.cache, _attentions(self.bridge))

    def residual(self) -> Iterator[Result]:
        from bridge_core.verify_checks import residual_algebra

        if "residual" in self.skip:
            yield Result("residual", "", None, self.skip["residual"])
            return
        assert self.cache is not None
        yield from residual_algebra(self.bridge, self.cache)


def _fires(name: str, point: HookPoint, n: int, counts: dict[str, int]) -> Result:
    from bridge_core import expr

    declared = point.calls
    if declared == "any":
        return Result("fires", name, n >= 1, f"{n} times (declared: any number)")
    if isinstance(declared, str):
        value = expr.evaluate(declared, lambda k: counts.get(k, expr.MISSING))
        if not isinstance(value, int):
            return Result("fires", name, False, f"cannot evaluate calls = {declared!r} ({counts})")
        expected = value
    else:
        expected = declared
    ok = n == expected
    return Result("fires", name, ok, f"{n} times per forward (declared {declared})")


def shape_mismatch(
    shape: tuple[int, ...], documented: tuple[int | str, ...], dims: dict[str, int | None]
) -> str:
    """Why `shape` is not `documented` under `dims` (free symbols bind once), or ``""``."""
    from bridge_core import expr

    if len(shape) != len(documented):
        return f"{list(shape)} has {len(shape)} dimensions, documented {list(documented)}"
    bound: dict[str, int] = {}
    for size, symbol in zip(shape, documented, strict=True):
        options = symbol.split("|") if isinstance(symbol, str) else [symbol]
        allowed: list[int] = []
        for option in options:
            if isinstance(option, int) or option.isdigit():
                allowed.append(int(option))
            elif option in bound:
                allowed.append(bound[option])
            elif option.isidentifier() and dims.get(option) is None:
                bound[option] = size  # free: the first occurrence binds it
                allowed.append(size)
            else:
                value = expr.evaluate(option, lambda k: dims.get(k) or expr.MISSING)
                if isinstance(value, int):
                    allowed.append(value)
        if size not in allowed:
            return f"{list(shape)} is not {list(documented)} (with {_shown(dims)})"
    return ""


def _shown(dims: dict[str, int | None]) -> str:
    return ", ".join(f"{k}={v}" for k, v in dims.items() if v is not None)


def _walk(bridge: BridgeLike) -> Iterator[GeneralizedComponent]:
    for module in bridge.modules():
        if isinstance(module, GeneralizedComponent):
            yield module


def _owners(bridge: BridgeLike) -> Iterator[tuple[str, str]]:
    """(hook name, name of the component that owns it)."""
    for component in _walk(bridge):
        for _, point in component.own_hook_points():
            yield point.name, component.name


def _dims(bridge: BridgeLike, inputs: dict[str, Any]) -> dict[str, dict[str, int | None]]:
    """The shape symbols' values for each component (``""``: the bridge's own)."""
    cfg = bridge.cfg
    ids = inputs.get("input_ids")
    root: dict[str, int | None] = {
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "d_head": cfg.d_head,
        "n_kv_heads": cfg.n_key_value_heads,
        "d_mlp": cfg.d_mlp,
        "d_vocab": cfg.d_vocab,
        "batch": int(ids.shape[0]) if isinstance(ids, torch.Tensor) else None,
        "pos": int(ids.shape[1]) if isinstance(ids, torch.Tensor) else None,
    }
    found: dict[str, dict[str, int | None]] = {"": root}

    def visit(component: GeneralizedComponent, inherited: dict[str, int | None]) -> None:
        own = {**inherited, **component.dims()}
        found[component.name] = own
        for child in component.components():
            visit(child, own)

    for child in bridge.children():
        if isinstance(child, GeneralizedComponent):
            visit(child, root)
        elif isinstance(child, torch.nn.ModuleList):
            for item in child:
                if isinstance(item, GeneralizedComponent):
                    visit(item, root)
    return found


def _attentions(bridge: BridgeLike) -> list[GeneralizedComponent]:
    """Attention components (with per-head q/k/v/z), first and last of each stack of layers."""
    found = [c for c in _walk(bridge) if _bound(c, "hook_z") and _bound(c, "hook_q")]
    stacks: dict[str, list[GeneralizedComponent]] = {}
    for component in found:
        prefix = "".join(p if not p.isdigit() else "#" for p in component.name.split("."))
        stacks.setdefault(prefix, []).append(component)
    chosen = [c for group in stacks.values() for c in dict.fromkeys([group[0], group[-1]])]
    return chosen


def _bound(component: GeneralizedComponent, attr: str) -> bool:
    point = getattr(component, attr, None)
    return isinstance(point, HookPoint) and point._tap is not None and point.enabled


def raise_if_failed(report: VerifyReport) -> None:
    """Raise a `BridgeError` with the report's summary if any check failed."""
    if not report.ok:
        raise BridgeError(report.summary())
