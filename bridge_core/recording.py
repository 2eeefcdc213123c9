"""Recording activations for a cache: every call kept, and nothing changed after it is kept.

A `Recorder` hands out the saving hook of a call's hook points. A saved tensor is the live
activation (detached), not a copy, unless the model is known to change that tensor in place
later in the forward (HF adds to residuals in place in some models: Falcon's ``mlp_output +=
attention_output``), in which case it is copied when saved. What is known comes from the
tensors' version counters: the first time a point is cached, its tensor is copied and the
original's version is compared after the forward; the answer is kept on the hook point
(`HookPoint.copy_on_cache`). Inference tensors have no version counter and are always copied.
A point found changed although it was thought safe is an error, never a silently wrong cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from bridge_core.errors import BridgeError, InputError
from bridge_core.hooks import HookFn, HookPoint

# a saved call: (the value kept, the live tensor whose version is checked or None, its
# version when saved, whether the value is a copy); a tuple, as hundreds are made per forward
_Saved = tuple[torch.Tensor, torch.Tensor | None, int, bool]


@dataclass
class Recorder:
    """Saves activations of the points it hands hooks out for, and assembles a cache's data.

    Attributes:
        device: where to put saved tensors (None: where they are).
        remove_batch_dim: drop the batch dimension (batch of one).
    """

    device: torch.device | str | None = None
    remove_batch_dim: bool = False
    _saved: dict[str, list[_Saved]] = field(default_factory=dict)
    _points: dict[str, HookPoint] = field(default_factory=dict)

    def saver(self, points: Sequence[HookPoint], grad: bool = False) -> HookFn:
        """The hook that saves what each of `points` sees (with `grad`, its gradient), kept
        under the point's name (``name`` or ``name_grad``), in the order of `points`.

        One function for all of them: a hook is called with its point, whose name finds
        the point's calls.
        """
        suffix = "_grad" if grad else ""
        by_point: dict[str, list[_Saved]] = {point.name: [] for point in points}
        self._points.update({point.name + suffix: point for point in points})
        self._saved.update({name + suffix: calls for name, calls in by_point.items()})
        if self.device is not None or self.remove_batch_dim:

            def save(tensor: torch.Tensor, hook: HookPoint) -> None:
                by_point[hook.name].append(self._save(tensor, hook))

            return save

        def save_here(tensor: torch.Tensor, hook: HookPoint) -> None:
            value = tensor.detach() if tensor.requires_grad else tensor
            if hook.copy_on_cache is False and not value.is_inference():
                saved: _Saved = (value, value, value._version, False)  # the common case
            else:
                saved = _kept(value, hook)
            by_point[hook.name].append(saved)

        return save_here

    def _save(self, tensor: torch.Tensor, point: HookPoint) -> _Saved:
        value = tensor.detach() if tensor.requires_grad else tensor
        if self.remove_batch_dim:
            if value.shape[0] != 1:
                raise InputError(
                    f"remove_batch_dim=True needs a batch of one; {point.name!r} has batch "
                    f"size {value.shape[0]}"
                )
            value = value[0]
        if self.device is not None and value.device != torch.device(self.device):
            return value.to(self.device), None, 0, True  # a copy already
        return _kept(value, point)

    def finish(self) -> tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
        """(one tensor per key, every call of keys that fired more than once).

        A point that fired several times is kept as its adapter declares (``collect``):
        stacked on a new first dimension, concatenated on the first, or as a list only.

        Raises:
            BridgeError: the model changed a saved tensor in place that was not copied.
        """
        tensors: dict[str, torch.Tensor] = {}
        calls: dict[str, list[torch.Tensor]] = {}
        for key, saved in self._saved.items():
            if not saved:
                continue
            point = self._points[key]
            if len(saved) == 1:
                value, original, version, _ = saved[0]
                # nothing to learn of a live tensor known to stay as it is, and left so
                if not (point.copy_on_cache is False and original is not None) or (
                    original._version != version
                ):
                    self._learn(key, point, saved)
                tensors[key] = value
                continue
            self._learn(key, point, saved)
            values = calls[key] = [s[0] for s in saved]
            combined = _combine(values, point.collect)
            if combined is not None:
                tensors[key] = combined
        return tensors, calls

    def _learn(self, key: str, point: HookPoint, saved: list[_Saved]) -> None:
        known = point.copy_on_cache
        changed = checked = False
        for _, original, version, copied in saved:
            if original is None:
                continue
            checked = True
            if original._version != version:
                if not copied:
                    point.copy_on_cache = True
                    raise BridgeError(
                        f"the model changed {key!r} in place after it was cached, so the "
                        "cached value is not the activation; the bridge copies it from now "
                        "on: run again"
                    )
                changed = True
        if checked and known is None:
            point.copy_on_cache = changed


def _kept(value: torch.Tensor, point: HookPoint) -> _Saved:
    """How `value` (of `point`) is kept: live while the model is known to leave it as it is,
    else copied (and its version checked, to learn whether copying was needed)."""
    if value.is_inference():
        return value.clone(), None, 0, True  # no version counter: always a copy
    if point.copy_on_cache is False:
        return value, value, value._version, False
    return value.clone(), value, value._version, True


def _combine(values: list[torch.Tensor], collect: str) -> torch.Tensor | None:
    """The calls as one tensor, or None (kept as a list) where their shapes do not allow it."""
    if collect == "stack" and all(v.shape == values[0].shape for v in values):
        return torch.stack(values)
    if collect == "cat" and all(v.shape[1:] == values[0].shape[1:] for v in values):
        return torch.cat(values)
    return None


def check_backward(incl_bwd: bool, metric: Any, return_type: Any) -> None:
    """Refuse a backward pass that cannot be run as asked (before the forward runs)."""
    if metric is not None and not incl_bwd:
        raise InputError("metric= is what incl_bwd=True differentiates: pass incl_bwd=True too")
    if metric is not None and not callable(metric):
        raise InputError(
            f"metric must be a function output -> scalar (got {type(metric).__name__})"
        )
    if incl_bwd and torch.is_inference_mode_enabled():
        raise InputError(
            "incl_bwd=True needs gradients, which torch.inference_mode() forbids (tensors made "
            "in it cannot enter autograd). Accepted: run_with_cache(incl_bwd=True) outside "
            "inference_mode (under torch.no_grad() it works: it enables gradients for the call)"
        )
    if incl_bwd and metric is None and return_type not in ("loss", "both"):
        raise InputError(
            "incl_bwd=True differentiates the loss (pass return_type='loss') or a metric "
            "(pass metric=fn, fn(output) -> scalar)"
        )


def run_backward(output: Any, metric: Callable[[Any], torch.Tensor] | None) -> None:
    """Backpropagate `metric(output)`, or the loss in `output` (the second of (logits, loss))."""
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
