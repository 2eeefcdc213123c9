"""verify catches what an adapter gets wrong, naming the check and the hook point."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from bridge_adapters import tiny
from bridge_adapters.families import tiny_gpt_neox
from bridge_core import AdapterSpec, GeneralizedComponent, TransformerBridge, get_registry, hookimpl
from bridge_core.cli import main
from bridge_core.components import MLPBridge
from bridge_core.hooks import Handle, Run
from bridge_core.verify import shape_mismatch


def neox_spec(**attn_options: Any) -> AdapterSpec:
    """The built-in GPT-NeoX spec with other attention options."""
    data = get_registry().adapter("gpt_neox").model_dump()
    data["name"] = "neox-under-test"
    data["components"]["blocks"]["submodules"]["attn"]["options"].update(attn_options)
    return AdapterSpec.model_validate(data)


def test_a_qkv_split_of_a_per_head_layout_fails_head_locality() -> None:
    model, _ = tiny_gpt_neox()
    wrong = TransformerBridge.wrap(model, adapter=neox_spec(layout="split"))
    with torch.no_grad():  # the outputs are exact all the same: only verify can tell
        assert torch.equal(
            wrong(torch.tensor([[5, 6, 7]])), model(torch.tensor([[5, 6, 7]])).logits
        )
    report = wrong.verify()
    assert not report.ok
    failed = {(r.check, r.hook) for r in report.failures()}
    assert ("heads", "blocks.0.attn.hook_q") in failed
    assert ("heads", "blocks.1.attn.hook_v") in failed
    assert {check for check, _ in failed} == {"heads"}
    assert "FAILED: heads blocks.0.attn.hook_q: an edit of head 1 moved z heads" in str(report)
    assert TransformerBridge.wrap(model).verify().ok  # the built-in per-head layout


@pytest.fixture
def lossy_kind(fresh_registry: None) -> Iterator[None]:
    """A plugin kind whose tap rounds the MLP output through float16 whenever it is hooked."""

    class RoundingTap:
        def __init__(self, module: nn.Module) -> None:
            self.module = module

        def attach(self, run: Run) -> Handle:
            def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
                return run(output).half().float()  # a new, slightly different tensor

            return self.module.register_forward_hook(hook)

    class LossyMLP(MLPBridge):
        def bind(self, module: nn.Module) -> None:
            super().bind(module)
            self.hook_out.bind(RoundingTap(module))

    class Plugin:
        @hookimpl
        def register_components(self) -> Mapping[str, type[GeneralizedComponent]]:
            return {"lossy_mlp": LossyMLP}

    get_registry().register(Plugin(), name="lossy")
    yield


def test_an_adapter_whose_observation_changes_outputs_fails_observe(lossy_kind: None) -> None:
    data = get_registry().adapter("gpt2").model_dump()
    data["name"] = "gpt2-lossy"
    data["components"]["blocks"]["submodules"]["mlp"]["kind"] = "lossy_mlp"
    model, tokenizer = tiny.tiny_gpt2()
    bridge = TransformerBridge.wrap(model, tokenizer, adapter=AdapterSpec.model_validate(data))
    report = bridge.verify()
    failed = {(r.check, r.hook) for r in report.failures()}
    assert ("observe", "blocks.0.mlp.hook_out") in failed
    assert ("observe", "blocks.1.mlp.hook_out") in failed
    assert ("observe", "") in failed and ("identity", "blocks.0.mlp.hook_out") in failed
    culprits = {hook for check, hook in failed if check in ("observe", "identity") and hook}
    assert culprits == {"blocks.0.mlp.hook_out", "blocks.1.mlp.hook_out"}


def test_a_hook_declared_unreachable_that_reaches_the_outputs_fails() -> None:
    data = get_registry().adapter("gpt2").model_dump()
    data.update(name="gpt2-dead-end", verify={"unreachable": ["blocks.1.hook_mlp_out"]})
    model, _ = tiny.tiny_gpt2()
    report = TransformerBridge.wrap(model, adapter=AdapterSpec.model_validate(data)).verify()
    [failure] = report.failures()
    assert (failure.check, failure.hook) == ("causal", "blocks.1.mlp.hook_out")
    assert "declared unreachable by its adapter, but an edit changed the outputs" in failure.detail


def test_the_cli_exits_1_naming_the_check_and_hook(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, tokenizer = tiny_gpt_neox()
    directory = tiny.save_pretrained(model, tokenizer, tmp_path / "neox")
    spec = tmp_path / "wrong.toml"
    spec.write_text(neox_spec(layout="split").to_toml())
    assert main(["verify", str(directory), "--plain"]) == 0
    out = capsys.readouterr().out
    assert "blocks.0.attn.hook_q" in out and out.strip().splitlines()[-1].endswith("checks passed")
    assert main(["verify", str(directory), "--adapter", str(spec), "--plain"]) == 1
    captured = capsys.readouterr()
    assert "FAIL heads blocks.0.attn.hook_q: an edit of head 1 moved z heads [0]" in captured.out
    assert "checks FAILED: heads blocks.0.attn.hook_q" in captured.err
    assert main(["verify", str(directory), "--json"]) == 0
    assert '"ok": true' in capsys.readouterr().out


@pytest.mark.parametrize(
    ("shape", "documented", "problem"),
    [
        ((2, 5, 4, 16), ("batch", "pos", "n_heads", "d_head"), ""),
        ((1, 5, 64), ("batch|1", "pos", "d_model"), ""),
        ((2, 4, 5, 5), ("batch", "n_heads", "pos", "kpos"), ""),
        ((2, 5, 2, 16), ("batch", "pos", "n_heads", "d_head"), "is not"),
        ((2, 5, 64), ("batch", "pos"), "has 3 dimensions"),
        ((7, 9, 7), ("images", "tokens", "images"), ""),
        ((7, 9, 8), ("images", "tokens", "images"), "is not"),
        ((2, 5, 32), ("batch", "pos", "n_heads * 8"), ""),
    ],
)
def test_shapes_bind_free_symbols_once(
    shape: tuple[int, ...], documented: tuple[str, ...], problem: str
) -> None:
    dims: dict[str, int | None] = {"batch": 2, "pos": 5, "n_heads": 4, "d_head": 16, "d_model": 64}
    found = shape_mismatch(shape, documented, dims)
    assert (problem in found) if problem else found == ""
