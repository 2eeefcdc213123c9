"""Hook management on the bridge, with TransformerLens's ``HookedRootModule`` API.

`HookedRoot` is a mixin of `TransformerBridge`: adding and removing hooks (`add_hook`,
`hooks`, `run_with_hooks`, `reset_hooks` ...), introspection (`hook_points`, `mod_dict`,
`list_hooks`, `get_hook_point`), TransformerLens's caching helpers (`get_caching_hooks`,
`add_caching_hooks`, `cache_all`, `cache_some`) and the ``set_use_*`` switches. Every name
argument takes canonical names and aliases; hooks are removed through their handles, so a
temporary hook goes when its call ends, also when the forward or a hook raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from bridge_core import slices
from bridge_core.errors import BridgeError, HookNameError, InputError, did_you_mean
from bridge_core.hooks import Hook, HookFn, HookHandle, HookPoint, discard_all, insert_all
from bridge_core.hooks import scope as hook_scope
from bridge_core.naming import HookNames, NamesFilter

if TYPE_CHECKING:
    from bridge_core.config import TransformerBridgeConfig

HookSpec = tuple[str | Callable[[str], bool], HookFn]
Direction = Literal["fwd", "bwd", "both"]
OneWay = Literal["fwd", "bwd"]
_HEAD_DIM_POINTS = (
    "hook_q",
    "hook_k",
    "hook_v",
    "hook_z",
    "hook_result",
    "hook_rot_q",
    "hook_rot_k",
)


class HookedRoot(nn.Module):
    """Hooks on a bridge's hook points, with the names and semantics of TransformerLens."""

    _names: HookNames
    cfg: TransformerBridgeConfig
    context_level: int = 0
    """How many `hooks()` blocks are open (hooks added in one carry its level)."""

    # -- introspection -------------------------------------------------------------------

    def hook_points(self) -> list[HookPoint]:
        """Every hook point, once, in forward order."""
        return list(self._names.points.values())

    def get_hook_point(self, name: str) -> HookPoint:
        """The hook point named `name` (canonical or alias).

        Raises:
            HookNameError: an unknown name, with a did-you-mean.
        """
        return self._names.points[self._names.canonical(name)]

    @property
    def mod_dict(self) -> dict[str, nn.Module]:
        """Every submodule by dotted name (components, hook points, the HF modules), and the
        hook points under their aliases too (TransformerLens's ``mod_dict``)."""
        modules = {name: module for name, module in self.named_modules() if name}
        modules.update({alias: self._names.points[t] for alias, t in self._names.aliases.items()})
        return modules

    def list_hooks(
        self,
        name_filter: NamesFilter = None,
        dir: Direction = "both",
        including_permanent: bool = True,
    ) -> dict[str, list[HookHandle]]:
        """The hooks attached, by canonical hook name (points without hooks are left out)."""
        found: dict[str, list[HookHandle]] = {}
        for name in self._names.select(name_filter):
            point = self._names.points[name]
            handles = [
                HookHandle(point, hook, direction)
                for direction, hook in point._matching(dir, including_permanent, None)
            ]
            if handles:
                found[name] = handles
        return found

    # -- adding and removing -------------------------------------------------------------

    def add_hook(
        self,
        name: str | Sequence[str] | Callable[[str], bool],
        hook: HookFn,
        dir: Literal["fwd", "bwd"] = "fwd",
        is_permanent: bool = False,
        level: int | None = None,
        prepend: bool = False,
    ) -> list[HookHandle]:
        """Add `hook` to the hook point `name` (or to each of a list, or each a predicate selects).

        Returns:
            One handle per hook point; ``handle.remove()`` takes that hook away.
        """
        if name is None:  # select(None) would mean every hook point
            raise InputError(
                "add_hook needs a hook name, a list of names or a predicate (got None); "
                "for every hook point use lambda name: True"
            )
        selected = self._names.select(name)
        handles: list[HookHandle] = []
        try:  # all or nothing: a point that refuses removes the ones added before it
            for n in selected:
                point = self._names.points[n]
                handles.append(point.add_hook(hook, dir, is_permanent, prepend, level=level))
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        return handles

    def add_perma_hook(
        self,
        name: str | Sequence[str] | Callable[[str], bool],
        hook: HookFn,
        dir: Literal["fwd", "bwd"] = "fwd",
    ) -> list[HookHandle]:
        """Add a hook that `reset_hooks()` keeps (unless `including_permanent=True`)."""
        return self.add_hook(name, hook, dir, is_permanent=True)

    def remove_all_hook_fns(
        self,
        direction: Direction = "both",
        including_permanent: bool = False,
        level: int | None = None,
    ) -> None:
        """Remove hooks from every hook point (permanent ones if asked; of one `level`)."""
        for point in self._names.points.values():
            point.remove_hooks(direction, including_permanent, level)

    def clear_contexts(self) -> None:
        """Empty every hook point's `ctx`."""
        for point in self._names.points.values():
            point.clear_context()

    def reset_hooks(
        self,
        clear_contexts: bool = True,
        direction: Direction = "both",
        including_permanent: bool = False,
        level: int | None = None,
    ) -> None:
        """Remove hooks (TransformerLens's signature): temporary ones in `direction` by
        default, permanent ones too if asked, and empty the hook contexts."""
        if clear_contexts:
            self.clear_contexts()
        self.remove_all_hook_fns(direction, including_permanent, level)

    @contextmanager
    def hooks(
        self,
        fwd_hooks: Sequence[HookSpec] = (),
        bwd_hooks: Sequence[HookSpec] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
    ) -> Iterator[Any]:
        """Attach hooks for the duration of a ``with`` block; they go when it ends or raises.

        The hooks run only in this thread's (context's) forwards inside the block.

        Args:
            reset_hooks_end: False keeps the hooks after the block, for every later forward
                (remove them with `reset_hooks`), as TransformerLens does.
            clear_contexts: empty every hook point's `ctx` when the block ends.
        """
        fwd = self._names.select_hooks(fwd_hooks, "fwd_hooks")  # check all pairs first
        bwd = self._names.select_hooks(bwd_hooks, "bwd_hooks")
        points = self._names.points
        with self._attached(
            [(points[n], fn) for names, fn in fwd for n in names],
            [(points[n], fn) for names, fn in bwd for n in names],
            reset_hooks_end,
            clear_contexts,
        ):
            yield self

    @contextmanager
    def _attached(
        self,
        fwd: Sequence[tuple[HookPoint, HookFn]],
        bwd: Sequence[tuple[HookPoint, HookFn]] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
    ) -> Iterator[None]:
        """`hooks` on (hook point, function) pairs already checked."""
        added: list[tuple[HookPoint, Hook, OneWay]] = []
        level = self.context_level + 1
        state = vars(self)  # plain state: nn.Module.__setattr__ costs microseconds a call
        state["context_level"] = level
        with hook_scope() as token:  # scoped: these hooks run only in this context's calls
            scope = token if reset_hooks_end else None  # kept ones run in every forward
            try:
                directions: tuple[tuple[OneWay, Sequence[tuple[HookPoint, HookFn]]], ...]
                directions = (("fwd", fwd), ("bwd", bwd))
                for direction, pairs in directions:
                    insert_all(pairs, direction, scope, level, added)
                yield
            finally:
                state["context_level"] = self.context_level - 1
                if reset_hooks_end:
                    discard_all(added)
                if clear_contexts:
                    self.clear_contexts()

    def run_with_hooks(
        self,
        *args: Any,
        fwd_hooks: Sequence[HookSpec] = (),
        bwd_hooks: Sequence[HookSpec] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Run forward with temporary hooks (removed afterwards, also on error).

        Backward hooks are attached to the activations during the forward, so they fire on a
        later ``.backward()`` of its output even though they are removed when it returns.
        """
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts):
            return self._eager_call(*args, **kwargs)

    def _eager_call(self, *args: Any, **kwargs: Any) -> Any:
        """Call the model (the bridge overrides this: never a version compiled in place)."""
        return self(*args, **kwargs)

    # -- TransformerLens's caching helpers -----------------------------------------------

    def get_caching_hooks(
        self,
        names_filter: NamesFilter = None,
        incl_bwd: bool = False,
        device: str | torch.device | None = None,
        remove_batch_dim: bool = False,
        cache: dict[str, torch.Tensor] | None = None,
        pos_slice: slices.SliceInput = None,
    ) -> tuple[dict[str, torch.Tensor], list[HookSpec], list[HookSpec]]:
        """Hooks that save activations into a dict (not attached: pass them to `hooks`).

        Returns:
            (the dict they fill, by canonical name and ``<name>_grad``; forward hooks;
            backward hooks, empty unless `incl_bwd`).
        """
        store: dict[str, torch.Tensor] = {} if cache is None else cache

        def saver(suffix: str) -> HookFn:
            def save(tensor: torch.Tensor, hook: HookPoint) -> None:
                value = tensor.detach().to(device) if device is not None else tensor.detach()
                if remove_batch_dim:
                    value = value[0]
                store[hook.name + suffix] = _slice_positions(value, hook.name, pos_slice)

            return save

        selected = self._names.select(names_filter)
        fwd: list[HookSpec] = [(name, saver("")) for name in selected]
        bwd: list[HookSpec] = [(name, saver("_grad")) for name in selected] if incl_bwd else []
        return store, fwd, bwd

    def add_caching_hooks(
        self,
        names_filter: NamesFilter = None,
        incl_bwd: bool = False,
        device: str | torch.device | None = None,
        remove_batch_dim: bool = False,
        cache: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Attach caching hooks until `reset_hooks()`; returns the dict they fill."""
        store, fwd, bwd = self.get_caching_hooks(
            names_filter, incl_bwd, device, remove_batch_dim, cache
        )
        for name, fn in fwd:
            self.add_hook(name, fn, "fwd")
        for name, fn in bwd:
            self.add_hook(name, fn, "bwd")
        return store

    def cache_all(
        self,
        cache: dict[str, torch.Tensor] | None,
        incl_bwd: bool = False,
        device: str | torch.device | None = None,
        remove_batch_dim: bool = False,
    ) -> None:
        """Cache every activation into `cache` until `reset_hooks()` (use `run_with_cache`)."""
        self.add_caching_hooks(None, incl_bwd, device, remove_batch_dim, cache)

    def cache_some(
        self,
        cache: dict[str, torch.Tensor] | None,
        names: NamesFilter,
        incl_bwd: bool = False,
        device: str | torch.device | None = None,
        remove_batch_dim: bool = False,
    ) -> None:
        """Cache the activations `names` selects into `cache` until `reset_hooks()`."""
        self.add_caching_hooks(names, incl_bwd, device, remove_batch_dim, cache)

    def _lasting_cache(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        names: list[str],
        device: str | torch.device | None,
        remove_batch_dim: bool,
        incl_bwd: bool,
        pos_slice: slices.SliceInput,
    ) -> tuple[Any, dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
        """`run_with_cache(reset_hooks_end=False)`: hooks that write into the returned dict
        and stay attached, so later forwards overwrite its tensors (TransformerLens)."""
        store, fwd, bwd = self.get_caching_hooks(
            names, incl_bwd, device, remove_batch_dim, pos_slice=pos_slice
        )
        with self.hooks(fwd, bwd, reset_hooks_end=False):
            output = self._eager_call(*args, **kwargs)
            if incl_bwd:
                (output[1] if isinstance(output, tuple) else output).backward()
        return output, store, {}

    # -- the set_use_* switches ----------------------------------------------------------

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Switch the opt-in ``attn.hook_result`` points on or off (TransformerLens's name).

        ``hook_result`` is each head's output ``[batch, pos, head, d_model]`` before the heads
        are summed; computing it costs about one more output projection per hooked layer,
        and caching it a ``head``-times larger tensor, so caches leave it out unless it is on.
        """
        for name, point in self._names.points.items():
            if name.endswith(".hook_result"):
                if not use_attn_result:
                    point.remove_hooks("both", including_permanent=True)
                point.enabled = use_attn_result

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """Accepted for TransformerLens code: ``hook_mlp_in`` is always available here."""
        self._always_available("hook_mlp_in", use_hook_mlp_in)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """Accepted for TransformerLens code: ``hook_attn_in`` is always available here."""
        self._always_available("hook_attn_in", use_attn_in)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """TransformerLens's per-head copies of the q/k/v inputs are not offered.

        Raises:
            BridgeError: for True (False is what there is).
        """
        if use_split_qkv_input:
            raise BridgeError(
                "hook_q_input / hook_k_input / hook_v_input are not available: HF computes q, "
                "k and v from one shared input, and per-head copies would need attention "
                "re-implemented. Hook blocks.{i}.hook_attn_in (the shared input), or "
                "attn.hook_q / hook_k / hook_v (per head, after the projections)"
            )

    def set_ungroup_grouped_query_attention(self, ungroup: bool) -> None:
        """Key/value heads stay grouped: ``hook_k`` / ``hook_v`` show the model's own heads.

        Raises:
            BridgeError: for True on a model with grouped-query attention.
        """
        n_kv = self.cfg.n_key_value_heads
        if ungroup and n_kv is not None and n_kv != self.cfg.n_heads:
            raise BridgeError(
                f"hook_k / hook_v show the model's {n_kv} key/value heads; each is shared by "
                f"{self.cfg.n_heads // n_kv} query heads (head h uses key/value head "
                f"h // {self.cfg.n_heads // n_kv}). Ungrouped copies could not be edited "
                "back into the model, so they are not offered"
            )

    def _always_available(self, alias: str, value: bool) -> None:
        if not isinstance(value, bool):
            raise InputError(f"set_use_{alias.removeprefix('hook_')} takes a bool (got {value!r})")
        if not any(a.endswith("." + alias) for a in self._names.aliases):
            known = [a.rpartition(".")[2] for a in self._names.aliases]
            raise HookNameError(
                f"this model has no {alias} hook points.{did_you_mean(alias, known)}"
            )

    def _copy_hooks_to(self, clone: HookedRoot) -> None:
        """Give `clone`'s hook points this root's permanent and plain ``add_hook`` hooks (not
        those of a call in progress), and their switches."""
        for name, point in self._names.points.items():
            target = clone._names.points[name]
            target.enabled, target.copy_on_cache = point.enabled, point.copy_on_cache
            for direction, hooks in (("fwd", point._fwd), ("bwd", point._bwd)):
                for hook in hooks:
                    if hook.scope is None:
                        target.add_hook(hook.fn, direction, hook.permanent)  # type: ignore[arg-type]

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the bridge (model, adapter, config, text) while no hook is attached.

        Raises:
            BridgeError: hooks are attached (their functions and the PyTorch hooks of their
                taps are not part of what a pickle can carry).
        """
        hooked = [n for n, p in self._names.points.items() if p.has_hooks()]
        if hooked:
            raise BridgeError(
                f"cannot pickle a bridge while hooks are attached (at {hooked[:3]}); remove "
                "them first (reset_hooks(including_permanent=True)), or copy.deepcopy it"
            )
        state: dict[str, Any] = dict(self.__dict__)
        return state


def _slice_positions(value: torch.Tensor, name: str, pos_slice: slices.SliceInput) -> torch.Tensor:
    """TransformerLens's run_with_cache ``pos_slice``: the position dimension is third from
    last for per-head q/k/v/z/result, second from last otherwise (query positions of a
    pattern); tensors without one are left as they are."""
    if pos_slice is None:
        return value
    dim = -3 if name.rpartition(".")[2] in _HEAD_DIM_POINTS else -2
    return slices.apply(value, pos_slice, dim) if value.dim() >= -dim else value


def slice_store(
    store: dict[str, torch.Tensor],
    calls: dict[str, list[torch.Tensor]],
    pos_slice: slices.SliceInput,
) -> tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
    """A cache's tensors (and the calls of points that fired several times) at `pos_slice`."""
    if pos_slice is None:
        return store, calls
    sliced = {k: _slice_positions(v, k.removesuffix("_grad"), pos_slice) for k, v in store.items()}
    sliced_calls = {
        k: [_slice_positions(v, k.removesuffix("_grad"), pos_slice) for v in c]
        for k, c in calls.items()
    }
    return sliced, sliced_calls
