"""``transformer-bridge hooks MODEL``: the hook tree of a model, with shapes from a dry run."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import torch

from bridge_core.cli.app import UsageError
from bridge_core.cli.model import alias_index, boot, inputs_for, load_image, model_options, shape
from bridge_core.cli.render import Node, Output
from bridge_core.errors import did_you_mean

if TYPE_CHECKING:
    from bridge_core.bridge import TransformerBridge
    from bridge_core.cache import ActivationCache


def setup(parser: argparse.ArgumentParser) -> None:
    """The model options, ``--filter SUBSTR`` and ``--prompt``."""
    model_options(parser)
    parser.add_argument(
        "--filter", metavar="SUBSTR", help="only hook names (or aliases) containing SUBSTR"
    )
    parser.add_argument("--prompt", help="prompt of the dry run (default: a short sentence)")
    parser.set_defaults(handler=cmd_hooks)


def cmd_hooks(args: argparse.Namespace, out: Output) -> int:
    """Print the hook tree of ``args.model`` with shapes from a dry run."""
    image = load_image(args.image)
    bridge = boot(args)
    _, inputs, described = inputs_for(bridge, args, image, default_image=True)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(**inputs)
    aliases = alias_index(bridge)
    names = list(bridge.hook_dict)
    if args.filter:
        names = [n for n in names if any(args.filter in a for a in [n, *aliases.get(n, [])])]
        if not names:
            every = [*bridge.hook_dict, *bridge.hook_aliases()]
            raise UsageError(
                f"--filter {args.filter!r} matches no hook name or alias of this model."
                f"{did_you_mean(args.filter, every)} Accepted: a substring of a hook name, "
                "e.g. 'resid_pre', 'attn.hook_pattern', 'blocks.0.'"
            )
    out.tree(hook_tree(bridge, cache, names, args.model))
    ran = f"{inputs['input_ids'].shape[-1]} tokens" + (f" and {described}" if described else "")
    out.line(f"Shapes from a dry run on {ran}; '-' marks hook points that did not fire.")
    return 0


def hook_tree(
    bridge: TransformerBridge, cache: ActivationCache, names: list[str], model: str
) -> Node:
    """The hook points `names` as a tree of components, with shapes and aliases."""
    aliases = alias_index(bridge)
    n_aliases = sum(len(aliases.get(n, [])) for n in names)
    root = Node(
        f"{model}: {bridge.adapter.name} adapter, {len(names)} hook points, {n_aliases} aliases"
    )
    for name in names:
        *path, leaf = name.split(".")
        node = root
        for i, part in enumerate(path):
            node = node.child(part)
            node.note = node.note or _component_note(bridge, ".".join(path[: i + 1]))
        found = shape(cache[name]) if name in cache else "-"
        shown = aliases.get(name, [])
        node.child(leaf, f"{leaf} {found}").note = "= " + ", ".join(shown) if shown else ""
    return root


def _component_note(bridge: TransformerBridge, path: str) -> str:
    module = bridge.get_submodule(path)
    if isinstance(module, torch.nn.ModuleList):
        kinds = sorted({type(m).__name__ for m in module})
        return f"{len(module)} x {', '.join(kinds)}"
    return type(module).__name__
