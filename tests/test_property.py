"""Property: random sequences of add / run / raise / reset leave exactly the expected hooks,
and after a full reset nothing is left behind and the plain output is unchanged."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from torch import nn

from bridge_adapters import tiny
from bridge_core import HookPoint, TransformerBridge

KINDS = ("read", "edit", "raise")  # one function of each kind, added again and again


class Boom(Exception):
    """Raised by "raise" hooks and inside hooks() blocks."""


@dataclass(frozen=True)
class World:
    """One tiny GPT-2, its bridge, and what "untouched" looks like."""

    model: nn.Module
    bridge: TransformerBridge
    ids: torch.Tensor
    plain: torch.Tensor
    torch_hooks: dict[str, tuple[tuple[int, ...], ...]]
    attn_implementation: str


def torch_hooks(model: nn.Module) -> dict[str, tuple[tuple[int, ...], ...]]:
    """The PyTorch hooks registered on every module of the HF model, by module name."""
    return {
        name: (
            tuple(module._forward_hooks),
            tuple(module._forward_pre_hooks),
            tuple(module._backward_hooks),
            tuple(module._backward_pre_hooks),
        )
        for name, module in model.named_modules()
    }


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny matrices: one thread is several times faster than contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(one_thread: None) -> World:
    model, tokenizer = tiny.tiny_gpt2(n_layer=2)
    ids = torch.randint(3, 500, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(ids).logits
    before = torch_hooks(model)
    bridge = TransformerBridge.wrap(model, tokenizer=tokenizer)
    assert torch_hooks(model) == before, "wrapping registered PyTorch hooks"
    return World(model, bridge, ids, plain, before, model.config._attn_implementation)


@dataclass(eq=False)
class Recorder:
    """A hook function that logs (its id, the hook point's name) whenever it runs."""

    id: str
    kind: str
    log: list[tuple[str, str]]

    def __call__(self, tensor: torch.Tensor, hook: HookPoint) -> torch.Tensor | None:
        self.log.append((self.id, hook.name))
        if self.kind == "raise":
            raise Boom(f"{self.id} on {hook.name}")
        if self.kind == "edit":
            return tensor * 1.5 if tensor.is_floating_point() else tensor.clone()
        return None


@dataclass(frozen=True, eq=False)
class Attached:
    """One hook the model of the bridge expects on one hook point."""

    fn: Recorder
    point: str
    permanent: bool


class HookLifeCycle(RuleBasedStateMachine):
    """Drives one bridge through random hook operations, checking it after every step."""

    world: ClassVar[World]

    def __init__(self) -> None:
        super().__init__()
        self.bridge = self.world.bridge
        self.log: list[tuple[str, str]] = []
        self.functions = {kind: Recorder(kind, kind, self.log) for kind in KINDS}
        self.expected: list[Attached] = []
        self.handles: list[tuple[Any, Attached]] = []
        self.history: list[tuple[Any, list[str], Recorder, bool]] = []
        points = self.bridge.hook_dict
        self.names = [  # opt-in points that are off refuse hooks (tested elsewhere)
            n for n in self.bridge.hook_names() if points[self.bridge._names.canonical(n)].enabled
        ]
        self.aliases = self.bridge.hook_aliases()
        self.patterns = [n for n in self.names if n.endswith(("hook_pattern", "hook_attn_scores"))]

    # -- drawing operations ----------------------------------------------------------------

    def draw_names(self, data: st.DataObject) -> tuple[Any, list[str]]:
        """A names argument (a name, a list or a predicate) and the canonical points it means."""
        name = st.sampled_from(self.focus)
        names = data.draw(st.lists(name, min_size=1, max_size=3), label="names")
        form = data.draw(st.sampled_from(["name", "list", "predicate"]), label="form")
        points = sorted({self.aliases.get(n, n) for n in names})
        if form == "name":
            return names[0], [self.aliases.get(names[0], names[0])]
        if form == "list":
            return names, points
        chosen = set(names)
        return (lambda n: n in chosen), points

    def draw_function(self, data: st.DataObject, kinds: tuple[str, ...] = KINDS) -> Recorder:
        return self.functions[data.draw(st.sampled_from(kinds), label="kind")]

    def draw_temporary(self, data: st.DataObject) -> tuple[list[Any], list[Attached]]:
        hooks, attached = [], []
        for _ in range(data.draw(st.integers(1, 2), label="n temporary")):
            names, points = self.draw_names(data)
            fn = self.draw_function(data)
            hooks.append((names, fn))
            attached += [Attached(fn, p, permanent=False) for p in points]
        return hooks, attached

    # -- checks ----------------------------------------------------------------------------

    def check_attached(self, hooks: list[Attached]) -> None:
        expected = {a.point for a in hooks}
        actual = {n for n, p in self.bridge.hook_dict.items() if p.has_hooks()}
        assert actual == expected, f"hooks on {actual - expected}, none on {expected - actual}"
        if not any(a.point.endswith(("hook_pattern", "hook_attn_scores")) for a in hooks):
            assert self.world.model.config._attn_implementation == self.world.attn_implementation
        if not hooks:
            assert torch_hooks(self.world.model) == self.world.torch_hooks

    def forward(self, run: Callable[[], Any], hooks: list[Attached]) -> Any:
        """Run `run` with `hooks` attached; check that exactly those hooks fired, once each."""
        self.log.clear()
        if any(a.fn.kind == "raise" for a in hooks):
            with pytest.raises(Boom):
                run()
            return None
        output = run()
        fired, expected = Counter(self.log), Counter((a.fn.id, a.point) for a in hooks)
        assert fired == expected, (
            f"ran but not attached: {fired - expected}; missing: {expected - fired}"
        )
        logits = output[0] if isinstance(output, tuple) else output
        if not any(a.fn.kind == "edit" for a in hooks):
            assert torch.equal(logits, self.world.plain), "read-only hooks changed the output"
        return output

    @invariant()
    def attached_hooks_are_the_expected_ones(self) -> None:
        self.check_attached(self.expected)
        with torch.no_grad():
            self.forward(lambda: self.bridge(self.world.ids), self.expected)

    # -- rules -----------------------------------------------------------------------------

    @initialize(data=st.data())
    def choose_hook_points(self, data: st.DataObject) -> None:
        """A few names per run, aliases and attention patterns among them, so hooks meet."""
        focus = st.lists(st.sampled_from(self.names), min_size=1, max_size=2, unique=True)
        self.focus = [
            *data.draw(focus, label="focus"),
            data.draw(st.sampled_from(sorted(self.aliases)), label="alias"),
            data.draw(st.sampled_from(self.patterns), label="pattern"),
        ]
        self.check_attached([])

    @rule(data=st.data(), permanent=st.booleans(), perma_method=st.booleans())
    def add_hook(self, data: st.DataObject, permanent: bool, perma_method: bool) -> None:
        if self.history and data.draw(st.booleans(), label="again"):
            # re-running a notebook cell: the same call once more
            names, points, fn, permanent = data.draw(st.sampled_from(self.history), label="cell")
        else:
            names, points = self.draw_names(data)
            fn = self.draw_function(data, kinds=("read", "edit"))  # raising: temporary only
            self.history.append((names, points, fn, permanent))
        if permanent and perma_method:
            handles = self.bridge.add_perma_hook(names, fn)
        else:
            handles = self.bridge.add_hook(names, fn, is_permanent=permanent)
        assert sorted(h.point.name for h in handles) == points
        for handle in handles:
            attached = Attached(fn, handle.point.name, permanent)
            self.expected.append(attached)
            self.handles.append((handle, attached))

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def remove_one_handle(self, data: st.DataObject) -> None:
        handle, attached = data.draw(st.sampled_from(self.handles), label="handle")
        handle.remove()
        if attached in self.expected:
            self.expected.remove(attached)

    def stale_handles(self) -> list[tuple[Any, Attached]]:
        return [(h, a) for h, a in self.handles if a not in self.expected]

    @precondition(lambda self: self.stale_handles())
    @rule(data=st.data())
    def remove_a_handle_whose_hook_is_gone(self, data: st.DataObject) -> None:
        """``handle.remove()`` after a reset took its hook: must not touch any other hook."""
        handle, _ = data.draw(st.sampled_from(self.stale_handles()), label="stale handle")
        handle.remove()

    @rule(data=st.data())
    def run_with_hooks(self, data: st.DataObject) -> None:
        fwd_hooks, temporary = self.draw_temporary(data)
        with torch.no_grad():
            self.forward(
                lambda: self.bridge.run_with_hooks(self.world.ids, fwd_hooks=fwd_hooks),
                self.expected + temporary,
            )

    @rule(data=st.data())
    def run_with_cache(self, data: st.DataObject) -> None:
        names, points = self.draw_names(data)
        with torch.no_grad():
            result = self.forward(
                lambda: self.bridge.run_with_cache(self.world.ids, names_filter=names),
                self.expected,
            )
        if result is not None:
            _, cache = result
            assert sorted(cache.keys()) == points

    @rule(data=st.data(), run_inside=st.booleans())
    def hooks_block_that_raises(self, data: st.DataObject, run_inside: bool) -> None:
        fwd_hooks, temporary = self.draw_temporary(data)
        with pytest.raises(Boom, match="inside the block"):  # noqa: SIM117
            with self.bridge.hooks(fwd_hooks=fwd_hooks) as bridge:
                self.check_attached(self.expected + temporary)
                if run_inside:
                    with torch.no_grad():
                        self.forward(lambda: bridge(self.world.ids), self.expected + temporary)
                raise Boom("inside the block")

    @rule(including_permanent=st.booleans())
    def reset_hooks(self, including_permanent: bool) -> None:
        self.bridge.reset_hooks(including_permanent=including_permanent)
        self.expected = [a for a in self.expected if a.permanent and not including_permanent]

    def teardown(self) -> None:
        self.bridge.reset_hooks(including_permanent=True)
        self.check_attached([])
        with torch.no_grad():
            assert torch.equal(self.bridge(self.world.ids), self.world.plain)
            assert torch.equal(self.world.model(self.world.ids).logits, self.world.plain)


def test_random_hook_life_cycles_leave_nothing_behind(world: World) -> None:
    HookLifeCycle.world = world
    run_state_machine_as_test(
        HookLifeCycle,
        settings=settings(max_examples=30, stateful_step_count=60, deadline=None),
    )
