"""The layers of bridge_core go one way (STYLE.md, "Layers go one way"), with no import circles.

Every import counts for the direction: at module level, inside functions, and under
``TYPE_CHECKING``. A module low in the layers that needs the bridge names it by a Protocol
(`bridge_core.cache.CacheOwner`, `bridge_core.bridgelike.BridgeLike`) or takes what it needs as
arguments; it never imports ``bridge.py``. A circle is made of imports that run (at module
level or deferred into a function); an import for annotations only (``TYPE_CHECKING``, within
a layer) makes none. A new module gets a place in `LAYERS` (the test fails until it has one).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import bridge_core

ROOT = Path(bridge_core.__file__).parent


def _layer(name: str, members: str) -> tuple[str, set[str]]:
    return name, set(members.split())


LAYERS = [
    _layer("errors/config/spec", "errors config expr spec"),
    _layer(
        "hooks/cache/tokens",
        "module_state torch_hooks taps hooks routes naming recording views switches compiling "
        "eager_kernel attention normalization tokens text slices stacks cache cache_analysis "
        "layout heatmap data shards "
        "factored weights forward_options hooked_root saes",
    ),
    _layer(
        "components",
        "components components.base components.standard components.moe components.experts "
        "model_weights",
    ),
    _layer("registry/assembly", "hookspecs registry assembly components.plugin"),
    # What the bridge delegates to (bridge.boot, .generate, .verify, .image_layout,
    # .enable_compatibility_mode) and the tools that work on a bridge: they take it as a
    # BridgeLike, so the bridge can call them.
    _layer(
        "loading/generation (take a BridgeLike)",
        "bridgelike loading generation multimodal verify verify_checks patching harvest "
        "harvest_run compat",
    ),
    ("bridge", {"bridge", ""}),  # "": the package, whose __init__ exports TransformerBridge
    _layer("cli", "support tl_patching cli"),  # and every cli.* module
]


def modules() -> dict[str, Path]:
    """Every module of bridge_core by its dotted name under the package ("" for __init__)."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] in ("__init__", "__main__"):
            parts = parts[:-1] if parts[-1] == "__init__" else parts
        found[".".join(parts)] = path
    return found


def imports(path: Path, known: set[str]) -> Iterator[tuple[str, int, bool]]:
    """The bridge_core modules `path` imports (anywhere in it): (module, line, whether the
    import is for annotations only, under ``if TYPE_CHECKING:``)."""
    yield from _imports(ast.parse(path.read_text(), str(path)), known, typing_only=False)


def _imports(node: ast.AST, known: set[str], typing_only: bool) -> Iterator[tuple[str, int, bool]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for statement in child.body:
                yield from _imports_of(statement, known, True)
            for statement in child.orelse:
                yield from _imports_of(statement, known, typing_only)
        else:
            yield from _imports_of(child, known, typing_only)


def _imports_of(
    node: ast.AST, known: set[str], typing_only: bool
) -> Iterator[tuple[str, int, bool]]:
    names: list[str] = []
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module]
        if node.module.split(".")[0] == "bridge_core":
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [n if _local(n) in known else node.module for n in names]
    elif isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    for name in names:
        if name.split(".")[0] == "bridge_core":
            yield _local(name), node.lineno, typing_only  # type: ignore[attr-defined]
    yield from _imports(node, known, typing_only)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _local(name: str) -> str:
    return name.removeprefix("bridge_core").removeprefix(".")


def layer_of(module: str) -> int:
    for index, (_, members) in enumerate(LAYERS):
        if module in members or (module.startswith("cli.") and "cli" in members):
            return index
    raise AssertionError(
        f"bridge_core.{module} has no layer: place it in LAYERS in {__file__} (STYLE.md: "
        "errors/config/spec -> hooks/cache/tokens -> components -> registry/assembly -> "
        "bridge -> loading/generation -> cli)"
    )


def graph(runtime_only: bool = False) -> dict[str, dict[str, int]]:
    """Module -> {imported module: line}; with `runtime_only`, without annotation imports."""
    found = modules()
    edges: dict[str, dict[str, int]] = {}
    for module, path in found.items():
        edges[module] = {}
        for target, line, typing_only in imports(path, set(found)):
            if not (runtime_only and typing_only):
                edges[module].setdefault(target, line)
    return edges


def test_every_import_goes_down_the_layers() -> None:
    upward = []
    for module, targets in graph().items():
        for target, line in targets.items():
            if target != module and layer_of(target) > layer_of(module):
                upward.append(
                    f"bridge_core.{module} (line {line}, layer {LAYERS[layer_of(module)][0]!r}) "
                    f"imports bridge_core.{target} (layer {LAYERS[layer_of(target)][0]!r})"
                )
    assert not upward, "imports up the layers:\n" + "\n".join(upward)


def test_no_module_below_the_bridge_imports_it() -> None:
    """Issue 11: cache, generation, loading ... imported bridge.py (under TYPE_CHECKING)."""
    bridge = layer_of("bridge")
    importers = [m for m, targets in graph().items() if "bridge" in targets and m != "bridge"]
    assert importers and all(layer_of(m) >= bridge for m in importers), importers
    for module in ("cache", "generation", "loading", "multimodal", "verify", "verify_checks"):
        assert module not in importers
    assert not [m for m in importers if m.startswith("harvest")]


def test_there_are_no_import_circles() -> None:
    """Issue 11: bridge -> cache / generation / loading -> bridge ran in a circle."""
    edges = {m: {t for t in targets if t != m} for m, targets in graph(runtime_only=True).items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = [*path[path.index(module) :], module]
            raise AssertionError("import circle: " + " -> ".join(f"bridge_core.{m}" for m in cycle))
        if module in done:
            return
        for target in sorted(edges.get(module, ())):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(edges):
        visit(module, [])
