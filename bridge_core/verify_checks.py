"""The structural checks of `verify`: head locality, recomputed patterns, residual algebra.

These need more than "does an edit reach the outputs": they compare activations with what
the architecture says they must be. A fused qkv split the wrong way still gives exact
outputs, but an edit of "head 1" of q then moves another head's z; a wrong per-head view
gives a pattern that q and k do not produce; a wrong alias gives a residual stream that
does not add up.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from bridge_core.components.base import GeneralizedComponent
from bridge_core.hooks import HookPoint

if TYPE_CHECKING:
    from bridge_core.bridgelike import BridgeLike
    from bridge_core.cache import ActivationCache


Hook = tuple[str, Callable[..., Any]]


@dataclass
class Result:
    """One check of one hook point (or of the whole model, with ``hook = ""``)."""

    check: str
    hook: str
    ok: bool | None  # None: skipped
    detail: str = ""

    @property
    def status(self) -> str:
        """``ok``, ``FAIL`` or ``skipped``."""
        return "skipped" if self.ok is None else "ok" if self.ok else "FAIL"


class RunLike(Protocol):
    """What the checks need of a verification run."""

    inputs: dict[str, Any]
    dims: dict[str, dict[str, int | None]]
    generator: torch.Generator

    def forward(self, hooks: list[Hook] | None = None) -> torch.Tensor:
        """Outputs of one forward with `hooks`."""


def _result(check: str, hook: str, ok: bool | None, detail: str) -> Result:
    return Result(check, hook, ok, detail)


# -- head locality ---------------------------------------------------------------------------


def head_locality(run: RunLike, attentions: list[GeneralizedComponent]) -> Iterator[Result]:
    """An edit of head h of q (k, v) moves z only at head h (the heads sharing kv head h).

    Heads are the second-to-last dimension (``[..., head, d_head]``), with or without a batch
    dimension in front (a vision tower over all images' patches at once has none).
    """
    for attn in attentions:
        z_name = _point(attn, "hook_z").name
        base = _z_after(run, z_name, [])
        dims = run.dims[attn.name]
        n_heads = int(base.shape[-2])
        n_kv = dims.get("n_kv_heads") or n_heads
        for proj in ("q", "k", "v"):
            point = _point(attn, f"hook_{proj}")
            heads = n_heads if proj == "q" else int(n_kv)
            problems = []
            tested = sorted({0, 1, heads - 1} & set(range(heads)))
            for head in tested:
                edit = _head_edit(head, run.generator)
                z = _z_after(run, z_name, [(point.name, edit)])
                moved = [
                    j for j in range(n_heads) if not torch.equal(z[..., j, :], base[..., j, :])
                ]
                group = n_heads // heads
                expected = list(range(head * group, (head + 1) * group))
                if moved != expected:
                    problems.append(f"an edit of head {head} moved z heads {moved}, not {expected}")
            ok = not problems
            detail = f"edits of heads {tested} move only their own z heads" if ok else problems[0]
            yield _result("heads", point.name, ok, detail)


class _Stop(Exception):
    pass


def _z_after(run: RunLike, z_name: str, hooks: list[Hook]) -> torch.Tensor:
    """z of one attention, from a forward stopped right after it (with `hooks`)."""
    seen: list[torch.Tensor] = []

    def grab(z: torch.Tensor, hook: HookPoint) -> None:
        seen.append(z.detach().clone())
        raise _Stop

    with contextlib.suppress(_Stop):
        run.forward([*hooks, (z_name, grab)])
    if not seen:
        raise RuntimeError(f"{z_name} did not fire")
    return seen[0]


def _head_edit(head: int, generator: torch.Generator) -> Callable[..., torch.Tensor]:
    def edit(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        x = x.clone()
        noise = torch.randn(x[..., head, :].shape, generator=generator).to(x.dtype).to(x.device)
        x[..., head, :] += noise * (x.float().std().clamp(min=1e-2) + 1).to(x.dtype)
        return x

    return edit


def _point(component: GeneralizedComponent, attr: str) -> HookPoint:
    point = getattr(component, attr)
    assert isinstance(point, HookPoint)
    return point


# -- patterns ----------------------------------------------------------------------------------


def recomputed_patterns(
    run: RunLike, cache: ActivationCache, attentions: list[GeneralizedComponent]
) -> Iterator[Result]:
    """softmax(q kᵀ * scale + mask) from the q and k the kernel saw equals ``hook_pattern``.

    The mask is causal, within the module's ``sliding_window`` where it has one, with the
    inputs' padding; scores are soft-capped where the config says ``attn_logit_softcapping``.
    A kernel that runs several times per forward (once per image) is checked call by call.
    """
    for attn in attentions:
        pattern_point = _point(attn, "hook_pattern")
        if not pattern_point.enabled or pattern_point._tap is None:
            continue
        if "pattern" in attn.skipped_checks():
            yield _result("pattern", pattern_point.name, None, attn.skipped_checks()["pattern"])
            continue
        rotated = _point(attn, "hook_rot_q")._tap is not None
        q_name = _point(attn, "hook_rot_q" if rotated else "hook_q").name
        k_name = _point(attn, "hook_rot_k" if rotated else "hook_k").name
        yield _compare_patterns(run, cache, attn, pattern_point.name, q_name, k_name)


def _compare_patterns(
    run: RunLike,
    cache: ActivationCache,
    attn: GeneralizedComponent,
    name: str,
    q_name: str,
    k_name: str,
) -> Result:
    calls = [cache.calls(n) for n in (q_name, k_name, name)]
    if len({len(c) for c in calls}) != 1:
        names = (q_name, k_name, name)
        counts = ", ".join(f"{n} {len(c)}" for n, c in zip(names, calls, strict=True))
        return _result("pattern", name, False, f"the calls do not pair up ({counts})")
    worst: float | str = 0.0
    for q, k, got in zip(*calls, strict=True):
        try:
            expected = _pattern_from(attn, q, k, run.inputs)
        except Exception as exc:
            return _result("pattern", name, False, f"cannot recompute: {exc}")
        got = got.float()
        if got.shape != expected.shape:
            worst = f"- (shapes {list(got.shape)} and {list(expected.shape)})"
            break
        if not torch.allclose(got, expected, atol=1e-4, rtol=1e-3):
            worst = max(float(worst), (got - expected).abs().max().item())
    if worst == 0.0:
        each = f" (each of its {len(calls[2])} calls)" if len(calls[2]) > 1 else ""
        detail = f"equals softmax({q_name.rsplit('.', 1)[-1]} k^T * scale + mask){each}"
        return _result("pattern", name, True, detail)
    detail = (
        f"differs from the pattern recomputed from {q_name} and {k_name} "
        f"(max error {worst}): q, k or the pattern are not what the kernel used"
    )
    return _result("pattern", name, False, detail)


def _pattern_from(
    attn: GeneralizedComponent, q: torch.Tensor, k: torch.Tensor, inputs: dict[str, Any]
) -> torch.Tensor:
    from bridge_core.attention import additive_mask

    module = attn.original_component
    assert module is not None
    choose = getattr(attn, "kernel", None)  # the attention kinds' kernel submodule
    kernel: torch.nn.Module = choose(module) if callable(choose) else module
    batched = q.dim() == 4  # else one call of a kernel run per sequence: [pos, head, d]
    if not batched:
        q, k = q.unsqueeze(0), k.unsqueeze(0)
    q, k = q.transpose(1, 2).float(), k.transpose(1, 2).float()  # [batch, head, pos, d]
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = getattr(kernel, "scaling", None) or q.shape[-1] ** -0.5
    scores = q @ k.transpose(-1, -2) * scale
    softcap = getattr(getattr(kernel, "config", None), "attn_logit_softcapping", None)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    mask = additive_mask(kernel, None, scores, None)
    if mask is not None:
        scores = scores + mask
    window = getattr(kernel, "sliding_window", None)  # Mistral, Gemma-2/3 local layers
    if isinstance(window, int) and not isinstance(window, bool):
        q_pos = torch.arange(scores.shape[-2]) + scores.shape[-1] - scores.shape[-2]
        too_far = q_pos[:, None] - torch.arange(scores.shape[-1])[None, :] >= window
        scores = scores.masked_fill(too_far.to(scores.device), torch.finfo(scores.dtype).min)
    padding = inputs.get("attention_mask")
    if batched and isinstance(padding, torch.Tensor) and padding.shape[-1] == scores.shape[-1]:
        keep = padding.bool()[:, None, None, :]
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    pattern = torch.softmax(scores, dim=-1)
    return pattern if batched else pattern[0]


# -- residual stream ---------------------------------------------------------------------------

_LAYER = re.compile(r"^(?P<stack>.+)\.(?P<i>\d+)\.hook_resid_pre$")


def residual_algebra(bridge: BridgeLike, cache: ActivationCache) -> Iterator[Result]:
    """Block outputs add up to the residual stream, and `decompose_resid` sums to it."""
    names = set(bridge.hook_names())
    stacks: dict[str, int] = {}
    for name in names:
        match = _LAYER.match(name)
        if match:
            stack, i = match["stack"], int(match["i"])
            stacks[stack] = max(stacks.get(stack, 0), i + 1)
    for stack, n_layers in sorted(stacks.items()):
        layout = _layout(bridge, stack)
        blocks = [_block(cache, names, f"{stack}.{i}", layout) for i in range(n_layers)]
        yield from blocks
        checked = all(r.ok is not None for r in blocks)
        if _is_blocks(bridge, stack) and layout != "post_norm" and checked:
            yield from _decomposition(cache, n_layers, stack)


def _is_blocks(bridge: BridgeLike, stack: str) -> bool:
    """Whether `stack` is a list of the ``block`` kind (the text model's, an encoder's or a
    decoder's), not, say, a vision tower's layers."""
    from bridge_core.components.standard import BlockBridge

    return isinstance(bridge.get_submodule(f"{stack}.0"), BlockBridge)


def _layout(bridge: BridgeLike, stack: str) -> str:
    """The config's block layout for stacks of blocks; other stacks are pre-norm."""
    return bridge.cfg.block_layout if _is_blocks(bridge, stack) else "pre_norm"


def _block(cache: ActivationCache, names: set[str], prefix: str, layout: str) -> Result:
    def get(name: str) -> torch.Tensor | None:
        full = f"{prefix}.{name}"
        if full not in names or full not in cache or len(cache.calls(full)) != 1:
            return None  # absent, or a point that fires more than once
        return cache[full].float()

    pre, mid, post = get("hook_resid_pre"), get("hook_resid_mid"), get("hook_resid_post")
    attn, mlp = get("hook_attn_out"), get("hook_mlp_out")
    hook = f"{prefix}.hook_resid_post"
    if pre is None or post is None or attn is None or mlp is None:
        return _result("residual", hook, None, "no attn_out / mlp_out aliases to add up")
    if layout == "parallel" or (layout == "pre_norm" and mid is None):
        equations = [("resid_post = resid_pre + attn_out + mlp_out", post, pre + attn + mlp)]
    else:
        equations = _chain(get, layout)
    for text, left, right in equations:
        if not _close(left, right):
            error = (left - right).abs().max().item()
            return _result("residual", hook, False, f"{text} does not hold (max error {error:.3g})")
    return _result("residual", hook, True, "; ".join(text for text, _, _ in equations))


Equation = tuple[str, torch.Tensor, torch.Tensor]


def _chain(get: Callable[[str], torch.Tensor | None], layout: str) -> list[Equation]:
    """Each stream of a block is the one before plus a sublayer's output: resid_mid after
    attention, resid_mid_cross after cross-attention (a decoder's), resid_post after the MLP.
    Post-norm (TransformerLens's names), a sublayer after the first reads the previous stream
    through the norm ln{k} that follows it."""
    sublayers = [("resid_mid", "attn_out")]
    if get("hook_cross_attn_out") is not None and get("hook_resid_mid_cross") is not None:
        sublayers.append(("resid_mid_cross", "cross_attn_out"))
    sublayers.append(("resid_post", "mlp_out"))
    equations: list[Equation] = []
    before = "resid_pre"
    for k, (stream, output) in enumerate(sublayers):
        left, added, previous = get(f"hook_{stream}"), get(f"hook_{output}"), get(f"hook_{before}")
        if layout == "post_norm" and k > 0:
            previous, before = get(f"ln{k}.hook_out"), f"ln{k}({before})"
        if left is not None and added is not None and previous is not None:
            equations.append((f"{stream} = {before} + {output}", left, previous + added))
        before = stream
    return equations


def _decomposition(cache: ActivationCache, n_layers: int, stack: str) -> Iterator[Result]:
    last = f"{stack}.{n_layers - 1}.hook_resid_post"
    for layer in range(n_layers + 1):
        hook = f"{stack}.{layer}.hook_resid_pre" if layer < n_layers else last
        if stack == "blocks" and layer == n_layers:
            hook = "ln_final.hook_in"
        try:
            target = cache[hook if layer < n_layers else last]
            parts = cache.decompose_resid(layer=layer, stack=stack)
        except Exception as exc:
            yield _result("residual", hook, False, f"decompose_resid raised {exc}")
            continue
        total = parts.sum(0) if isinstance(parts, torch.Tensor) else parts[0].sum(0)
        ok = _close(total.float(), target.float())
        detail = "decompose_resid sums to the residual stream at every position"
        if not ok:
            bad = (total.float() - target.float()).abs().amax(-1)
            positions = sorted({int(p) for p in (bad > _tolerance(target)).nonzero()[:, -1]})
            shown = positions if len(positions) <= 8 else [*positions[:8], "..."]
            detail = (
                f"decompose_resid(layer={layer}) does not sum to it at {len(positions)} "
                f"positions {shown}"
            )
        yield _result("residual", f"{hook} (decompose_resid)", ok, detail)


def _tolerance(x: torch.Tensor) -> float:
    return 1e-5 * max(float(x.float().abs().max()), 1.0)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-4, atol=_tolerance(a)))
