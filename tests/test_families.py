"""Every built-in text adapter on its tiny model: exact, exact while observed, and verified."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bridge_adapters.families import FAMILIES
from bridge_core import TransformerBridge
from bridge_core.support import FamilyRecord, Records, builder_path, environment
from bridge_core.verify import VerifyReport, example_inputs

REPORTS: dict[str, VerifyReport] = {}
"""Each family's verify report, for the check of the record (see the end of this file)."""


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> tuple[Any, TransformerBridge]:
    """(HF model, its bridge, chosen by the registry) for each family."""
    model, tokenizer = FAMILIES[request.param]()
    return model, TransformerBridge.wrap(model, tokenizer=tokenizer)


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


def test_outputs_equal_hf_with_no_hooks_and_with_everything_cached(
    family: tuple[Any, TransformerBridge],
) -> None:
    model, bridge = family
    inputs = example_inputs(bridge)
    with torch.no_grad():
        expected = _logits(model(**inputs))
        assert torch.equal(bridge(**inputs), expected)
        logits, cache = bridge.run_with_cache(**inputs)
    assert torch.equal(logits, expected)
    assert len(cache) == len([p for p in bridge.hook_dict.values() if p.enabled])


def test_run_with_cache_works_under_inference_mode(family: tuple[Any, TransformerBridge]) -> None:
    model, bridge = family
    inputs = example_inputs(bridge)
    first = next(n for n in bridge.hook_dict if n.endswith(".attn.hook_pattern"))  # blocks.0
    with torch.inference_mode():
        expected = _logits(model(**inputs))
        logits, cache = bridge.run_with_cache(**inputs)
        pattern = bridge.run_with_hooks(**inputs, fwd_hooks=[(first, lambda p, hook: p * 0.5)])
    assert torch.equal(logits, expected)
    assert cache[first].is_inference()
    assert not torch.equal(pattern, expected)  # an in-place-free edit is still seen


def test_every_hook_point_verifies(
    family: tuple[Any, TransformerBridge], request: pytest.FixtureRequest
) -> None:
    _, bridge = family
    report = REPORTS[_family_name(request)] = bridge.verify()
    assert report.ok, report.summary()
    checks = {r.check for r in report.results if r.ok}
    expected = {"fires", "shape", "observe", "identity", "causal", "heads", "pattern"}
    assert expected - set(bridge.adapter.verify.skip) <= checks  # OLMoE: heads, T5: pattern
    empty = [r.hook for r in report.results if r.check == "causal" and r.ok is None]
    assert not empty, f"no value to edit on verify's inputs (an expert without tokens?): {empty}"


# -- the verify record: what transformer-bridge architectures and docs/architectures.md say --


def _family_name(request: pytest.FixtureRequest) -> str:
    return str(request.node.callspec.params["family"])


def test_the_recorded_verify_outcome_is_what_verify_finds(
    family: tuple[Any, TransformerBridge], request: pytest.FixtureRequest
) -> None:
    from bridge_adapters.matrix import COMMAND, RECORD

    name = _family_name(request)
    records = Records.read(RECORD)
    if records.environment != environment():  # e.g. `make compat`: other versions
        pytest.skip(f"the record was made with {records.environment}, not {environment()}")
    _, bridge = family
    report = REPORTS.get(name) or bridge.verify()
    found = FamilyRecord.of(builder_path(FAMILIES[name]), bridge, report)
    assert records.families.get(name) == found, (
        f"the verify record of family {name!r} ({RECORD.name}) is not what verify finds now: "
        f"run `{COMMAND} {name}` (it also regenerates docs/architectures.md)"
    )
