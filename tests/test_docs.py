"""The docs cannot rot: their code runs, their hookspec signatures are the real ones.

Rules for code blocks in ``docs/*.md`` (also written down in docs/design.md):

- A ```` ```python ```` block runs, in page order, in one namespace per page, so a page can
  build its model in its first block and use it in the next ones. Each page runs in its own
  temporary directory (the working directory, also on ``sys.path``) with a fresh registry.
- A block with a ``title="path/to/file"`` (any language) is not run: it is written to that
  path in the page's directory, so a page can show the files of a package and then import it.
- A block fenced ```` ```python {.no-run} ```` is shown but not run (hub downloads, GPUs).
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from bridge_core import hookspecs
from bridge_core.registry import reset_registry

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p.name for p in DOCS.glob("*.md"))

# Pages whose examples need a separately installed distribution: skipped without it.
REQUIRES = {"llava.md": "bridge_llava", "scale.md": "bridge_llava"}

OPEN_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
TITLE = re.compile(r"""title=["']([^"']+)["']""")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    lang: str
    classes: frozenset[str]
    title: str | None
    code: str
    line: int  # line of the first code line, 1-based

    @property
    def runs(self) -> bool:
        return self.lang == "python" and self.title is None and "no-run" not in self.classes


def parse_info(info: str) -> tuple[str, frozenset[str], str | None]:
    """Language, classes and title of a fence's info string (superfences syntax)."""
    title_match = TITLE.search(info)
    title = title_match.group(1) if title_match else None
    words = re.sub(r"[{}]", " ", TITLE.sub("", info)).split()
    classes = [w[1:] for w in words if w.startswith(".")]
    plain = [w for w in words if not w.startswith(".") and "=" not in w]
    if plain:
        lang = plain[0]
    elif classes:
        lang = classes.pop(0)  # ```{.python .no-run}
    else:
        lang = ""
    return lang, frozenset(classes), title


def blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown page (also indented ones, e.g. in admonitions)."""
    lines = text.splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = OPEN_FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = opening.group("indent"), opening.group("fence")
        close = re.compile(rf"^{re.escape(indent)}{re.escape(fence)}\s*$")
        body_start = i + 1
        j = body_start
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        body = [
            line[len(indent) :] if line.startswith(indent) else line.lstrip()
            for line in lines[body_start:j]
        ]
        lang, classes, title = parse_info(opening.group("info"))
        found.append(Block(lang, classes, title, "\n".join(body) + "\n", body_start + 1))
        i = j + 1
    return found


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
def test_page_examples_run(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    required = REQUIRES.get(page)
    if required and importlib.util.find_spec(required) is None:
        pytest.skip(f"{page} needs {required}, which is not installed")
    path = DOCS / page
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    reset_registry()
    namespace: dict[str, object] = {"__name__": f"docs.{path.stem}"}
    try:
        for block in blocks(path.read_text(encoding="utf-8")):
            if block.title is not None:
                target = tmp_path / block.title
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(block.code, encoding="utf-8")
            elif block.runs:
                # Pad so that tracebacks point at the line in the Markdown file.
                code = compile("\n" * (block.line - 1) + block.code, str(path), "exec")
                exec(code, namespace)
    finally:
        reset_registry()
        for name, module in list(sys.modules.items()):
            if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
                del sys.modules[name]


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
