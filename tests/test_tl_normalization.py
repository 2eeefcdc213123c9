"""hook_scale / hook_normalized on every built-in family: the norm's output recomputed from
them is the norm's own output, so an edit of them is what the norm would compute from it."""

from __future__ import annotations

import pytest
import torch

from bridge_adapters.families import FAMILIES
from bridge_core import HookPoint, TransformerBridge
from bridge_core.normalization import norm_math
from bridge_core.verify import example_inputs


def _norms(bridge: TransformerBridge) -> list[str]:
    return [
        n.removesuffix(".hook_normalized")
        for n in bridge.hook_dict
        if n.endswith("hook_normalized")
    ]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_norm_outputs_recompute_from_the_normalized_input(family: str) -> None:
    model, tokenizer = FAMILIES[family]()
    bridge = TransformerBridge.wrap(model, tokenizer=tokenizer)
    inputs = example_inputs(bridge)  # an encoder-decoder's decoder inputs too
    norms = _norms(bridge)
    assert norms, "every built-in family has norms with hook_normalized"
    name = norms[0]
    norm = bridge.component(name)
    with torch.no_grad():
        plain = bridge(**inputs)
        _, cache = bridge.run_with_cache(**inputs, names_filter=lambda n: n.startswith(name + "."))
        module = norm.original_component
        math = norm_math(module, norm.options, bridge.cfg)
        normalized, out = cache[f"{name}.hook_normalized"], cache[f"{name}.hook_out"]
        if normalized.shape == out.shape and normalized.dim() == 3:  # not a per-head view
            recomputed = math.affine(module, normalized, out)
            assert torch.allclose(recomputed, out, atol=1e-5), name

        def same(tensor: torch.Tensor, hook: HookPoint) -> torch.Tensor:
            return tensor.clone()

        hooks = [(f"{name}.hook_scale", same), (f"{name}.hook_normalized", same)]
        assert torch.equal(
            bridge.run_with_hooks(**inputs, fwd_hooks=hooks), plain
        )  # identity edits

        def double(tensor: torch.Tensor, hook: HookPoint) -> torch.Tensor:
            return tensor * 2

        edited = bridge.run_with_hooks(**inputs, fwd_hooks=[(f"{name}.hook_scale", double)])
    assert not torch.equal(edited, plain)
