"""The docs cannot rot: their code runs, their hookspec signatures are the real ones.

How code blocks in ``docs/*.md`` are read and run is in docs/hooks/examples.py, which the
mkdocs build uses too (it runs the pages whose pictures their code makes).
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from bridge_core import hookspecs

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p.name for p in DOCS.glob("*.md"))

# Pages whose examples need a separately installed distribution: skipped without it.
REQUIRES = {
    "llava.md": "bridge_llava",
    "qwen2vl.md": "bridge_qwen2vl",
    "scale.md": "bridge_llava",
    "vlm.md": "bridge_siglip",
}


def _examples() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_examples", DOCS / "hooks" / "examples.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


examples = _examples()
blocks = examples.blocks


def test_parser_reads_the_markers() -> None:
    page = (
        "```python\na = 1\n```\n"
        "```python {.no-run}\nb = 1\n```\n"
        '```toml title="pkg/spec.toml"\nname = "x"\n```\n'
        "!!! note\n    ```python\n    c = 1\n    ```\n"
    )
    parsed = blocks(page)
    assert [(b.lang, b.runs, b.title, b.code) for b in parsed] == [
        ("python", True, None, "a = 1\n"),
        ("python", False, None, "b = 1\n"),
        ("toml", False, "pkg/spec.toml", 'name = "x"\n'),
        ("python", True, None, "c = 1\n"),
    ]
    assert parsed[3].line == 12


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page: str, tmp_path: Path) -> None:
    required = REQUIRES.get(page)
    if required and importlib.util.find_spec(required) is None:
        pytest.skip(f"{page} needs {required}, which is not installed")
    examples.run_page(DOCS / page, tmp_path)


def hookspec_signatures() -> dict[str, str]:
    """``def name(args) -> ret:`` of every function marked with the hookspec marker."""
    marker = f"{hookspecs.PROJECT}_spec"
    tree = ast.parse(inspect.getsource(hookspecs))
    signatures = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and hasattr(getattr(hookspecs, node.name), marker):
            returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
            signatures[node.name] = f"def {node.name}({ast.unparse(node.args)}){returns}:"
    return signatures


def test_every_hookspec_is_documented_with_its_signature() -> None:
    marker = f"{hookspecs.PROJECT}_spec"
    marked = {n for n, f in vars(hookspecs).items() if callable(f) and hasattr(f, marker)}
    signatures = hookspec_signatures()
    assert set(signatures) == marked and marked, "hookspecs are functions defined in hookspecs.py"
    page = (DOCS / "plugins.md").read_text(encoding="utf-8")
    missing = [sig for sig in signatures.values() if sig not in page]
    assert not missing, f"docs/plugins.md lacks these hookspec signatures: {missing}"


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
    reason="mkdocs / mkdocs-material are not installed (pip install -e '.[docs]')",
)
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    problems = [line for line in result.stderr.splitlines() if "WARNING" in line or "ERROR" in line]
    assert result.returncode == 0, "\n".join(problems) or result.stderr
    if importlib.util.find_spec("bridge_llava") is not None:  # made by the LLaVA guide's code
        assert (tmp_path / "llava-attention-map.png").stat().st_size > 0
