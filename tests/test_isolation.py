"""Hook state belongs to a call and to a bridge: threads, two bridges, copies, pickles, compile."""

from __future__ import annotations

import copy
import gc
import pickle
import subprocess
import sys
import threading
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

from bridge_adapters import tiny
from bridge_core import BridgeError, HookPoint, InputError, TransformerBridge


@pytest.fixture
def gpt2() -> tuple[Any, TransformerBridge]:
    model, tokenizer = tiny.tiny_gpt2()
    return model, TransformerBridge.wrap(model, tokenizer=tokenizer)


def zero(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
    return torch.zeros_like(x)


def test_two_threads_see_only_their_own_hooks_and_caches(
    gpt2: tuple[Any, TransformerBridge],
) -> None:
    _, bridge = gpt2
    prompts = {name: torch.randint(3, 500, (1, 6), generator=torch.Generator().manual_seed(s))
               for s, name in enumerate(("a", "b"))}  # fmt: skip
    with torch.no_grad():
        expected = {n: bridge.run_with_cache(ids)[1]["blocks.1.hook_resid_post"]
                    for n, ids in prompts.items()}  # fmt: skip
    fired: dict[str, list[str]] = {"a": [], "b": []}
    problems: list[str] = []
    barrier = threading.Barrier(2)

    def work(name: str) -> None:
        def spy(x: torch.Tensor, hook: HookPoint) -> None:
            fired[name].append(threading.current_thread().name)

        barrier.wait()
        for _ in range(15):
            with torch.no_grad():
                bridge.run_with_hooks(prompts[name], fwd_hooks=[("blocks.0.hook_in", spy)])
                _, cache = bridge.run_with_cache(
                    prompts[name], names_filter="blocks.1.hook_resid_post"
                )
            if not torch.equal(cache["blocks.1.hook_resid_post"], expected[name]):
                problems.append(f"{name} cached another prompt")

    threads = [threading.Thread(target=work, args=(n,), name=n) for n in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert problems == []
    assert fired["a"] == ["a"] * 15 and fired["b"] == ["b"] * 15  # never in the other's forward
    assert not any(p.has_hooks for p in bridge.hook_dict.values())


def test_two_bridges_over_one_model_are_independent(gpt2: tuple[Any, TransformerBridge]) -> None:
    model, first = gpt2
    second = TransformerBridge.wrap(model)
    ids = torch.randint(3, 500, (2, 6))
    with torch.no_grad():
        plain = model(ids).logits
        first.add_perma_hook("blocks.1.hook_resid_pre", lambda x, hook: x * 2)
        ablated = first(ids)
        assert not torch.equal(ablated, plain)
        assert torch.equal(second(ids), plain)  # the other bridge's permanent hook is silent
        second.reset_hooks(including_permanent=True)
        assert torch.equal(first(ids), ablated)  # and untouched by this reset
        halve = [("blocks.0.attn.hook_pattern", lambda p, hook: p * 0.5)]
        with first.hooks(fwd_hooks=halve):
            _, cache = second.run_with_cache(ids, names_filter="blocks.0.attn.hook_pattern")
            both = first(ids)  # the first's pattern edit still fires after the second's cache
        assert not torch.equal(both, ablated)
        _, alone = second.run_with_cache(ids, names_filter="blocks.0.attn.hook_pattern")
        assert torch.equal(cache["pattern", 0], alone["pattern", 0])  # not halved by the first
    first.reset_hooks(including_permanent=True)
    assert model.config._attn_implementation == "sdpa"


def test_a_deepcopy_is_an_independent_bridge_even_taken_while_hooked(
    gpt2: tuple[Any, TransformerBridge],
) -> None:
    _, bridge = gpt2
    ids = torch.randint(3, 500, (2, 6))
    with torch.no_grad():
        plain = bridge(ids)
        bridge.add_perma_hook("blocks.0.hook_resid_post", zero)
        ablated = bridge(ids)
        with bridge.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", lambda p, hook: None)]):
            clone = copy.deepcopy(bridge)  # taken while a pattern hook routes attention
        assert torch.equal(clone(ids), ablated)  # the permanent hook came along
        assert clone.original_model is not bridge.original_model
        clone.reset_hooks(including_permanent=True)
        assert torch.equal(clone(ids), plain)
        assert torch.equal(bridge(ids), ablated)  # the original keeps its own
        _, cache = clone.run_with_cache(ids, names_filter="blocks.1.attn.hook_pattern")
        assert cache["pattern", 1].shape == (2, 4, 6, 6)
    bridge.reset_hooks(including_permanent=True)


def test_a_booted_bridge_pickles_and_refuses_while_hooked(saved_gpt2: Path, tmp_path: Path) -> None:
    bridge = TransformerBridge.boot(saved_gpt2)  # the tokenizer is not loaded yet
    restored = pickle.loads(pickle.dumps(bridge))
    ids = torch.randint(3, 500, (2, 6))
    with torch.no_grad():
        assert torch.equal(restored(ids), bridge(ids))
        assert restored.to_tokens("hello").shape[0] == 1  # its tokenizer loads as the original's
        _, cache = restored.run_with_cache(ids, names_filter="hook_embed")
    assert cache["hook_embed"].shape == (2, 6, 64)
    bridge.add_hook("hook_embed", zero)
    with pytest.raises(BridgeError, match="cannot pickle a bridge while hooks are attached"):
        pickle.dumps(bridge)
    bridge.reset_hooks()


def test_compiled_models_run_hooks_eagerly_and_exactly(gpt2: tuple[Any, TransformerBridge]) -> None:
    _, bridge = gpt2
    ids = torch.randint(3, 500, (2, 6))
    with torch.no_grad():
        eager_logits, eager_cache = bridge.run_with_cache(ids)
        edit = [("blocks.0.attn.hook_pattern", lambda p, hook: p * 0.5)]
        eager_edit = bridge.run_with_hooks(ids, fwd_hooks=edit)
        compiled = torch.compile(TransformerBridge.wrap(bridge.original_model))
        with pytest.warns(RuntimeWarning, match="runs the HF model eagerly"):
            compiled(ids)
        logits, cache = compiled.run_with_cache(ids)
        assert torch.equal(logits, eager_logits) and cache.keys() == eager_cache.keys()
        assert all(torch.equal(cache[k], eager_cache[k]) for k in cache)
        compiled.add_perma_hook("blocks.0.attn.hook_pattern", lambda p, hook: p * 0.5)
        assert torch.equal(compiled(ids), eager_edit)  # never a graph without the hook
        compiled.reset_hooks(including_permanent=True)
        bridge.compile()  # the HF model, in place: plain calls compiled, hooked calls eager
        torch.testing.assert_close(bridge(ids), eager_logits)
        assert torch.equal(bridge.run_with_hooks(ids, fwd_hooks=edit), eager_edit)
        logits, cache = bridge.run_with_cache(ids)
        assert torch.equal(logits, eager_logits) and len(cache) == len(eager_cache)


def test_importing_the_bridge_does_not_load_the_compiler() -> None:
    """Supporting torch.compile costs nothing at import: torch._dynamo takes about a second to
    import, ten times the whole import of bridge_core (transformers loads it with its modeling
    code, not with ``import transformers``)."""
    script = (
        "import sys, torch, transformers\n"
        "from bridge_core import TransformerBridge\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


def test_a_call_that_fails_adds_nothing(gpt2: tuple[Any, TransformerBridge]) -> None:
    _, bridge = gpt2
    with pytest.raises(BridgeError, match="is off"):  # the second point refuses
        bridge.add_hook(["blocks.0.hook_in", "blocks.0.attn.hook_result"], zero)
    refused = [("blocks.0.hook_in", zero), ("blocks.1.attn.hook_result", zero)]
    with pytest.raises(BridgeError, match="is off"), bridge.hooks(fwd_hooks=refused):
        pass
    with pytest.raises(InputError, match="got None"):
        bridge.add_hook(None, zero)  # type: ignore[arg-type]  # on purpose
    with pytest.raises(InputError, match="not callable"):
        bridge.add_hook("blocks.0.hook_in", None)  # type: ignore[arg-type]  # on purpose
    assert not any(p.has_hooks for p in bridge.hook_dict.values())
    assert bridge.attached_points == 0


def test_a_dropped_bridge_is_freed_without_the_cycle_collector(
    gpt2: tuple[Any, TransformerBridge],
) -> None:
    model, _ = gpt2
    bridge = TransformerBridge.wrap(model)
    with bridge.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", zero)]):
        bridge(torch.tensor([[1, 2, 3]]))
    gone = weakref.ref(bridge)
    gc.disable()  # hook points refer to the bridge's Owner, not to the bridge: no cycle
    try:
        del bridge
        assert gone() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("family", ["gpt2", "mixtral"])
def test_a_model_whose_shared_taps_were_hooked_is_freed_once_dropped(family: str) -> None:
    """Norm and attention routes outlive their hooks (to be restored on the next hooked call)
    but never their module: a dropped model goes, with its entries."""
    from bridge_adapters.families import FAMILIES
    from bridge_core.verify import example_inputs

    model, _ = FAMILIES[family]()
    bridge = TransformerBridge.wrap(model)
    with torch.no_grad():
        bridge.run_with_cache(**example_inputs(bridge))  # every point: norms, patterns, experts
    gone = [weakref.ref(module) for module in model.modules()]
    del bridge, model
    gc.collect()
    assert not [ref() for ref in gone if ref() is not None]


def test_a_pattern_hooked_again_after_its_kernel_changed_runs_the_new_kernel(
    gpt2: tuple[Any, TransformerBridge],
) -> None:
    """The second hooked call restores the attention's route: it must look the kernel up
    again. After a switch to eager, the hook sees the eager kernel's own pattern, and the
    output is the eager model's, bit for bit."""
    model, bridge = gpt2
    ids = torch.tensor([[5, 9, 2, 7, 1, 8]])
    name = "blocks.1.attn.hook_pattern"
    with torch.no_grad():
        _, before = bridge.run_with_cache(ids, names_filter=name)  # sdpa: beside the kernel
        model.set_attn_implementation("eager")
        try:
            output, cache = bridge.run_with_cache(ids, names_filter=name)
            hf = model(ids, output_attentions=True)
        finally:
            model.set_attn_implementation("sdpa")
    assert torch.equal(output, hf.logits)
    assert torch.equal(cache[name], hf.attentions[1])
    torch.testing.assert_close(before[name], cache[name])


@pytest.mark.parametrize(
    ("family", "name"),
    [
        ("gpt2", "blocks.0.attn.hook_pattern"),
        ("gpt2", "blocks.0.ln1.hook_scale"),
        ("mixtral", "blocks.0.mlp.hook_router_logits"),
        ("mixtral", "blocks.0.mlp.experts.1.hook_pre"),
        ("falcon", "blocks.0.attn.hook_pattern"),
    ],
)
def test_a_shared_tap_serves_two_bridges_over_one_model(family: str, name: str) -> None:
    from bridge_adapters.families import FAMILIES
    from bridge_core.verify import example_inputs

    model, _ = FAMILIES[family]()
    first, second = TransformerBridge.wrap(model), TransformerBridge.wrap(model)
    fired = {"first": 0, "second": 0}

    def count(which: str) -> Any:
        return lambda x, hook: fired.__setitem__(which, fired[which] + 1)

    first.add_hook(name, count("first"))
    handles = second.add_hook(name, count("second"))
    inputs = example_inputs(first)
    with torch.no_grad():
        first(**inputs)
        second(**inputs)
        assert fired == {"first": 1, "second": 1}  # each only in its own bridge's forward
        for handle in handles:
            handle.remove()
        first(**inputs)
    assert fired == {"first": 2, "second": 1}  # the second's removal left the first's hook
    first.reset_hooks()


def test_a_copy_taken_while_experts_are_routed_runs_its_own_kernel() -> None:
    from bridge_adapters.families import FAMILIES
    from bridge_core.verify import example_inputs

    model, _ = FAMILIES["mixtral"]()
    bridge = TransformerBridge.wrap(model)
    inputs = example_inputs(bridge)
    with torch.no_grad():
        plain = bridge(**inputs)
        with bridge.hooks(fwd_hooks=[("blocks.0.mlp.experts.1.hook_pre", lambda x, hook: None)]):
            clone = copy.deepcopy(bridge)
        assert clone.original_model.config._experts_implementation == "grouped_mm"
        assert torch.equal(clone(**inputs), plain)
        _, cache = clone.run_with_cache(**inputs, names_filter="blocks.0.mlp.experts.1.hook_pre")
    assert cache["blocks.0.mlp.experts.1.hook_pre"].shape[-1] == 48
    assert model.config._experts_implementation == "grouped_mm"
